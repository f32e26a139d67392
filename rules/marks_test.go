package rules

import (
	"encoding/binary"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

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

// TestMarkSettersNotForSplicedFlows: marks that no spliced flow's packet
// can get do not count. wg-quick's (a full tunnel: "ip rule not fwmark
// 0xca6c lookup 51820") restores the mark from the connection's for UDP
// only, its own tunnel's packets, nft's "meta l4proto udp" or
// iptables-nft's "-p udp -j CONNMARK --restore-mark"; a nat chain
// (kube-proxy's KUBE-MARK-MASQ, "meta mark set meta mark or 0x4000")
// sees only a connection's first packet, never an untracked one.
func TestMarkSettersNotForSplicedFlows(t *testing.T) {
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	m := NewManager(sampleSpec(t), WithNetNS(fd))
	loadRuleset(t, ns, `
table ip wg-quick-wg0 {
	chain preraw { type filter hook prerouting priority raw; iifname != "wg0" ip daddr 10.64.0.2 fib saddr type != local drop; }
	chain premangle { type filter hook prerouting priority mangle; meta l4proto udp meta mark set ct mark; }
	chain postmangle { type filter hook postrouting priority mangle; meta l4proto udp meta mark 0x0000ca6c ct mark set meta mark; }
}
table ip6 dns {
	chain pre { type filter hook prerouting priority mangle; udp dport 53 meta mark set 0x1; }
}
table ip kube-proxy {
	chain mark-for-masquerade { meta mark set meta mark or 0x4000; }
	chain nat-prerouting { type nat hook prerouting priority dstnat; ip saddr != 10.244.0.0/16 jump mark-for-masquerade; }
	chain nat-output { type nat hook output priority -100; ip daddr 10.96.0.0/12 jump mark-for-masquerade; }
}
`)
	// iptables-nft's "-p udp" in table ip: the protocol byte of the
	// header.
	tbl := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "mangle"}
	c, err := nftConn(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	c.AddTable(tbl)
	pre := c.AddChain(&nftables.Chain{Name: "PREROUTING", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	info := make(xt.Unknown, 16)
	info[14] = 2 // --restore-mark
	c.AddRule(&nftables.Rule{Table: tbl, Chain: pre, Exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 9, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Counter{}, &expr.Target{Name: "CONNMARK", Rev: 2, Info: &info}}})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	s, err := m.MarkSetters()
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 0 {
		t.Errorf("found %v, want none", s)
	}

	// The same marks for TCP, or set before the protocol is matched, do
	// count.
	loadRuleset(t, ns, `
table ip tcpmarks {
	chain pre { type filter hook prerouting priority mangle; meta l4proto tcp meta mark set ct mark; }
	chain out { type route hook output priority mangle; meta l4proto != udp meta mark set 0x10; }
	chain first { type filter hook prerouting priority mangle - 1; meta mark set 0x20 meta l4proto udp counter; }
}
`)
	if s, err = m.MarkSetters(); err != nil {
		t.Fatal(err)
	}
	want := []MarkSetter{
		{Family: "ip", Table: "tcpmarks", Chain: "pre", Hook: "prerouting", FromConntrack: true},
		{Family: "ip", Table: "tcpmarks", Chain: "out", Hook: "output"},
		{Family: "ip", Table: "tcpmarks", Chain: "first", Hook: "prerouting"},
	}
	slices.SortFunc(s, func(a, b MarkSetter) int { return strings.Compare(a.Chain, b.Chain) })
	slices.SortFunc(want, func(a, b MarkSetter) int { return strings.Compare(a.Chain, b.Chain) })
	if !slices.Equal(s, want) {
		t.Errorf("found %v, want %v", s, want)
	}
}
