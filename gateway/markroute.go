package gateway

import (
	"slices"
	"strings"

	"spliced/config"
	"spliced/logging"
	"spliced/rules"
)

// Routing by firewall mark (see rules/marks.go). A router that routes
// some flows by mark (ip rule fwmark M lookup T) routes a forwarded packet
// with the marks its prerouting chains set, and the gateway's own packets
// with those its output chains set. A spliced flow's packets must take
// the route its gateway sockets' packets took (TestLabMarkRouting):
//
//   - marks set per packet at prerouting (OpenWrt's pbr): the stack's
//     forwarding applies them, the bpf datapath's redirect, which looks
//     the route up at tcx ingress before any chain ran, did not, and such
//     flows stalled. The program then leaves what it rewrote to the stack
//     on every interface (as on those with a tc ingress qdisc).
//   - marks set at output: the taken-over payload that a packet socket
//     sends (gso.go) was routed by the daemon's own lookup; it goes
//     through the IP output path then (kernel.resend: raw's way).
//   - marks restored from the connection's (mwan3's CONNMARK
//     --restore-mark, nft's "meta mark set ct mark"): a spliced flow's
//     packets are untracked, carry no connection mark, and were routed as
//     unmarked ones; every spliced flow stalled, on both datapaths. Such
//     splices are refused, and the flows stay proxied (their sockets'
//     connections are tracked).
//
// Only ip rules that select by mark make marks route; spliced's own rule
// and chains do not count.

// markRouting is what checkMarkRouting last found.
type markRouting struct {
	rules   []string           // ip rules that select by mark, others'
	setters []rules.MarkSetter // chains that set the mark, others'
}

// active reports whether marks set at hook route packets, and a chain
// that sets them (restored from the connection's mark, with fromCT).
func (m *markRouting) active(hook string, fromCT bool) (rules.MarkSetter, bool) {
	if m == nil || len(m.rules) == 0 {
		return rules.MarkSetter{}, false
	}
	for _, s := range m.setters {
		if s.Hook == hook && (!fromCT || s.FromConntrack) {
			return s, true
		}
	}
	return rules.MarkSetter{}, false
}

func (m *markRouting) equal(o *markRouting) bool {
	if m == nil || o == nil {
		return m == o
	}
	return slices.Equal(m.rules, o.rules) && slices.Equal(m.setters, o.setters)
}

// checkMarkRouting reads the ip rules and other tables' chains that
// route by mark, says what changed, and applies it: the bpf datapath's
// stack interfaces, the GSO sender, the refusal of splices. Called from
// checkFirewall (rulesMu held).
func (g *Gateway) checkMarkRouting() {
	if now, ok := g.readMarkRouting(); ok {
		g.setMarkRouting(now)
	}
}

// primeMarkRouting reads what checkMarkRouting would at the start,
// before the program is loaded and attached (loadKernelPath: an earlier
// daemon's links are moved to it in place, and its adopted flows' packets
// must go through the stack at once) and before any service accepts a
// flow (a splice of a flow whose mark is restored from its connection's
// stalls it for good), without a word: the first checkMarkRouting says
// and applies the rest (rulesMu held).
func (g *Gateway) primeMarkRouting() {
	if now, ok := g.readMarkRouting(); ok {
		g.markRoute.Store(now)
	}
}

// readMarkRouting reads the ip rules and other tables' chains that route
// by mark; false (said once) when it cannot (rulesMu held).
func (g *Gateway) readMarkRouting() (*markRouting, bool) {
	m := g.manager()
	var now *markRouting
	ipRules, err := m.MarkRules()
	if err == nil && len(ipRules) > 0 {
		var setters []rules.MarkSetter
		if setters, err = m.MarkSetters(); err == nil {
			now = &markRouting{rules: ipRules, setters: setters}
		}
	}
	if err != nil {
		if !g.markRoutingUnread {
			g.log.Warn("cannot read the ip rules and chains that route by firewall mark; spliced flows are routed as if none did", logging.Err(err))
		}
		g.markRoutingUnread = true
		return nil, false
	}
	g.markRoutingUnread = false
	return now, true
}

// setMarkRouting records what checkMarkRouting found and applies it. The
// GSO sender is told every time: the one of the reload that first starts
// splicing is new (startSplicing tells it too).
func (g *Gateway) setMarkRouting(now *markRouting) {
	g.markRoute.Store(now)
	g.markRoutingToGSO()
	was := g.markRouteSaid
	if now.equal(was) {
		return
	}
	g.markRouteSaid = now
	g.logMarkRouting(was, now)
	if g.kpath != nil && g.redirects() {
		g.applyStackInterfaces(g.kpath)
	}
}

// markRoutingToGSO makes the GSO sender refuse while marks set at output
// route packets.
func (g *Gateway) markRoutingToGSO() {
	if g.inject != nil && g.inject.gso != nil {
		_, out := g.markRoute.Load().active("output", false)
		g.inject.gso.marksRoute.Store(out)
	}
}

// logMarkRouting says what changed between was and now.
func (g *Gateway) logMarkRouting(was, now *markRouting) {
	s, on := now.active("prerouting", true)
	_, wasOn := was.active("prerouting", true)
	switch {
	case on && !wasOn:
		g.log.Warn("a prerouting chain restores the packet mark from the connection's, and ip rules route by it: a spliced flow's packets are untracked, would carry no connection mark and take another route; splices are refused and such flows stay proxied (their gateway sockets' connections are tracked)",
			"chain", s.String(), "ip_rules", strings.Join(now.rules, "; "))
	case !on && wasOn:
		g.log.Info("marks restored from connections no longer route; splices are no longer refused for them")
	}
	for _, hook := range []string{"prerouting", "output"} {
		s, on := now.active(hook, false)
		_, wasOn := was.active(hook, false)
		if on == wasOn {
			continue
		}
		var what string
		switch {
		case hook == "prerouting" && g.kpath != nil && g.redirects():
			what = "spliced packets rewritten by the bpf program go through the kernel's forwarding path on every interface, where the marks set at prerouting route them (the redirect would look their route up before those chains ran)"
		case hook == "output" && g.inject != nil && g.inject.gso != nil:
			what = "payload a splice takes over goes through the IP output path, where the marks set at output route it (a packet socket on the device of the daemon's own route lookup would not)"
		default:
			continue
		}
		if on {
			g.log.Info("ip rules route by firewall mark and a chain sets it at "+hook+": "+what, "chain", s.String(), "ip_rules", strings.Join(now.rules, "; "))
		} else {
			g.log.Info("marks set at " + hook + " no longer route: spliced packets take the faster way again")
		}
	}
}

// markRoutingRefusal says why splices are refused while marks restored
// from connections route packets, or "".
func (g *Gateway) markRoutingRefusal() string {
	s, on := g.markRoute.Load().active("prerouting", true)
	if !on {
		return ""
	}
	return "the packet mark is restored from the connection's at prerouting (" + s.String() + ") and ip rules route by it: once spliced, this flow's packets are untracked and would take another route; keep such flows proxied, or route them without connection marks"
}

// markRoutingWarnings are the status's lines.
func (g *Gateway) markRoutingWarnings() []string {
	if r := g.markRoutingRefusal(); r != "" {
		return []string{"splices refused: " + r}
	}
	return nil
}

// MarkRouting says, for spliced -check, what routing by firewall mark
// changes for spliced flows with cfg, as the daemon would.
func MarkRouting(cfg *config.Config, m *rules.Manager) ([]string, error) {
	ipRules, err := m.MarkRules()
	if err != nil || len(ipRules) == 0 {
		return []string{"no ip rule of another program routes by firewall mark"}, err
	}
	setters, err := m.MarkSetters()
	if err != nil {
		return nil, err
	}
	mr := &markRouting{rules: ipRules, setters: setters}
	out := []string{"ip rules that route by firewall mark: " + strings.Join(ipRules, "; ")}
	if s, on := mr.active("prerouting", true); on {
		out = append(out, "splices refused, flows stay proxied: "+s.String()+"; a spliced flow's packets are untracked and would carry no connection mark")
	}
	if s, on := mr.active("prerouting", false); on && cfg.Kernel.Datapath != config.DatapathNFQueue && cfg.Kernel.BPFForward == config.BPFForwardRedirect {
		out = append(out, "the bpf program leaves what it rewrites to the kernel's forwarding path on every interface, where "+s.String()+" routes it")
	}
	if s, on := mr.active("output", false); on && cfg.Kernel.Resend == config.ResendGSO {
		out = append(out, "payload a splice takes over goes through the IP output path, where "+s.String()+" routes it")
	}
	if len(out) == 1 {
		out = append(out, "spliced packets are routed with the marks other tables' chains set, as their connections' packets were")
	}
	return out, nil
}
