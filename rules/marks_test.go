package rules

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"

	"spliced/testnet"
)

// TestMarkSetters: the chains that prerouting and output base chains of
// other tables reach (jumps, gotos, verdict maps) and that set the
// packet mark are found, with a mark taken from the connection's told
// apart; the forward hook, a chain no base chain reaches and our own
// table are not.
func TestMarkSetters(t *testing.T) {
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	m := NewManager(sampleSpec(t), WithNetNS(fd))
	got := func() []MarkSetter {
		t.Helper()
		s, err := m.MarkSetters()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if s := got(); len(s) != 0 {
		t.Fatalf("no ruleset: found %v", s)
	}
	if err := m.Install(nil); err != nil { // ours sets marks in prerouting
		t.Fatal(err)
	}
	loadRuleset(t, ns, `
table inet pbr {
	map by_iif { type ifname : verdict; elements = { "lan0" : jump mark_vpn } }
	chain prerouting { type filter hook prerouting priority mangle; iifname vmap @by_iif; ip saddr 10.9.0.0/16 goto mark_wan2; }
	chain mark_vpn { meta mark set meta mark | 0x10; }
	chain mark_wan2 { meta mark set 0x20; }
	chain unreached { meta mark set 0x40; }
	chain output { type route hook output priority mangle; ip daddr 10.2.0.0/16 jump mark_vpn; }
	chain forward { type filter hook forward priority mangle; meta mark set 0x80; }
}
table ip mwan {
	chain prerouting { type filter hook prerouting priority mangle; meta mark set ct mark; }
}
`)
	want := []MarkSetter{
		{Family: "inet", Table: "pbr", Chain: "mark_vpn", Hook: "prerouting"},
		{Family: "inet", Table: "pbr", Chain: "mark_wan2", Hook: "prerouting"},
		{Family: "inet", Table: "pbr", Chain: "mark_vpn", Hook: "output"},
		{Family: "ip", Table: "mwan", Chain: "prerouting", Hook: "prerouting", FromConntrack: true},
	}
	s := got()
	for _, w := range want {
		if !slices.Contains(s, w) {
			t.Errorf("%v not found in %v", w, s)
		}
	}
	if len(s) != len(want) {
		t.Errorf("found %v, want %v", s, want)
	}

	// iptables-nft's MARK and CONNMARK targets (xt_connmark_tginfo2:
	// ctmark, ctmask, nfmask, shift_dir, shift_bits, mode).
	tbl := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "mangle"}
	c, err := nftConn(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	c.AddTable(tbl)
	pre := c.AddChain(&nftables.Chain{Name: "PREROUTING", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	connmark := func(mode byte) *expr.Target {
		info := make(xt.Unknown, 16)
		binary.NativeEndian.PutUint32(info[4:], 0xffffffff)
		binary.NativeEndian.PutUint32(info[8:], 0xffffffff)
		info[14] = mode
		return &expr.Target{Name: "CONNMARK", Rev: 2, Info: &info}
	}
	const save, restore = 1, 2
	c.AddRule(&nftables.Rule{Table: tbl, Chain: pre, Exprs: []expr.Any{&expr.Counter{}, connmark(save)}})
	if err := c.Flush(); err != nil {
		t.Fatalf("add CONNMARK --save-mark: %v", err)
	}
	ipt := MarkSetter{Family: "ip", Table: "mangle", Chain: "PREROUTING", Hook: "prerouting"}
	if s := got(); slices.ContainsFunc(s, func(m MarkSetter) bool { return m.Table == "mangle" }) {
		t.Errorf("CONNMARK --save-mark taken for a mark setter: %v", s)
	}
	c.AddRule(&nftables.Rule{Table: tbl, Chain: pre, Exprs: []expr.Any{&expr.Counter{}, connmark(restore)}})
	if err := c.Flush(); err != nil {
		t.Fatalf("add CONNMARK --restore-mark: %v", err)
	}
	ipt.FromConntrack = true
	if s := got(); !slices.Contains(s, ipt) {
		t.Errorf("CONNMARK --restore-mark: %v not found in %v", ipt, s)
	}
}

// TestMarkRules: ip rules that select by firewall mark are listed, with
// "not" for an inverted one; spliced's own and others are not.
func TestMarkRules(t *testing.T) {
	testnet.Privileged(t, "ip")
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	m := NewManager(sampleSpec(t), WithNetNS(fd))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"ip", "rule", "add", "fwmark", "0x10/0x10", "lookup", "200", "priority", "30000"},
		{"ip", "-6", "rule", "add", "not", "fwmark", "0xca6c", "lookup", "51820", "priority", "31000"},
		{"ip", "rule", "add", "from", "10.9.0.0/16", "lookup", "300", "priority", "32000"},
	} {
		if out, err := ns.Run(args[0], args[1:]...); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	got, err := m.MarkRules()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"IPv4 rule 30000: fwmark 0x10/0x10 lookup 200", "IPv6 rule 31000: not fwmark 0xca6c/0xffffffff lookup 51820"}
	if !slices.Equal(got, want) {
		t.Errorf("MarkRules: %q, want %q", got, want)
	}
}
