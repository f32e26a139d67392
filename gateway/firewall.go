package gateway

import (
	"slices"

	"spliced/config"
	"spliced/logging"
	"spliced/rules"
)

// checkFirewall looks for forward chains of other tables that drop a
// spliced flow's packets (untracked once spliced; see
// rules.UntrackedDrops) and warns about each once, with the rule that
// fixes it, until it is fixed (then it says so). Splicing goes on: the
// check cannot prove a drop (a chain may accept such packets in ways it
// does not read), and an operator who reads the warning fixes the chain
// without a restart. Flows on the bpf datapath's redirect skip the
// forward hook, so that datapath is not checked. It runs the source NAT
// and bridge checks (checkSourceNAT, checkBridgeNetfilter) first, with or
// without splicing. Called with
// g.rulesMu held (at start, with each drift check, and when another
// table changes).
func (g *Gateway) checkFirewall() {
	g.checkSourceNAT()
	g.checkBridgeNetfilter()
	g.checkMarkRouting()
	if !g.splicing() || g.redirectsSpliced() {
		g.firewallDrops.Store(nil)
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
	var was []rules.UntrackedDrop
	if p := g.firewallDrops.Load(); p != nil {
		was = *p
	}
	for _, d := range drops {
		if !slices.Contains(was, d) {
			g.log.Warn("a forward chain of another table drops spliced flows' packets: once spliced, a flow's packets are untracked, and this chain accepts none of them before its drop (its policy, or a drop or reject rule); such flows stall right after their splice. Add the rule below (before the chain's drops), or turn splicing off",
				"chain", d.String(), "fix", d.Fix())
		}
	}
	for _, d := range was {
		if !slices.Contains(drops, d) {
			g.log.Info("a forward chain that dropped spliced flows' packets no longer does", "chain", d.String())
		}
	}
	g.firewallDrops.Store(&drops)
}

// firewallWarnings are the status's lines for the chains checkFirewall
// last found.
func (g *Gateway) firewallWarnings() []string {
	var out []string
	if p := g.firewallDrops.Load(); p != nil {
		for _, d := range *p {
			out = append(out, d.String()+" drops spliced flows' (untracked) packets: "+d.Fix())
		}
	}
	return out
}

// redirectsSpliced reports whether spliced flows run on the bpf
// datapath's redirect wherever their packets arrive, which sends them to
// the egress device past the stack's forward hook and its reverse path
// check. Not so while an interface has a classic tc ingress qdisc: what
// arrives there goes on through the stack (tcingress.go).
func (g *Gateway) redirectsSpliced() bool {
	return g.redirects() && len(g.kpath.stackInterfaces()) == 0
}

// redirectsFrom reports whether the bpf datapath's redirect forwards the
// spliced packets that arrive on the interface ifindex, past the stack.
func (g *Gateway) redirectsFrom(ifindex int) bool {
	return g.redirects() && !slices.Contains(g.kpath.stackInterfaces(), ifindex)
}

// redirects reports whether the bpf datapath runs with its redirect.
func (g *Gateway) redirects() bool {
	return g.kpath != nil && g.config().Kernel.BPFForward == config.BPFForwardRedirect
}

// statusWarnings are what `splicectl status` lists for the operator to
// fix.
func (g *Gateway) statusWarnings() []string {
	var out []string
	if p := g.driftLeft.Load(); p != nil {
		out = append(out, *p)
	}
	out = append(out, g.firewallWarnings()...)
	out = append(out, g.sourceNATWarnings()...)
	out = append(out, g.bridgeNF.warnings()...)
	out = append(out, g.acceptLocalOff.warnings()...)
	out = append(out, g.markRoutingWarnings()...)
	for _, w := range append(g.reversePathWarnings(), g.forwardingWarnings()...) {
		out = append(out, "splices refused: "+w)
	}
	return out
}
