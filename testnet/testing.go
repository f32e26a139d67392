package testnet

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Privileged marks a test that needs root. Without root it skips with the
// reason; as root it never skips, so a CI run (always root) cannot hide a
// missing test behind a skip. Tools that the test needs must be installed:
// as root a missing tool fails the test instead of skipping it.
func Privileged(t testing.TB, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("privileged lab test: needs root for network namespaces (run `make test` as root)")
	}
	if err := CheckTools(tools...); err != nil {
		t.Fatal(err)
	}
}

// NewT builds a lab for a test and removes it in t.Cleanup, also when the
// test fails.
func NewT(t testing.TB, opt Options) *Lab {
	t.Helper()
	Privileged(t, "ip")
	lab, err := New(opt)
	if err != nil {
		t.Fatalf("build lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("SPLICED_LAB_DROPS") != "" {
			// Where the lab's kernel lost packets: a flake's first clue
			// (a SYN lost three times, an overflowing accept queue).
			// SPLICED_LAB_DROPS=1 shows it for passing tests too.
			t.Logf("lab drops at the failure:\n%s", lab.DropReport())
		}
		if err := lab.Close(); err != nil {
			t.Errorf("remove lab: %v", err)
		}
	})
	return lab
}

// Eventually polls cond every 10 ms until it returns nil or the deadline
// passes; then it fails the test with cond's last error. Use it instead of
// sleeping for readiness.
func Eventually(t testing.TB, within time.Duration, cond func() error) {
	t.Helper()
	if err := Poll(within, cond); err != nil {
		t.Fatal(err)
	}
}

// Poll is Eventually without a test: it returns cond's last error when the
// deadline passes.
func Poll(within time.Duration, cond func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still failing after %v: %w", within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func runHost(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Scratch creates a single empty namespace (loopback up) for tests of one
// layer, such as nftables round trips, and removes it in t.Cleanup.
func Scratch(t testing.TB) *NS {
	t.Helper()
	Privileged(t, "ip")
	SweepStale()
	name := fmt.Sprintf("%s%d-%d-x", Prefix, os.Getpid(), labCounter.Add(1))
	if out, err := runHost("ip", "netns", "add", name); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := runHost("ip", "netns", "del", name); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ns := &NS{Name: name}
	if _, err := ns.Run("ip", "link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}
	return ns
}

// OpenT is NS.Open for tests: the descriptor is closed in t.Cleanup.
func (n *NS) OpenT(t testing.TB) int {
	t.Helper()
	fd, err := n.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscallClose(fd) })
	return fd
}
