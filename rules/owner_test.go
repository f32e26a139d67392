package rules

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	"spliced/splice"
	"spliced/testnet"
)

// TestOwnedTable: a table installed with OwnTable belongs to the
// Manager's socket. Another process's `nft flush ruleset` leaves it and
// its divert entries; its `nft delete table`, an added rule and an
// element deleted are refused; another Manager (a second daemon) cannot
// install it, and a clean-up names the owner. When the owner's socket
// closes (a daemon killed) the table stays with its entries, the drift
// check reports it, and a repair or the next Manager's install adopts
// it: then it is protected again, and its Remove deletes it.
func TestOwnedTable(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	k := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	element := "10.1.0.2 . 40000 . 10.2.0.2 . 80"

	first := NewManager(spec, WithNetNS(fd))
	t.Cleanup(func() { first.Close() })
	if err := first.Install(nil); err != nil {
		t.Fatal(err)
	}
	d, err := first.NewDiverter()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Add(1, k); err != nil {
		t.Fatal(err)
	}
	protected := func(stage string) {
		t.Helper()
		if out, err := ns.Run("nft", "flush", "ruleset"); err != nil {
			t.Fatalf("%s: nft flush ruleset: %v: %s", stage, err, out)
		}
		out, err := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false))
		if err != nil || !strings.Contains(out, element) {
			t.Errorf("%s: after nft flush ruleset the divert set is %q (%v), want the table with its element", stage, out, err)
		}
		for _, cmd := range [][]string{
			{"delete", "table", "inet", spec.Table},
			{"add", "rule", "inet", spec.Table, ChainPrerouting, "counter"},
			{"delete", "element", "inet", spec.Table, DivertSetName(1, false), "{ " + element + " }"},
		} {
			out, err := ns.Run("nft", cmd...)
			if err == nil || !strings.Contains(err.Error(), "Operation not permitted") {
				t.Errorf("%s: nft %s: %v: %s; want it refused (Operation not permitted)", stage, strings.Join(cmd, " "), err, out)
			}
		}
	}
	protected("owned")

	second := NewManager(spec, WithNetNS(fd))
	t.Cleanup(func() { second.Close() })
	if err := second.Install(nil); !errors.Is(err, ErrTableOwned) || !strings.Contains(err.Error(), "another spliced") {
		t.Errorf("a second Manager's install: %v, want the table owned by another process", err)
	}
	if err := Cleanup(spec, fd); !errors.Is(err, ErrTableOwned) {
		t.Errorf("clean-up of a table owned by a live Manager: %v, want ErrTableOwned", err)
	}

	// The owner's socket closes as it does when its process dies.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false))
	if err != nil || !strings.Contains(out, element) {
		t.Fatalf("orphaned table: divert set %q (%v), want the element kept", out, err)
	}
	// An orphaned table is drift (nobody protects it), which a repair
	// ends by adopting it.
	drift := func() string {
		t.Helper()
		listed, err := ns.Run("nft", "list", "table", "inet", spec.Table)
		if err != nil {
			t.Fatal(err)
		}
		return UnifiedDiff("expected", "kernel", Listing(second.Spec()), canonicalQueues(StripRuntime(listed)))
	}
	if diff := drift(); !strings.Contains(diff, "+\tflags") {
		t.Errorf("orphaned table: drift %q; want its flags line", diff)
	}
	if err := second.Repair(map[uint16][]splice.Key{1: {k}}); err != nil {
		t.Fatalf("repairing (adopting) the orphaned table: %v", err)
	}
	if diff := drift(); diff != "" {
		t.Errorf("adopted table: drift %q; want none", diff)
	}
	protected("adopted by a repair")
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	if err := second.Install(map[uint16][]splice.Key{1: {k}}); err != nil {
		t.Fatalf("adopting the orphaned table: %v", err)
	}
	protected("adopted by an install")
	if err := second.Remove(); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Run("nft", "list", "tables"); err != nil || strings.Contains(out, spec.Table) {
		t.Errorf("after Remove: tables %q (%v), want ours gone", out, err)
	}
}

// TestOwnedTableSwitch: a daemon that owns its table takes over an
// unowned one (an earlier spliced's, or one of `kernel.own_table: off`),
// with the entries it is given; one with OwnTable off replaces an
// orphaned owned table with an unowned one that nft may change.
func TestOwnedTableSwitch(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	k := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	unowned := spec
	unowned.OwnTable = false
	install := func(spec Spec) *Manager {
		t.Helper()
		m := NewManager(spec, WithNetNS(fd))
		if err := m.Install(map[uint16][]splice.Key{1: {k}}); err != nil {
			t.Fatalf("install with OwnTable %v: %v", spec.OwnTable, err)
		}
		return m
	}
	m := install(unowned)
	if out, err := ns.Run("nft", "add", "rule", "inet", spec.Table, ChainPrerouting, "counter"); err != nil {
		t.Fatalf("an unowned table refused nft: %v: %s", err, out)
	}
	m.Close()
	m = install(spec)
	if out, err := ns.Run("nft", "add", "rule", "inet", spec.Table, ChainPrerouting, "counter"); err == nil {
		t.Errorf("the table taken over from an unowned one let nft add a rule: %s", out)
	}
	if out, err := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false)); err != nil || !strings.Contains(out, "10.1.0.2 . 40000") {
		t.Errorf("taken over: divert set %q (%v), want the entry given", out, err)
	}
	m.Close() // orphaned
	m = install(unowned)
	defer m.Close()
	if out, err := ns.Run("nft", "add", "rule", "inet", spec.Table, ChainPrerouting, "counter"); err != nil {
		t.Errorf("the unowned table replacing an orphaned one refused nft: %v: %s", err, out)
	}
	if out, err := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false)); err != nil || !strings.Contains(out, "10.1.0.2 . 40000") {
		t.Errorf("unowned again: divert set %q (%v), want the entry given", out, err)
	}
}

// TestDivertAddNoSocket: an add that fails because the Manager's socket
// cannot be opened leaves nothing behind that a later add commits: its
// caller was told it failed, and went on without its entries.
func TestDivertAddNoSocket(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	m := NewManager(spec, WithNetNS(fd))
	t.Cleanup(func() { m.Close() })
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	d, err := m.NewDiverter()
	if err != nil {
		t.Fatal(err)
	}
	failed := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	later := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40001"), netip.MustParseAddrPort("10.2.0.2:80"))
	// No socket: closed, and its namespace is not one.
	notNS, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer notNS.Close()
	m.Close()
	m.netns = int(notNS.Fd())
	if err := d.Add(1, failed); err == nil {
		t.Fatal("an add without a socket succeeded")
	}
	m.netns = fd
	if err := d.Add(1, later); err != nil {
		t.Fatal(err)
	}
	if ok, err := d.Has(1, later); err != nil || !ok {
		t.Errorf("the later add: in the set %v (%v), want it there", ok, err)
	}
	if ok, err := d.Has(1, failed); err != nil || ok {
		t.Errorf("the failed add: in the set %v (%v), want it not committed by the later one", ok, err)
	}
}
