package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode"
)

// parseWithin runs Parse and fails the test if it takes longer than d (the
// parse goes on in its goroutine; the test binary's timeout ends it).
func parseWithin(t *testing.T, d time.Duration, data []byte) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := Parse("hostile.yaml", data)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("Parse of a %d-byte file did not return within %v", len(data), d)
		return nil
	}
}

// TestAliasExpansionBounded: aliases nested along the configuration's
// types (services, their access rules, the rules' sources) multiply: a
// file of 8 KB named 27 million values, and checking its keys took
// minutes and gigabytes before yaml's own alias limit (in Decode) was
// reached.
func TestAliasExpansionBounded(t *testing.T) {
	const n = 300
	var b strings.Builder
	b.WriteString("x-src: &s\n")
	for i := range n {
		fmt.Fprintf(&b, "  - 10.%d.%d.0/24\n", i/256, i%256)
	}
	b.WriteString("x-rule: &r {action: deny, sources: *s}\n")
	b.WriteString("x-svc: &v {name: a, listen: 15001, ports: [\"80\"], access: {rules: [" + strings.Repeat("*r, ", n-1) + "*r]}}\n")
	b.WriteString("services: [" + strings.Repeat("*v, ", n-1) + "*v]\n")
	err := parseWithin(t, 5*time.Second, []byte(b.String()))
	if err == nil || !strings.Contains(err.Error(), "alias") {
		t.Fatalf("want an error about aliases, got %v", err)
	}
}

// TestSyntaxErrorInLargeFile: a syntax error near the top of a large file
// made syntaxError reparse every prefix of the file (quadratic): 2 MB took
// minutes.
func TestSyntaxErrorInLargeFile(t *testing.T) {
	var b strings.Builder
	b.WriteString("services:\n  - name: [a\n")
	for i := range 60000 {
		fmt.Fprintf(&b, "# filler comment line number %d\n", i)
	}
	err := parseWithin(t, 5*time.Second, []byte(b.String()))
	if err == nil || !strings.Contains(err.Error(), "is not valid YAML") {
		t.Fatalf("want a syntax error, got %v", err)
	}
}

// TestLoadFileTooLarge: a path that is not a configuration file (a device
// such as /dev/zero, a log file) is refused instead of read into memory
// until the process dies.
func TestLoadFileTooLarge(t *testing.T) {
	done := make(chan error, 1)
	go func() {
		_, err := LoadFile("/dev/zero")
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "larger than") {
			t.Fatalf("want a size error, got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("LoadFile(/dev/zero) did not return within 5s")
	}
	// A file of a legitimate size still loads.
	p := filepath.Join(t.TempDir(), "ok.yaml")
	os.WriteFile(p, []byte(good), 0o600)
	if _, err := LoadFile(p); err != nil {
		t.Fatal(err)
	}
}

// TestByteSizeOverflow: a size whose number times its unit does not fit
// in 64 bits wrapped around: "18014398509482240KiB" was taken as 256KiB.
func TestByteSizeOverflow(t *testing.T) {
	for _, s := range []string{"18014398509482240KiB", "9223372036854775807GiB", "9300000000000000000"} {
		if v, err := ParseByteSize(s); err == nil {
			t.Errorf("ParseByteSize(%q) = %d, want an error", s, v)
		}
	}
	in := "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      mode: bytes\n      bytes: 1MiB\n      socket_buffer: 18014398509482240KiB\n"
	if cfg, err := Parse("big.yaml", []byte(in)); err == nil {
		t.Fatalf("accepted socket_buffer 18014398509482240KiB as %d bytes", cfg.Services[0].Splice.SocketBuffer)
	}
	if v, err := ParseByteSize("8EiB"); err == nil {
		t.Errorf("8EiB: %d", v)
	}
	if v, err := ParseByteSize("1GiB"); err != nil || v != 1<<30 {
		t.Errorf("1GiB: %d, %v", v, err)
	}
}

// TestMappedPrefix: an IPv4-mapped IPv6 prefix (::ffff:10.9.0.0/112) was
// kept as an IPv6 prefix, while the flows it is meant for have IPv4
// addresses: an access rule with it never matched (a deny let every flow
// through) and a service with it intercepted nothing. A bare mapped
// address was already unmapped.
func TestMappedPrefix(t *testing.T) {
	in := "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    access:\n      rules:\n        - action: deny\n          sources: [\"::ffff:10.9.0.0/112\"]\n"
	cfg, err := Parse("mapped.yaml", []byte(in))
	if err != nil {
		// Refusing it with a message naming the IPv4 prefix is fine too.
		if !strings.Contains(err.Error(), "10.9.0.0/16") {
			t.Fatalf("error does not name the IPv4 prefix: %v", err)
		}
		return
	}
	got := cfg.Services[0].Access.Decide(netip.MustParseAddr("10.9.1.2"), netip.MustParseAddrPort("10.2.0.1:80"))
	if got != Deny {
		t.Fatalf("a client in ::ffff:10.9.0.0/112 (10.9.0.0/16) got %s, want deny", got)
	}
}

// TestSecondDocumentRefused: YAML reads a "---" line as the start of
// another document, and only the first was read: a file split in two at
// a "---" (or two files concatenated) validated, and every key after it,
// services included, was dropped without a word; the daemon intercepted
// nothing. A second document is refused, at its line, whether it parses
// or not; a "---" that opens the file, or one with nothing after it, is
// harmless.
func TestSecondDocumentRefused(t *testing.T) {
	for _, c := range []struct{ in, line string }{
		{"log:\n  level: info\n---\nservices:\n  - name: web\n    listen: 15001\n    ports: [\"80\"]\n", "line 3:"},
		{"---\nlog:\n  level: info\n---\nkernel:\n  table: other\n", "line 4:"},
		{"log:\n  level: info\n---\nservices:\n  - name: a\n   listen: 1\n", "line 4:"}, // not valid YAML either: the parser's line
	} {
		_, err := Parse("two.yaml", []byte(c.in))
		if err == nil || !strings.Contains(err.Error(), "two.yaml: "+c.line) || !strings.Contains(err.Error(), "second YAML document") {
			t.Errorf("%q: %v; want an error at %s naming the second YAML document", c.in, err, c.line)
		}
	}
	for _, in := range []string{
		"---\nlog:\n  level: debug\n",
		"log:\n  level: debug\n---\n",
		"log:\n  level: debug\n---\n# nothing here\n",
		"log:\n  level: debug\n...\n",
	} {
		cfg, err := Parse("one.yaml", []byte(in))
		if err != nil || cfg.Log.Level != "debug" {
			t.Errorf("%q: %v; want it read as one document", in, err)
		}
	}
}

// TestWholeNumberOutOfRange: a whole number too large (or negative) for
// its key was refused as "not a whole number; use digits such as 100",
// which it is, in digits: the message must say the number is out of
// range and what range to use.
func TestWholeNumberOutOfRange(t *testing.T) {
	for _, c := range []struct{ in, key, want string }{
		{"kernel:\n  queue: 70000\n", "line 2: kernel.queue:", "0 to 65535"},
		{"kernel:\n  route_table: -1\n", "line 2: kernel.route_table:", "0 to 4294967295"},
		{"kernel:\n  queue_len: 0x100000000\n", "line 2: kernel.queue_len:", "0 to 4294967295"},
		{"limits:\n  max_flows: 99999999999999999999\n", "line 2: limits.max_flows:", "9223372036854775807"},
	} {
		_, err := Parse("range.yaml", []byte(c.in))
		if err == nil {
			t.Errorf("%q: accepted", c.in)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, c.key) || !strings.Contains(msg, "out of range") || !strings.Contains(msg, c.want) || strings.Contains(msg, "not a whole number") {
			t.Errorf("%q: %v; want %s ... out of range ... %s", c.in, msg, c.key, c.want)
		}
	}
	// Not a number at all: the message stays.
	if _, err := Parse("range.yaml", []byte("kernel:\n  queue: abc\n")); err == nil || !strings.Contains(err.Error(), "not a whole number") {
		t.Errorf("a word for a number: %v", err)
	}
}

// TestErrorsPrintable: a key written in double quotes may hold escape
// sequences ("\e[2J", "\r"), and its error (an unknown key) printed the
// key as it is: `splicectl config check` or `spliced -check` of a file
// someone sent wrote the sequence to the terminal, which could clear it,
// retitle the window or overwrite the message. Every byte of an error
// is printable now, the sequences escaped; so is a yaml message that
// quotes the value.
func TestErrorsPrintable(t *testing.T) {
	for _, in := range []string{
		"log:\n  \"lev\\e]0;title\\a\\e[2Jel\\rX\": info\n",
		"\"\\e[2J\\u009b31m\": 1\n",
		"\"\\e[2Jjust a string\"\n",
		"services:\n  - name: a\n    \"\\e[2J\": 1\n",
	} {
		_, err := Parse("evil.yaml", []byte(in))
		if err == nil {
			t.Errorf("%q: accepted", in)
			continue
		}
		msg := err.Error()
		for _, r := range msg {
			if r != '\n' && !unicode.IsPrint(r) {
				t.Errorf("%q: error %q holds %U", in, msg, r)
				break
			}
		}
		if !strings.Contains(msg, `\x1b[2J`) {
			t.Errorf("%q: error %q does not show the escape sequence as \\x1b", in, msg)
		}
	}
}

// TestNullListItems: YAML drops a null item of a list of values (~,
// null, or an item left empty: "- "), so an access rule's `sources:
// [~]` became an empty list, which matches every source: an allow rule
// meant for one network allowed all, and a service's `destinations`
// intercepted every address.
func TestNullListItems(t *testing.T) {
	for _, in := range []string{
		"services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    access:\n      default: deny\n      rules:\n        - action: allow\n          sources: [~]\n",
		"services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    destinations:\n      - \n",
		"services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    sources: [10.1.0.0/16, null]\n",
	} {
		cfg, err := Parse("null.yaml", []byte(in))
		if err == nil {
			s := cfg.Services[0]
			t.Errorf("accepted %q: sources %v, destinations %v, rules %+v", in, s.Sources, s.Destinations, s.Access.Rules)
			continue
		}
		if !strings.Contains(err.Error(), "is empty") {
			t.Errorf("%q: error %v, want one saying the item is empty", in, err)
		}
	}
}
