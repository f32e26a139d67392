package testnet

import (
	"testing"

	"golang.org/x/sys/unix"
)

// BPFFS mounts a bpf file system of the test's own on a temporary
// directory of the host and returns it, for a daemon's kernel.bpffs:
// pins there outlive the daemon (a daemon started with `ip netns exec`
// has a mount namespace of its own, in which a bpffs it mounts itself
// goes away with it). The mount, and whatever is still pinned in it, goes
// in t.Cleanup: no pin outlives the test.
func BPFFS(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}
