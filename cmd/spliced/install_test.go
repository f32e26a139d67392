package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMakeInstall installs into a scratch DESTDIR: both binaries, the
// default configuration (valid, and kept when present), the systemd unit
// pointing at them with the capabilities spliced needs and readiness
// notification, a reload that validates the file first, and the bash
// completion.
func TestMakeInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatal("make is not installed")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	run := func() string {
		cmd := exec.Command("make", "-C", root, "install", "DESTDIR="+dest, "PREFIX=/usr", "BIN="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
		return string(out)
	}
	run()
	for _, f := range []string{"usr/bin/spliced", "usr/bin/splicectl", "etc/spliced/spliced.yaml",
		"usr/lib/systemd/system/spliced.service", "usr/share/bash-completion/completions/splicectl"} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("%s not installed: %v", f, err)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "usr/lib/systemd/system/spliced.service"))
	for _, want := range []string{"Type=notify", "ExecStart=/usr/bin/spliced -config /etc/spliced/spliced.yaml", "ExecReload=/bin/kill -HUP $MAINPID",
		"then exec /usr/bin/spliced -cleanup -config /etc/spliced/spliced.yaml; else exec /usr/bin/spliced -cleanup -keep-flows -config", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW", "LimitNOFILE=",
		"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	// The reload validates the file before it signals the daemon.
	if c, k := strings.Index(string(unit), "ExecReload=/usr/bin/spliced -check -config /etc/spliced/spliced.yaml\n"), strings.Index(string(unit), "ExecReload=/bin/kill -HUP"); c < 0 || c > k {
		t.Errorf("unit's ExecReload lines do not run spliced -check before the signal:\n%s", unit)
	}
	if strings.Contains(string(unit), "@") {
		t.Errorf("unit has unfilled placeholders:\n%s", unit)
	}
	check := exec.Command(filepath.Join(dest, "usr/bin/spliced"), "-check", "-config", filepath.Join(dest, "etc/spliced/spliced.yaml"))
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("installed default config does not validate: %v\n%s", err, out)
	}
	if comp, _ := os.ReadFile(filepath.Join(dest, "usr/share/bash-completion/completions/splicectl")); !strings.Contains(string(comp), "complete -F _splicectl splicectl") {
		t.Errorf("completion script:\n%s", comp)
	}
	// A second install keeps the operator's configuration.
	os.WriteFile(filepath.Join(dest, "etc/spliced/spliced.yaml"), []byte("# mine\n"), 0o640)
	if out := run(); !strings.Contains(out, "keeping existing") {
		t.Errorf("second install did not keep the configuration:\n%s", out)
	}
	if b, _ := os.ReadFile(filepath.Join(dest, "etc/spliced/spliced.yaml")); string(b) != "# mine\n" {
		t.Errorf("configuration overwritten: %q", b)
	}
}
