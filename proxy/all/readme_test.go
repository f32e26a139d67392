package all_test

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"spliced/config"
	"spliced/internal/manpage"
	_ "spliced/proxy/all"
)

// configKeys lists the keys of the configuration file as the README's
// reference names them (services[].splice.mode, services[].http.routes[]),
// every proxy's section included, with the fields of list items.
func configKeys() map[string][]string {
	keys := map[string][]string{}
	unmarshaler := reflect.TypeFor[yaml.Unmarshaler]()
	var walk func(prefix string, t reflect.Type)
	walk = func(prefix string, t reflect.Type) {
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "-" || !f.IsExported() {
				continue
			}
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			leaf := reflect.PointerTo(ft).Implements(unmarshaler)
			switch {
			case !leaf && ft.Kind() == reflect.Struct:
				walk(prefix+name+".", ft)
			case !leaf && ft.Kind() == reflect.Slice && reflect.PointerTo(ft.Elem()).Implements(unmarshaler):
				keys[prefix+name] = nil // a list of values, such as prefixes
			case !leaf && ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct && name == "services":
				walk(prefix+name+"[].", ft.Elem())
			case !leaf && ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
				var fields []string
				for j := range ft.Elem().NumField() {
					n, _, _ := strings.Cut(ft.Elem().Field(j).Tag.Get("yaml"), ",")
					fields = append(fields, n)
				}
				keys[prefix+name+"[]"] = fields
			default:
				keys[prefix+name] = nil
			}
		}
	}
	walk("", reflect.TypeFor[config.Config]())
	for _, kind := range config.ProxyKinds() {
		if def := config.LookupProxy(kind); def.Section != "" {
			walk("services[]."+def.Section+".", reflect.TypeOf(def.NewSection()).Elem())
		}
	}
	return keys
}

// TestConfigKeysDocumented: the README's configuration reference, from
// which spliced.yaml(5) is generated, has a row for every key a file may
// hold (every proxy's section too) and none for a key the decoder would
// refuse as unknown; a list of mappings (routes[], rules[]) names each
// field of its items in its row.
func TestConfigKeysDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := manpage.Markdown(string(readme), "Configuration reference")
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z0-9_.\\[\\]]+)` \\|(.*)$").FindAllStringSubmatch(ref, -1) {
		rows[m[1]] = m[2]
	}
	keys := configKeys()
	if len(keys) < 60 {
		t.Fatalf("found only %d keys: %v", len(keys), keys)
	}
	for key, fields := range keys {
		row, ok := rows[key]
		if !ok {
			t.Errorf("key %s has no row in the README's configuration reference", key)
			continue
		}
		for _, f := range fields {
			if !regexp.MustCompile(`[{ ]` + f + `\b`).MatchString(row) {
				t.Errorf("the README's row of %s does not name its items' field %s", key, f)
			}
		}
	}
	var extra []string
	for key := range rows {
		if _, ok := keys[key]; !ok {
			extra = append(extra, key)
		}
	}
	slices.Sort(extra)
	if len(extra) > 0 {
		t.Errorf("the README's configuration reference has rows for keys that do not exist: %v", extra)
	}
}

// TestConfigDefaultsDocumented: a key set to the default the README's
// configuration reference gives it (a row whose default is one value,
// such as `5s`) makes the same configuration as the key left out, in a
// service of every kind the key applies to: a default that depends on
// the proxy (splice.mode, upstream) must say so.
func TestConfigDefaultsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := manpage.Markdown(string(readme), "Configuration reference")
	if err != nil {
		t.Fatal(err)
	}
	// A service of each kind, by the section whose keys apply to it;
	// the keys of no section apply to all.
	bases := []struct{ section, svc string }{
		{"forward", "{name: s, listen: 15001, ports: ['5001']}"},
		{"forward", "{name: s, listen_mode: direct, listen_on: ['127.0.0.1:15001'], forward: {backends: ['10.9.0.2:80']}}"},
		{"http", "{name: s, proxy: http, listen: 15001, ports: ['80'], http: {routes: [{host: a, backends: ['10.9.0.2:80']}]}}"},
		{"ftp", "{name: s, proxy: ftp, listen: 15001, ports: ['21']}"},
		{"socks5", "{name: s, proxy: socks5, listen_on: ['127.0.0.1:1080']}"},
	}
	sections := map[string]bool{}
	for _, b := range bases {
		sections[b.section] = true
	}
	parse := func(doc map[string]any) (*config.Config, error) {
		data, err := yaml.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		return config.Parse("test.yaml", data)
	}
	// check parses the file doc without the key and with it set to value
	// (its path from doc's top).
	check := func(key, def string, value any, doc func() (root, top map[string]any)) bool {
		root, _ := doc()
		want, err := parse(root)
		if err != nil {
			t.Errorf("%s: the file without it: %v", key, err)
			return false
		}
		root, d := doc()
		path := strings.Split(key, ".")
		if path[0] == "services[]" {
			path = path[1:]
		}
		for _, p := range path[:len(path)-1] {
			next, _ := d[p].(map[string]any)
			if next == nil {
				next = map[string]any{}
				d[p] = next
			}
			d = next
		}
		d[path[len(path)-1]] = value
		got, err := parse(root)
		if err != nil {
			t.Errorf("%s: set to its documented default %s: %v", key, def, err)
			return false
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: set to its documented default %s, the configuration differs from the one without it (%s)", key, def, root)
			return false
		}
		return true
	}
	checked := 0
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z0-9_.\\[\\]]+)` \\| `([^`]+)`(?: \\([^)]*\\))? \\|").FindAllStringSubmatch(ref, -1) {
		key, def := m[1], m[2]
		var value any
		if err := yaml.Unmarshal([]byte(def), &value); err != nil {
			t.Errorf("%s: default %q: %v", key, def, err)
			continue
		}
		path := strings.Split(key, ".")
		if path[0] != "services[]" {
			if check(key, def, value, func() (map[string]any, map[string]any) { d := map[string]any{}; return d, d }) {
				checked++
			}
			continue
		}
		for _, b := range bases {
			if len(path) > 2 && sections[path[1]] && path[1] != b.section || len(path) == 2 && strings.Contains(b.svc, " "+path[1]+":") {
				continue // another kind's key, or one the service sets
			}
			ok := check(key, def, value, func() (map[string]any, map[string]any) {
				var s map[string]any
				if err := yaml.Unmarshal([]byte(b.svc), &s); err != nil {
					t.Fatal(err)
				}
				return map[string]any{"services": []any{s}}, s
			})
			if ok {
				checked++
			}
		}
	}
	if checked < 60 {
		t.Errorf("checked the defaults of only %d keys", checked)
	}
}

// TestDefaultYAMLNamesEveryKey: the embedded default configuration
// (installed as /etc/spliced/spliced.yaml), which the README says
// documents the same keys in comments, names every key, set or in a
// commented example.
func TestDefaultYAMLNamesEveryKey(t *testing.T) {
	for key := range configKeys() {
		path := strings.Split(strings.ReplaceAll(key, "[]", ""), ".")
		leaf := path[len(path)-1]
		if !regexp.MustCompile(`(?m)^[# ]*(- )?` + leaf + `:`).Match(config.Default) {
			t.Errorf("config/default.yaml does not name %s", key)
		}
	}
}

// TestDefaultYAMLExamples: each commented example service of the
// embedded default configuration is a valid service once uncommented.
func TestDefaultYAMLExamples(t *testing.T) {
	_, examples, ok := strings.Cut(string(config.Default), "\nservices: []\n")
	if !ok {
		t.Fatal("config/default.yaml has no empty services list")
	}
	// The socks5 example's users file, which validation reads.
	users := filepath.Join(t.TempDir(), "socks5.users")
	if err := os.WriteFile(users, []byte("# no users\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	examples = strings.ReplaceAll(examples, "/etc/spliced/socks5.users", users)
	n := 0
	for _, ex := range strings.Split(examples, "# Example:")[1:] {
		var svc strings.Builder
		for _, line := range strings.Split(ex, "\n") {
			if strings.HasPrefix(line, "#  ") {
				svc.WriteString(line[1:] + "\n")
			}
		}
		if _, err := config.Parse("example", []byte("services:\n"+svc.String())); err != nil {
			t.Errorf("example%s: %v", strings.SplitN(ex, "\n", 2)[0], err)
		}
		n++
	}
	if n < 5 {
		t.Errorf("config/default.yaml has %d examples", n)
	}
}

// fileWith is a configuration file with each key (as the README names
// it: services[].splice.linger) set to its YAML value; a service's keys
// go into one service, a forwarder's unless a proxy section's key says
// otherwise.
func fileWith(t *testing.T, set map[string]string) []byte {
	t.Helper()
	root := map[string]any{}
	var svc map[string]any
	for key, v := range set {
		var value any
		if err := yaml.Unmarshal([]byte(v), &value); err != nil {
			t.Fatalf("%s: %s: %v", key, v, err)
		}
		d, path := root, strings.Split(key, ".")
		if path[0] == "services[]" {
			if svc == nil {
				svc = map[string]any{"name": "s", "listen": 15001, "ports": []any{"5001"}}
				root["services"] = []any{svc}
			}
			d, path = svc, path[1:]
			switch path[0] {
			case "http":
				svc["proxy"] = "http"
				svc["http"] = map[string]any{"routes": []any{map[string]any{"backends": []any{"10.9.0.2:80"}}}}
			case "ftp", "socks5":
				svc["proxy"] = path[0]
			}
			if path[0] == "socks5" {
				delete(svc, "listen")
				delete(svc, "ports")
				svc["listen_on"] = []any{"127.0.0.1:1080"}
			}
		}
		for _, p := range path[:len(path)-1] {
			next, _ := d[p].(map[string]any)
			if next == nil {
				next = map[string]any{}
				d[p] = next
			}
			d = next
		}
		d[path[len(path)-1]] = value
	}
	data, err := yaml.Marshal(root)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestConfigLimitsDocumented: the limits the README's configuration
// reference gives a key are the ones validation enforces: the values at
// the bounds pass, the ones past them are refused. A stranger who
// trusts the row writes a value inside it.
func TestConfigLimitsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := manpage.Markdown(string(readme), "Configuration reference")
	if err != nil {
		t.Fatal(err)
	}
	long := func(n int) string { return strings.Repeat("a", n) }
	for _, tc := range []struct {
		key, says string            // the row of key says this
		with      map[string]string // other keys the values need
		ok, bad   []string
	}{
		{"kernel.table", "a letter, then up to 31 letters, digits or `_`", nil, []string{"A" + long(31), "a_1"}, []string{"1a", "a" + long(32), "a-b"}},
		{"kernel.route_table", "not 253-255", nil, []string{"252", "256"}, []string{"253", "254", "255"}},
		{"kernel.queue", "must end at 65535 or below", map[string]string{"kernel.queues": "2"}, []string{"65534"}, []string{"65535"}},
		{"kernel.queues", "(1-64)", nil, []string{"1", "64"}, []string{"65", "-1"}},
		{"kernel.queue_len", "(8-1048576)", nil, []string{"8", "1048576"}, []string{"7", "1048577"}},
		{"kernel.divert_timeout", "(at least `1s`)", nil, []string{"1s"}, []string{"999ms"}},
		{"kernel.interfaces", "with `kernel.datapath: bpf` or `auto` only", map[string]string{"kernel.datapath": "bpf"}, []string{"[eth0]"}, []string{"[lo]"}},
		{"kernel.interfaces", "with `nfqueue` a list is refused", map[string]string{"kernel.datapath": "nfqueue"}, nil, []string{"[eth0]"}},
		{"kernel.bpffs", "a clean absolute path", nil, []string{"/sys/fs/bpf2"}, []string{"sys/fs/bpf", "/sys/fs/bpf/"}},
		{"control.socket", "an absolute path of at most 107 bytes", nil, []string{"/r/" + long(104)}, []string{"/r/" + long(105), "run/x.sock"}},
		{"limits.client_ipv6_prefix", "32-128", nil, []string{"32", "128"}, []string{"31", "129"}},
		{"services[].name", "`[a-z][a-z0-9_]*`, at most 24 characters", nil, []string{"a_" + long(22)}, []string{long(25), "Web", "1a", "a-b"}},
		{"services[].backlog", "1-65535", nil, []string{"1", "65535"}, []string{"65536", "-1"}},
		{"services[].splice.linger", "1s to 1m", nil, []string{"1s", "1m"}, []string{"999ms", "61s"}},
		{"services[].splice.socket_buffer", "16KiB-64MiB", map[string]string{"services[].splice.mode": "immediate"}, []string{"16KiB", "64MiB"}, []string{"16383", "67108865"}},
		{"services[].ftp.data_ports", "above 1023", nil, []string{"1024-1100"}, []string{"1023-1100"}},
		{"services[].ftp.max_line", "(64-8192)", nil, []string{"64", "8192"}, []string{"63", "8193"}},
		{"services[].http.splice_idle_min", "0-100", nil, []string{"0", "100"}, []string{"-1", "101"}},
		{"services[].socks5.failed_logins", "at least 1; a negative value is refused", nil, []string{"1"}, []string{"-1"}},
	} {
		row := regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(tc.key) + "` \\|.*$").FindString(ref)
		if !strings.Contains(row, tc.says) {
			t.Errorf("the README's row of %s does not say %q", tc.key, tc.says)
		}
		for _, v := range append(tc.ok, tc.bad...) {
			set := map[string]string{tc.key: v}
			for k, w := range tc.with {
				set[k] = w
			}
			_, err := config.Parse("test.yaml", fileWith(t, set))
			if ok := slices.Contains(tc.ok, v); ok && err != nil {
				t.Errorf("%s: %s, inside the README's limits, is refused: %v", tc.key, v, err)
			} else if !ok && err == nil {
				t.Errorf("%s: %s, outside the README's limits, is accepted", tc.key, v)
			}
		}
	}
}
