package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestFlagsDocumented keeps the README's flag table, from which spliced(8)
// is generated (internal/manpage), and the daemon's flags the same.
func TestFlagsDocumented(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"-h"}, &bytes.Buffer{}, &stderr); code != 2 {
		t.Fatalf("spliced -h: exit %d", code)
	}
	var defined []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(stderr.String(), -1) {
		defined = append(defined, m[1])
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `-([a-z-]+)[ `]").FindAllStringSubmatch(string(readme), -1) {
		documented = append(documented, m[1])
	}
	slices.Sort(defined)
	slices.Sort(documented)
	if len(defined) < 7 || !slices.Equal(defined, documented) {
		t.Errorf("flags %v, README's flag table %v", defined, documented)
	}
}

// TestSocketFlagChecked: -socket overrides control.socket after the
// file's validation, so a relative or too long path reached the listener
// unchecked. It is refused as control.socket would be.
func TestSocketFlagChecked(t *testing.T) {
	file := filepath.Join(t.TempDir(), "spliced.yaml")
	if err := os.WriteFile(file, []byte("services:\n  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, sock := range []string{"spliced.sock", "/run/" + strings.Repeat("x", 120)} {
		var stdout, stderr bytes.Buffer
		code := run([]string{"-config", file, "-socket", sock, "-check"}, &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), "-socket") || !strings.Contains(stderr.String(), "/run/spliced/spliced.sock") {
			t.Errorf("-socket %s: exit %d, %q; want 2 and an error naming the flag and a usable path", sock, code, stderr.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-config", file, "-socket", "off", "-check"}, &stdout, &stderr); code != 0 {
		t.Errorf("-socket off: exit %d, %s", code, stderr.String())
	}
}

// TestCheckSaysWhoOwnsTheTable: -check says whether the table will be
// the daemon's (kernel.own_table) and what follows for other processes.
func TestCheckSaysWhoOwnsTheTable(t *testing.T) {
	for _, tc := range []struct{ kernel, want string }{
		{"", "# table owned by the daemon (kernel.own_table: on"},
		{"kernel:\n  own_table: off\n", "# table unowned (kernel.own_table: off): any process may change it; kernel.repair: on"},
	} {
		file := filepath.Join(t.TempDir(), "spliced.yaml")
		if err := os.WriteFile(file, []byte(tc.kernel+"services:\n  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		if code := run([]string{"-config", file, "-socket", "off", "-check"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), tc.want) {
			t.Errorf("-check with %q: exit %d, %s%s; want a line %q", tc.kernel, code, stdout.String(), stderr.String(), tc.want)
		}
	}
}

// TestCheckUnknownGroup: control.group names a group of this machine,
// which the file's validation cannot check; -check passed a file whose
// daemon then refused to start. Both now say so at once, with the fix.
func TestCheckUnknownGroup(t *testing.T) {
	file := filepath.Join(t.TempDir(), "spliced.yaml")
	if err := os.WriteFile(file, []byte("control:\n  group: no-such-group-here\nservices:\n  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := run([]string{"-config", file, "-check"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `control.group "no-such-group-here"`) || !strings.Contains(stderr.String(), "groupadd no-such-group-here") {
		t.Errorf("-check with an unknown control.group: exit %d, %q; want 1 (as for a file that does not validate) and an error naming the group and the fix", code, stderr.String())
	}
	// With the socket off the group is unused.
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"-config", file, "-socket", "off", "-check"}, &stdout, &stderr); code != 0 {
		t.Errorf("-socket off: exit %d, %s", code, stderr.String())
	}
}

// TestCheckSourceNATWithoutTransparent: -check's source NAT line speaks
// of transparent services only where there are some: for a file of
// direct and NAT services it said that no source NAT applied where
// "transparent services' connections leave".
func TestCheckSourceNATWithoutTransparent(t *testing.T) {
	for _, tc := range []struct{ services, want string }{
		{"  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n    upstream: nat\n", "# source NAT: nothing to check"},
		{"  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n", "transparent services' connections leave"},
	} {
		file := filepath.Join(t.TempDir(), "spliced.yaml")
		if err := os.WriteFile(file, []byte("services:\n"+tc.services), 0o600); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		if code := run([]string{"-config", file, "-socket", "off", "-check"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), tc.want) {
			t.Errorf("-check of %q: exit %d, %s%s; want a line with %q", tc.services, code, stdout.String(), stderr.String(), tc.want)
		}
	}
}

// TestCheckLinesDocumented: every line of `spliced -check` the README
// names (`# firewall:`, `# bridges:` ...) is one the daemon prints: a
// line removed or renamed (as `# marks:` was, for an input chain) left
// the README sending operators to look for it.
func TestCheckLinesDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	named := regexp.MustCompile("`(# [a-zA-Z][a-zA-Z ]*:)").FindAllStringSubmatch(string(readme), -1)
	if len(named) < 5 {
		t.Fatalf("the README names only %v", named)
	}
	for _, m := range named {
		if !bytes.Contains(src, []byte(`"`+m[1]+" ")) {
			t.Errorf("the README names a %q line of spliced -check, which main.go does not print", m[1])
		}
	}
}

// TestBadConfigAsREADMEShows: the README's example of a configuration
// that does not validate (two services on port 80) shows what spliced
// prints for it, and the exit status it gives.
func TestBadConfigAsREADMEShows(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("A bad configuration exits with status (\\d) and messages such as\n\n```\n([^`]*)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("the README has no example of a bad configuration")
	}
	t.Chdir(t.TempDir())
	if err := os.WriteFile("spliced.yaml", []byte("services:\n  - name: a\n    listen: 15001\n    ports: [\"80\"]\n  - name: b\n    listen: 15002\n    ports: [\"80\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"-config", "spliced.yaml", "-socket", "off"}, {"-check", "-config", "spliced.yaml"}} {
		var stdout, stderr bytes.Buffer
		code := run(args, &stdout, &stderr)
		if fmt.Sprint(code) != string(m[1]) || stderr.String() != string(m[2]) {
			t.Errorf("spliced %v: exit %d, %q; the README shows exit %s, %q", args, code, stderr.String(), m[1], m[2])
		}
	}
}
