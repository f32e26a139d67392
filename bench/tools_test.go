package bench

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// Every tool of a full run is in deps.sh's bench group, which make bench
// installs.
func TestToolsInDepsBenchGroup(t *testing.T) {
	out, err := exec.Command("bash", "../scripts/deps.sh", "--list").Output()
	if err != nil {
		t.Fatalf("deps.sh --list: %v", err)
	}
	bench := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && slices.Contains(f[2:], "bench") {
			bench[f[0]] = true
		}
	}
	for _, tool := range Tools(Options{}) {
		if tool != "cat" && !bench[tool] { // cat: coreutils, always there
			t.Errorf("the benchmark runs %s, which deps.sh's bench group lacks", tool)
		}
	}
	if got := Tools(Options{Only: []string{"latency"}}); !slices.Equal(got, []string{"ip"}) {
		t.Errorf("latency alone needs %v, want [ip]", got)
	}
	for only, want := range map[string][]string{
		"dante":                 {"ip", "ss", "danted"},
		"socks":                 {"ip", "ss", "danted"},
		"spliced-socks5-splice": {"ip", "ss"},
		"httppeers":             {"ip", "nginx", "wrk", "ss", "haproxy"},
		"spliced-http-copy":     {"ip", "nginx", "wrk", "ss"},
	} {
		if got := Tools(Options{Only: []string{only}}); !slices.Equal(got, want) {
			t.Errorf("%s needs %v, want %v", only, got, want)
		}
	}
}

// A missing tool fails the run at once, before any lab or measure,
// naming the tool and its package.
func TestRunWithoutToolsFailsAtOnce(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Run(Options{Quick: true})
	if err == nil {
		t.Fatal("Run succeeded without any tool in PATH")
	}
	for _, want := range []string{"iperf3 (Debian package iperf3)", "haproxy (Debian package haproxy)", "wrk (Debian package wrk)", "nginx (Debian package nginx-light)", "danted (Debian package dante-server)", "-only"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %q: %v", want, err)
		}
	}
}
