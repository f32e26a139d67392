package gateway

import (
	"slices"

	"spliced/config"
	"spliced/logging"
)

// checkFirewall looks for forward chains of other tables that drop a
// spliced flow's packets (untracked once spliced; see
// rules.UntrackedDrops) and warns about each once, with the rule that
// fixes it, until it is fixed (then it says so). Splicing goes on: the
// check cannot prove a drop (a chain may accept such packets in ways it
// does not read), and an operator who reads the warning fixes the chain
// without a restart. Flows on the bpf datapath's redirect skip the
// forward hook, so that datapath is not checked. Called with g.rulesMu
// held (at start, and with each drift check).
func (g *Gateway) checkFirewall() {
	cfg := g.config()
	if !g.splicing() || (g.kpath != nil && cfg.Kernel.BPFForward == config.BPFForwardRedirect) {
		g.firewallWarnings.Store(nil)
		return
	}
	drops, err := g.manager().UntrackedDrops()
	if err != nil {
		if !g.firewallUnread {
			g.log.Warn("cannot read the other tables' forward chains to check that they let spliced flows through", logging.Err(err))
		}
		g.firewallUnread = true
		return
	}
	g.firewallUnread = false
	var now []string
	for _, d := range drops {
		now = append(now, d.String())
		if !slices.Contains(g.firewallDrops, d.String()) {
			g.log.Warn("a forward chain of another table drops spliced flows' packets: once spliced, a flow's packets are untracked, and this chain accepts none of them before its drop (its policy, or a drop or reject rule); such flows stall right after their splice. Add the rule below (before the chain's drops), or turn splicing off",
				"chain", d.String(), "fix", d.Fix())
		}
	}
	for _, was := range g.firewallDrops {
		if !slices.Contains(now, was) {
			g.log.Info("a forward chain that dropped spliced flows' packets no longer does", "chain", was)
		}
	}
	g.firewallDrops = now
	var warnings []string
	for _, d := range drops {
		warnings = append(warnings, d.String()+" drops spliced flows' (untracked) packets: "+d.Fix())
	}
	g.firewallWarnings.Store(&warnings)
}

// statusWarnings are what `splicectl status` lists for the operator to
// fix.
func (g *Gateway) statusWarnings() []string {
	var out []string
	if w := g.firewallWarnings.Load(); w != nil {
		out = slices.Clone(*w)
	}
	if w := g.reversePathWarning(); w != "" {
		out = append(out, "splices refused: "+w)
	}
	return out
}
