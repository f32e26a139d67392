package rules

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"

	"spliced/testnet"
)

// TestUntrackedDrops: the forward chains that would drop spliced flows'
// (untracked) packets are found in the rulesets routers use, and those
// that let them through are not.
func TestUntrackedDrops(t *testing.T) {
	testnet.Privileged(t, "nft")
	for _, tc := range []struct {
		name    string
		ruleset string
		want    []string
	}{
		{"stateful forward", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state established,related accept
				ct state invalid drop
				iifname "lan0" accept
			}
		}`, []string{"table inet filter chain forward"}},
		{"untracked accepted", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state established,related accept
				ct state untracked accept
			}
		}`, nil},
		{"untracked in the same set", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state established,related,untracked counter accept
			}
		}`, nil},
		{"verdict map without untracked", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state vmap { established : accept, related : accept, invalid : drop }
			}
		}`, []string{"table inet filter chain forward"}},
		{"verdict map with untracked", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state vmap { established : accept, related : accept, untracked : accept, invalid : drop }
			}
		}`, nil},
		{"in a chain jumped to", `table inet filter {
			chain states {
				ct state untracked accept
			}
			chain forward { type filter hook forward priority 0; policy drop;
				jump states
			}
		}`, nil},
		{"policy accept", `table inet filter {
			chain forward { type filter hook forward priority 0; policy accept;
				ct state invalid drop
			}
		}`, nil},
		{"untracked dropped, ip and ip6 tables", `table ip fw4 {
			chain fw_forward { type filter hook forward priority 0; policy drop;
				ct state untracked drop
				ct state established accept
			}
		}
			table ip6 fw6 {
			chain fw_forward { type filter hook forward priority 0; policy drop;
			}
		}
			table inet in { chain input { type filter hook input priority 0; policy drop;
			}
		}`,
			[]string{"table ip fw4 chain fw_forward", "table ip6 fw6 chain fw_forward"}},
		{"state compared, not tested for any bit", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state & untracked == 0 accept
				ct state & (established|untracked) == established accept
				ct state != untracked accept
			}
		}`, []string{"table inet filter chain forward"}},
		{"other states compared", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state != established accept
			}
		}`, nil},
		{"untracked in an anonymous set", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state { established, related, untracked } accept
			}
		}`, nil},
		{"untracked out of an inverted set", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state != { established, related, untracked } accept
			}
		}`, []string{"table inet filter chain forward"}},
		{"untracked dropped first", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state invalid,untracked drop
				ct state untracked accept
			}
		}`, []string{"table inet filter chain forward"}},
		{"policy accept, ends in reject", `table inet firewalld {
			chain filter_FORWARD { type filter hook forward priority 10; policy accept;
				ct state { established, related } accept
				ct status dnat accept
				iifname "lo" accept
				ct state invalid drop
				jump filter_FORWARD_POLICIES
				reject with icmpx admin-prohibited
			}
			chain filter_FORWARD_POLICIES {
				iifname "lan0" oifname "wan0" accept
				iifname "lan0" reject
			}
		}`, []string{"table inet firewalld chain filter_FORWARD"}},
		{"policy accept, a guarded reject", `table inet filter {
			chain forward { type filter hook forward priority 0; policy accept;
				ct state established,related accept
				iifname "wan0" reject
			}
		}`, nil},
		{"fw4", `table inet fw4 {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state vmap { established : accept, related : accept }
				iifname "br-lan" jump forward_lan
				jump handle_reject
			}
			chain forward_lan {
				jump accept_to_wan
			}
			chain accept_to_wan {
				oifname "wan" counter accept
			}
			chain handle_reject {
				meta l4proto tcp reject with tcp reset
				reject
			}
		}`, []string{"table inet fw4 chain forward"}},
		{"in a chain a verdict map jumps to", `table inet filter {
			chain lan {
				ct state untracked accept
			}
			chain forward { type filter hook forward priority 0; policy drop;
				iifname vmap { "lo" : accept, "lan0" : jump lan }
			}
		}`, nil},
		{"a chain jumped to for untracked packets", `table inet filter {
			chain untracked_ok {
				counter accept
			}
			chain forward { type filter hook forward priority 0; policy drop;
				ct state vmap { established : accept, untracked : jump untracked_ok }
			}
		}`, nil},
		{"accept everything", `table ip filter {
			chain forward { type filter hook forward priority 0; policy drop;
				counter accept
			}
		}`, nil},
		{"accepted on another conntrack key too", `table inet filter {
			chain forward { type filter hook forward priority 0; policy drop;
				ct state untracked ct mark 0x1 accept
				ct status dnat accept
			}
		}`, []string{"table inet filter chain forward"}},
		{"our own table", `table inet spl_rt {
			chain forward { type filter hook forward priority 0; policy drop;
			}
		}`, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := testnet.Scratch(t)
			loadRuleset(t, ns, tc.ruleset+"\n")
			m := NewManager(sampleSpec(t), WithNetNS(ns.OpenT(t)))
			drops, err := m.UntrackedDrops()
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, d := range drops {
				got = append(got, d.String())
			}
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("found %q, want %q", got, tc.want)
			}
			for _, d := range drops {
				if _, err := ns.Run("sh", "-c", d.Fix()); err != nil {
					t.Errorf("the fix %q: %v", d.Fix(), err)
				}
			}
			if drops, err := m.UntrackedDrops(); err != nil || len(drops) > 0 {
				t.Errorf("after the fixes: %v, %v; want none", drops, err)
			}
		})
	}
}

// loadRuleset loads ruleset into ns with nft -f.
func loadRuleset(t *testing.T, ns *testnet.NS, ruleset string) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "ruleset.nft")
	if err := os.WriteFile(file, []byte(ruleset), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Run("nft", "-f", file); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
}

// TestUntrackedDropsIptables: iptables-nft's FORWARD chain (policy drop,
// "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", as Docker
// leaves it) is found, the fix is an iptables command (a native nft rule
// would make iptables refuse to list its table), and the rule that
// command adds ("-m conntrack --ctstate UNTRACKED -j ACCEPT") is read
// as letting spliced flows through; an inverted one is not.
func TestUntrackedDropsIptables(t *testing.T) {
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	fd := ns.OpenT(t)
	const (
		established = 1 << 1 // XT_CONNTRACK_STATE_BIT(IP_CT_ESTABLISHED)
		related     = 1 << 2
	)
	states := func(mask uint16, invert bool) *expr.Match {
		base := xt.ConntrackMtinfoBase{MatchFlags: uint16(xt.ConntrackState)}
		if invert {
			base.InvertFlags = uint16(xt.ConntrackState)
		}
		return &expr.Match{Name: "conntrack", Rev: 3, Info: &xt.ConntrackMtinfo3{ConntrackMtinfo2: xt.ConntrackMtinfo2{ConntrackMtinfoBase: base, StateMask: mask}}}
	}
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	tbl := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "filter"}
	chain := &nftables.Chain{Name: "FORWARD", Table: tbl}
	add := func(insert bool, exprs ...expr.Any) {
		t.Helper()
		c, err := nftConn(fd, false)
		if err != nil {
			t.Fatal(err)
		}
		if insert {
			c.InsertRule(&nftables.Rule{Table: tbl, Chain: chain, Exprs: exprs})
		} else {
			c.AddRule(&nftables.Rule{Table: tbl, Chain: chain, Exprs: exprs})
		}
		if err := c.Flush(); err != nil {
			t.Fatalf("add rule: %v", err)
		}
	}
	c, err := nftConn(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	drop := nftables.ChainPolicyDrop
	c.AddTable(tbl)
	c.AddChain(&nftables.Chain{Name: "FORWARD", Table: tbl, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	add(false, states(established|related, false), &expr.Counter{}, accept)
	m := NewManager(sampleSpec(t), WithNetNS(fd))
	check := func(stage string, want bool) {
		t.Helper()
		drops, err := m.UntrackedDrops()
		if err != nil {
			t.Fatal(err)
		}
		if got := len(drops) == 1; got != want || len(drops) > 1 {
			t.Fatalf("%s: found %v, want the chain found: %v", stage, drops, want)
		}
		if want && drops[0].Fix() != "iptables -t filter -I FORWARD -m conntrack --ctstate UNTRACKED -j ACCEPT" {
			t.Errorf("%s: fix %q, want the iptables command", stage, drops[0].Fix())
		}
	}
	check("established and related accepted", true)
	add(true, states(xtStateUntracked, true), accept) // ! --ctstate UNTRACKED
	check("all but untracked accepted", true)
	add(true, states(xtStateUntracked, false), accept)
	check("untracked accepted", false)
}

// TestSourceNATs: the masquerade and snat rules of other tables'
// postrouting nat chains are found with the interface they apply to: a
// rule's own oifname (whole, a prefix, or negated), or that of the rule
// that jumped to its chain (OpenWrt's fw4: srcnat jumps to srcnat_wan
// for oifname "wan"); destination NAT, other hooks and our own table are
// not.
func TestSourceNATs(t *testing.T) {
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	const ruleset = `table inet fw4 {
		chain srcnat { type nat hook postrouting priority srcnat;
			oifname "wan" jump srcnat_wan
		}
		chain srcnat_wan {
			meta nfproto ipv4 masquerade
		}
		chain dstnat { type nat hook prerouting priority dstnat;
			tcp dport 8080 dnat ip to 10.9.0.2
		}
	}
	table ip nat {
		chain post { type nat hook postrouting priority srcnat;
			oifname "ppp*" masquerade
			oifname != "lan0" ip saddr 10.0.0.0/8 snat to 192.0.2.1
			tcp dport 25 counter
		}
		chain in { type nat hook input priority 100;
			snat to 192.0.2.2
		}
	}
	table inet spl_rt {
		chain post { type nat hook postrouting priority srcnat;
			masquerade
		}
	}`
	loadRuleset(t, ns, ruleset+"\n")
	fd := ns.OpenT(t)
	// iptables-nft's -t nat -A POSTROUTING -o eth1 -j MASQUERADE.
	c, err := nftConn(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "nat"}
	ch := &nftables.Chain{Name: "POSTROUTING", Table: tbl, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource}
	c.AddChain(ch)
	c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("eth1\x00")},
		&expr.Target{Name: "MASQUERADE", Rev: 0, Info: &xt.NatIPv4MultiRangeCompat{{MinIP: net.IPv4zero, MaxIP: net.IPv4zero}}},
	}})
	if err := c.Flush(); err != nil {
		t.Fatalf("add iptables-nft's rule: %v", err)
	}
	got, names := sourceNATs(t, fd)
	want := []string{
		"table inet fw4 chain srcnat_wan (IPv4 masquerade on wan)",
		"table ip nat chain POSTROUTING (masquerade on eth1)",
		"table ip nat chain post (masquerade on ppp*)",
		"table ip nat chain post (snat from 10.0.0.0/8 on every interface but lan0)",
	}
	if !slices.Equal(names, want) {
		t.Fatalf("found\n%s\nwant\n%s", strings.Join(names, "\n"), strings.Join(want, "\n"))
	}
	checkAppliesOn(t, got, map[string][]string{
		"wan": {"srcnat_wan", "post"}, "wan2": {"post"}, "ppp0": {"post", "post"}, "lan0": nil, "eth1": {"post", "POSTROUTING"},
	})
}

// TestSourceNATsConditions: the conditions a source NAT rule applies
// under are read as the kernel takes them. A chain jumped to under
// oifname "eth0" applies under both its own rules' and that condition
// (firewalld's zones: oifname "eth0" goto the external zone, whose
// masquerade has oifname != "lo"); verdict maps' jumps are followed with
// their keys; interface sets (wildcards among them) and their negation,
// "oif" by index, the packets' family (table, meta nfproto, an inet
// snat's ip or ip6) and a source prefix are read; a chain reached on
// several paths under one condition is listed once (a chain of 12 jumps,
// each made twice, once, not 4096 times).
func TestSourceNATsConditions(t *testing.T) {
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	const depth = 12
	var diamond strings.Builder
	diamond.WriteString("table ip6 d {\n\tchain d0 { type nat hook postrouting priority srcnat;\n")
	for i := range depth {
		fmt.Fprintf(&diamond, "\t\tjump d%d\n\t\tjump d%d\n\t}\n\tchain d%d {\n", i+1, i+1, i+1)
	}
	diamond.WriteString("\t\toifname \"wan6\" masquerade\n\t}\n}\n")
	const ruleset = `table inet firewalld {
		chain nat_POSTROUTING { type nat hook postrouting priority srcnat + 10;
			jump nat_POSTROUTING_ZONES
		}
		chain nat_POSTROUTING_ZONES {
			oifname "eth0" goto nat_POST_external
			oifname "eth1" goto nat_POST_internal
			goto nat_POST_internal
		}
		chain nat_POST_external {
			jump nat_POST_external_allow
		}
		chain nat_POST_external_allow {
			meta nfproto ipv4 oifname != "lo" masquerade
		}
		chain nat_POST_internal {
			oifname "eth0" oifname "eth1" masquerade
		}
	}
	table inet t {
		set wans { type ifname; elements = { "ppp0", "ppp1" } }
		chain post { type nat hook postrouting priority srcnat;
			oifname vmap { "wan" : jump a, "wwan*" : goto a }
			oifname { "eth*", "wan2" } masquerade
			oifname != { "lan", "lo" } snat ip to 192.0.2.7
			oifname @wans masquerade
			ip saddr 172.17.0.0/16 oifname != "docker0" masquerade
			ip saddr 10.1.2.0/23 ip saddr 10.1.0.0/16 meta oifname "wan" masquerade
			ip6 saddr fd00::/8 oifname "wan" masquerade
			oifname "x" jump b
		}
		chain a {
			masquerade
		}
		chain b {
			oifname "y" masquerade
		}
	}
	`
	loadRuleset(t, ns, ruleset+diamond.String())
	fd := ns.OpenT(t)
	// oif by index (nft resolves the name when the rule is added): lo,
	// and an interface that is gone.
	c, err := nftConn(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "byindex"}
	c.AddTable(tbl)
	ch := &nftables.Chain{Name: "byindex_post", Table: tbl, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource}
	c.AddChain(ch)
	for _, index := range []uint32{1, 9999} {
		c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIF, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.NativeEndian.AppendUint32(nil, index)},
			&expr.Masq{},
		}})
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("add the oif rules: %v", err)
	}
	got, names := sourceNATs(t, fd)
	want := []string{
		"table inet firewalld chain nat_POST_external_allow (IPv4 masquerade on eth0)",
		"table inet t chain a (masquerade on wan)",
		"table inet t chain a (masquerade on wwan*)",
		"table inet t chain post (IPv4 masquerade from 10.1.2.0/23 on wan)",
		"table inet t chain post (IPv4 masquerade from 172.17.0.0/16 on every interface but docker0)",
		"table inet t chain post (IPv4 snat on every interface but lan, lo)",
		"table inet t chain post (IPv6 masquerade from fd00::/8 on wan)",
		"table inet t chain post (masquerade on eth* or wan2)",
		"table inet t chain post (masquerade on ppp0 or ppp1)",
		"table ip byindex chain byindex_post (masquerade on lo)",
		fmt.Sprintf("table ip6 d chain d%d (masquerade on wan6)", depth),
	}
	if !slices.Equal(names, want) {
		t.Fatalf("found\n%s\nwant\n%s", strings.Join(names, "\n"), strings.Join(want, "\n"))
	}
	checkAppliesOn(t, got, map[string][]string{
		"eth0":    {"nat_POST_external_allow", "post", "post", "post"},
		"eth1":    {"post", "post", "post"},
		"eth7":    {"post", "post", "post"},
		"wan":     {"a", "post", "post", "post", "post"},
		"wan6":    {"d12", "post", "post"},
		"wan2":    {"post", "post", "post"},
		"wwan0":   {"a", "post", "post"},
		"ppp1":    {"post", "post", "post"},
		"lan":     {"post"},
		"lo":      {"post", "byindex_post"},
		"docker0": {"post"},
		"x":       {"post", "post"},
		"y":       {"post", "post"},
	})
}

// sourceNATs lists the source NAT rules in the namespace of fd, and
// their descriptions, sorted.
func sourceNATs(t *testing.T, fd int) ([]SourceNAT, []string) {
	t.Helper()
	got, err := NewManager(sampleSpec(t), WithNetNS(fd)).SourceNATs()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range got {
		names = append(names, s.String())
	}
	slices.Sort(names)
	return got, names
}

// checkAppliesOn checks, for each interface of want, the chains of the
// rules of got that apply to packets leaving on it.
func checkAppliesOn(t *testing.T, got []SourceNAT, want map[string][]string) {
	t.Helper()
	for ifc, w := range want {
		var chains []string
		for _, s := range got {
			if s.Matches(ifc) {
				chains = append(chains, s.Chain)
			}
		}
		slices.Sort(chains)
		slices.Sort(w)
		if !slices.Equal(chains, w) {
			t.Errorf("rules for packets leaving on %s: %q, want %q", ifc, chains, w)
		}
	}
}

// TestSourcePrefix: a source address compared whole, by its first bytes
// or under a mask is read as a prefix; a mask that is not one (a one
// after a zero) is not read.
func TestSourcePrefix(t *testing.T) {
	for _, tc := range []struct {
		data, mask []byte
		v6         bool
		want       string // "" for none
	}{
		{[]byte{10, 1, 2, 3}, nil, false, "10.1.2.3/32"},
		{[]byte{172, 17}, nil, false, "172.17.0.0/16"},
		{[]byte{10, 1, 2, 0}, []byte{0xff, 0xff, 0xfe, 0}, false, "10.1.2.0/23"},
		{[]byte{10, 0, 0, 0}, []byte{0xff, 0, 0xff, 0}, false, ""},
		{[]byte{10, 0, 0, 0}, []byte{0x0f, 0, 0, 0}, false, ""},
		{[]byte{0xfd}, nil, true, "fd00::/8"},
		{[]byte{1, 2, 3, 4, 5}, nil, false, ""},
	} {
		p, ok := sourcePrefix(tc.data, tc.mask, tc.v6)
		if got := map[bool]string{true: p.String()}[ok]; got != tc.want {
			t.Errorf("sourcePrefix(%v, %v) = %q, want %q", tc.data, tc.mask, got, tc.want)
		}
	}
}
