package testnet

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const depsScript = "../scripts/deps.sh"

// depsEntry is one line of `scripts/deps.sh --list`.
type depsEntry struct {
	tool, pkg string
	groups    []string
}

func depsList(t *testing.T) []depsEntry {
	t.Helper()
	out, err := exec.Command("bash", depsScript, "--list").Output()
	if err != nil {
		t.Fatalf("deps.sh --list: %v", err)
	}
	var list []depsEntry
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("deps.sh --list: line %q has no groups", line)
		}
		list = append(list, depsEntry{f[0], f[1], f[2:]})
	}
	return list
}

// The Debian packages that CheckTools names are the ones deps.sh installs.
func TestToolPackagesMatchDepsScript(t *testing.T) {
	inScript := map[string]bool{}
	for _, e := range depsList(t) {
		if e.tool == "scapy" || e.tool == "ca-certs" || e.tool == "libbpf" {
			continue // not commands
		}
		inScript[e.tool] = true
		if got := DebianPackage(e.tool); got != e.pkg {
			t.Errorf("%s: deps.sh installs %s, DebianPackage says %q", e.tool, e.pkg, got)
		}
	}
	for tool := range debianPackages {
		if !inScript[tool] {
			t.Errorf("%s is in debianPackages but not in deps.sh", tool)
		}
	}
}

// runDeps runs deps.sh with PATH set to path only and returns its output
// and exit code.
func runDeps(t *testing.T, path string, args ...string) (string, int) {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bash, append([]string{depsScript}, args...)...)
	cmd.Env = []string{"PATH=" + path}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(out), exit.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

// deps.sh names exactly the tools missing from PATH, with their Debian
// packages, and exits 1 without installing anything when it must not
// (check only) or cannot (no apt-get in PATH: not a Debian system as far
// as it can tell). The PATH holds stubs, so the test needs no package
// and no root.
func TestDepsScriptNamesMissingTools(t *testing.T) {
	dir := t.TempDir()
	for _, e := range depsList(t) {
		name := e.tool
		switch name {
		case "ca-certs", "libbpf":
			continue // files, not commands
		case "scapy":
			name = "python3" // `python3 -c 'import scapy'` succeeds
		}
		stub := "#!/bin/sh\nexit 0\n"
		if name == "nc" {
			stub = "#!/bin/sh\necho 'OpenBSD netcat (stub)' >&2\nexit 1\n" // as nc -h
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(stub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	_, caErr := os.Stat("/etc/ssl/certs/ca-certificates.crt")
	_, libbpfErr := os.Stat("/usr/include/bpf/bpf_helpers.h")
	caMissing := caErr != nil || libbpfErr != nil // files the stubs cannot stand in for

	out, code := runDeps(t, dir, "--check", "all")
	if want := map[bool]int{false: 0, true: 1}[caMissing]; code != want {
		t.Fatalf("every stub present: exit %d, want %d; output:\n%s", code, want, out)
	}

	for _, tool := range []string{"nft", "iperf3", "hping3", "ip"} {
		if err := os.Remove(filepath.Join(dir, tool)); err != nil {
			t.Fatal(err)
		}
	}
	rcd, rcdErr := os.Stat("/usr/sbin/policy-rc.d")
	for _, tc := range []struct {
		name string
		args []string
		say  string // what it says about not installing
	}{
		{"check only", []string{"--check", "test"}, "check only"},
		{"install without apt-get", []string{"test"}, "not a Debian or Ubuntu system"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := runDeps(t, dir, tc.args...)
			if code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			for _, want := range []string{"nft (nftables)", "iperf3 (iperf3)", "hping3 (hping3)", "ip (iproute2)", tc.say} {
				if !strings.Contains(out, want) {
					t.Errorf("output does not name %q:\n%s", want, out)
				}
			}
			for _, present := range []string{"curl", "nginx", "wrk", "ss ("} {
				if strings.Contains(out, present) {
					t.Errorf("output names %q, which is in PATH:\n%s", present, out)
				}
			}
			if strings.Contains(out, "installing") {
				t.Errorf("it tried to install:\n%s", out)
			}
		})
	}
	if after, err := os.Stat("/usr/sbin/policy-rc.d"); (err == nil) != (rcdErr == nil) || (err == nil && !os.SameFile(rcd, after)) {
		t.Errorf("deps.sh changed /usr/sbin/policy-rc.d without installing anything")
	}

	// The groups are separate: bench does not need hping3, check none of
	// the removed tools.
	out, code = runDeps(t, dir, "--check", "bench")
	if code != 1 || strings.Contains(out, "hping3") || !strings.Contains(out, "iperf3 (iperf3)") {
		t.Errorf("--check bench: exit %d, want 1 naming iperf3 but not hping3:\n%s", code, out)
	}
	if !caMissing {
		if out, code := runDeps(t, dir, "--check", "check"); code != 0 {
			t.Errorf("--check check: exit %d, want 0:\n%s", code, out)
		}
	}
	// Another netcat owns the name nc: deps.sh and CheckTools say so.
	if err := os.WriteFile(filepath.Join(dir, "nc"), []byte("#!/bin/sh\necho '[v1.10-47]' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, code := runDeps(t, dir, "--check", "test"); code != 1 || !strings.Contains(out, "nc (netcat-openbsd; the nc in PATH") {
		t.Errorf("another nc: exit %d, want 1 naming nc as not OpenBSD's:\n%s", code, out)
	}
	if out, code := runDeps(t, dir, "--check", "nonsense"); code != 2 || !strings.Contains(out, "unknown group nonsense") {
		t.Errorf("unknown group: exit %d, want 2:\n%s", code, out)
	}
	// (last: runDeps looks bash up in PATH)
	t.Setenv("PATH", dir)
	if err := CheckTools("nc", "curl"); err == nil || !strings.Contains(err.Error(), "is not OpenBSD's netcat") || strings.Contains(err.Error(), "curl") {
		t.Errorf("CheckTools with another nc: %v", err)
	}
}
