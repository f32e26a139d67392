package main

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"spliced/testnet"
)

// TestDemo runs the README's first command as `make demo` runs it: the
// spliced-demo binary with the daemon's, 200 MB each way. A new user's
// first `sudo make demo` once failed on a bare machine with no test to
// see it. It must end well, say the bytes arrived intact and that the
// flow was spliced, and leave no namespace of its lab behind.
func TestDemo(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t)
	daemon := testnet.Binary(t, "spliced")
	demo := testnet.Binary(t, "spliced-demo")
	out, err := exec.Command(demo, "-spliced", daemon).CombinedOutput()
	if err != nil {
		t.Fatalf("spliced-demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"its table (the kernel has it",
		"sending 200 MB each way",
		"splice took ",
		"after the splice, rewritten packet by packet",
		"sha256 equal both ways",
		"lab removed",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, out)
		}
	}
	m := regexp.MustCompile(`(?m)^lab (\S+):`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("the demo did not name its lab:\n%s", out)
	}
	ns, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ns), string(m[1])) {
		t.Errorf("namespaces of the demo's lab %s are left:\n%s", m[1], ns)
	}
	t.Logf("%s", out)
}
