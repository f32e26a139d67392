package gateway

import (
	"bytes"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"

	"spliced/config"
	"spliced/rules"
)

// TestMarkRoutingActive: marks route packets only with an ip rule that
// selects by mark and a chain that sets the mark at that hook; a mark
// restored from the connection's counts for both questions.
func TestMarkRoutingActive(t *testing.T) {
	pre := rules.MarkSetter{Family: "inet", Table: "pbr", Chain: "mark", Hook: "prerouting"}
	restore := rules.MarkSetter{Family: "ip", Table: "mangle", Chain: "PREROUTING", Hook: "prerouting", FromConntrack: true}
	out := rules.MarkSetter{Family: "inet", Table: "pbr", Chain: "out", Hook: "output"}
	ipRule := []string{"IPv4 rule 30000: fwmark 0x10/0x10 lookup 200"}
	for _, tc := range []struct {
		name                   string
		m                      *markRouting
		pre, preFromCT, output bool
	}{
		{"nothing found", nil, false, false, false},
		{"setters without a rule", &markRouting{setters: []rules.MarkSetter{pre, restore, out}}, false, false, false},
		{"a rule without setters", &markRouting{rules: ipRule}, false, false, false},
		{"per packet", &markRouting{rules: ipRule, setters: []rules.MarkSetter{pre, out}}, true, false, true},
		{"restored", &markRouting{rules: ipRule, setters: []rules.MarkSetter{restore}}, true, true, false},
	} {
		_, p := tc.m.active("prerouting", false)
		_, c := tc.m.active("prerouting", true)
		_, o := tc.m.active("output", false)
		if p != tc.pre || c != tc.preFromCT || o != tc.output {
			t.Errorf("%s: prerouting %v, from connections %v, output %v; want %v, %v, %v", tc.name, p, c, o, tc.pre, tc.preFromCT, tc.output)
		}
	}
	if !(&markRouting{rules: ipRule}).equal(&markRouting{rules: ipRule}) || (&markRouting{rules: ipRule}).equal(nil) || !(*markRouting)(nil).equal(nil) {
		t.Error("equal")
	}
}

// TestMarkRoutingApplied: what the check found reaches what the gateway
// builds later. A reload that first starts splicing makes the injector
// after the check found marks set at output: the GSO sender must refuse
// all the same, though the next check finds nothing new (before, it was
// told only of changes, and sent taken-over payload the daemon's own
// route's way for the daemon's life). Marks read before the start's
// first check (primeMarkRouting) are still said and applied by it.
func TestMarkRoutingApplied(t *testing.T) {
	var logs bytes.Buffer
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	g := New(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	t.Cleanup(g.workers.Close)
	ipRule := []string{"IPv4 rule 30000: fwmark 0x10/0x10 lookup 200"}
	out := rules.MarkSetter{Family: "inet", Table: "pbr", Chain: "out", Hook: "output"}
	found := func() *markRouting { return &markRouting{rules: ipRule, setters: []rules.MarkSetter{out}} }

	g.markRoute.Store(found())                // primeMarkRouting's, at the start
	g.inject = &injector{gso: newGSOSender()} // startSplicing's
	g.markRoutingToGSO()
	if !g.inject.gso.marksRoute.Load() {
		t.Error("a GSO sender made after marks were found does not refuse")
	}
	g.inject = &injector{gso: newGSOSender()}
	g.setMarkRouting(found())
	if !g.inject.gso.marksRoute.Load() {
		t.Error("a check that found what the last one did left a new GSO sender sending")
	}
	if !strings.Contains(logs.String(), "a chain sets it at output") {
		t.Errorf("marks found before the first check not said by it:\n%s", logs.String())
	}
	logs.Reset()
	g.setMarkRouting(found())
	if logs.Len() != 0 {
		t.Errorf("said again:\n%s", logs.String())
	}
	g.setMarkRouting(nil)
	if g.inject.gso.marksRoute.Load() {
		t.Error("marks gone, the GSO sender still refuses")
	}
}

// TestStackSetWithMarkRouting: with marks set at prerouting routing
// packets, the program leaves what it rewrites to the stack on every
// interface it is attached to (loadKernelPath's first set included, for
// the flows an earlier daemon left), else only where a tc ingress qdisc
// is.
func TestStackSetWithMarkRouting(t *testing.T) {
	g := quietGateway(t)
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	qdisc := lo.Index + 1000
	if got := g.stackSet([]int{qdisc}, []string{"lo"}); !slices.Equal(got, []int{qdisc}) {
		t.Errorf("no mark routing: %v, want %v", got, []int{qdisc})
	}
	pre := rules.MarkSetter{Family: "inet", Table: "pbr", Chain: "mark", Hook: "prerouting"}
	g.markRoute.Store(&markRouting{rules: []string{"IPv4 rule 30000: fwmark 0x10/0x10 lookup 200"}, setters: []rules.MarkSetter{pre}})
	if got, want := g.stackSet([]int{qdisc}, []string{"lo", "gone0"}), []int{lo.Index, qdisc}; !slices.Equal(got, want) {
		t.Errorf("marks set at prerouting route: %v, want %v", got, want)
	}
}
