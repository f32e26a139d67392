package gateway

import (
	"net/netip"
	"slices"
	"testing"

	"spliced/config"
	"spliced/rules"
)

// TestSourceNATConflictsFamilyAndSources: a service's connections meet a
// source NAT rule only in the rule's family (an ip6 table's masquerade
// does not concern a service whose IPv4 connections leave on the
// interface) and, for a rule limited to a source prefix (Docker's
// "-s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"), only if the service's
// sources may be in it; a rule that applies to both families on the
// interface both leave on is one conflict, not two.
func TestSourceNATConflictsFamilyAndSources(t *testing.T) {
	lan := &config.Service{Name: "lan", Sources: []config.Prefix{{Prefix: netip.MustParsePrefix("192.168.1.0/24")}}}
	anySource := &config.Service{Name: "any"}
	v4only := &config.Service{Name: "v4only"}
	egress := func(s *config.Service) []egressInterface {
		if s == v4only {
			return []egressInterface{{"wan", false}}
		}
		return []egressInterface{{"wan", false}, {"wan", true}}
	}
	wan := []rules.IfMatch{{Names: []string{"wan"}}}
	both := rules.SourceNAT{Family: "inet", Table: "fw4", Chain: "srcnat_wan", Masquerade: true, IPv4: true, IPv6: true, Oif: wan}
	v6 := rules.SourceNAT{Family: "ip6", Table: "nat", Chain: "post", Masquerade: true, IPv6: true, Oif: wan}
	docker := rules.SourceNAT{Family: "ip", Table: "nat", Chain: "POSTROUTING", Masquerade: true, IPv4: true,
		From: netip.MustParsePrefix("172.17.0.0/16"), Oif: []rules.IfMatch{{Names: []string{"docker0"}, Not: true}}}
	got := sourceNATConflicts([]*config.Service{lan, anySource, v4only}, []rules.SourceNAT{both, v6, docker}, egress)
	var names []string
	for _, c := range got {
		names = append(names, c.Service+" "+c.Ifname+" "+c.Rule.Chain)
	}
	slices.Sort(names)
	want := []string{
		"any wan POSTROUTING", // any source: a container's flow too
		"any wan post",
		"any wan srcnat_wan",
		"lan wan post",
		"lan wan srcnat_wan",
		"v4only wan POSTROUTING",
		"v4only wan srcnat_wan",
	}
	if !slices.Equal(names, want) {
		t.Errorf("conflicts %q, want %q", names, want)
	}
	// A conflict found again is not new (checkSourceNAT compares them).
	if !got[0].same(sourceNATConflicts([]*config.Service{lan}, []rules.SourceNAT{both}, egress)[0]) {
		t.Error("the same conflict found twice is not the same")
	}
}
