package rules

import (
	"fmt"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// Routing by firewall mark. A router that routes some traffic by the
// packet mark (a VPN for some clients, a second uplink: `ip rule fwmark M
// lookup T`, with a prerouting chain that sets M, as OpenWrt's pbr does)
// routes a forwarded packet with the mark its prerouting chains set. The
// bpf datapath's redirect looks the route up at tcx ingress, before any
// of those chains ran, with no mark, and the taken-over payload that a
// packet socket sends (gso.go) is routed by the daemon's own lookup: both
// took the main table's route where the router's rules sent the flow
// elsewhere, and a spliced flow on the bpf datapath stalled
// (TestLabMarkRouting). The gateway checks for both conditions.

// MarkSetter is a rule of another table, in a chain that a prerouting or
// output base chain reaches (by jumps, gotos and verdict maps), that sets
// the packet mark.
type MarkSetter struct {
	Family, Table, Chain string
	// Hook is the base chain's: "prerouting" or "output".
	Hook string
	// FromConntrack: the mark comes from the connection's (nft's "meta
	// mark set ct mark", iptables' CONNMARK --restore-mark).
	FromConntrack bool
}

func (s MarkSetter) String() string {
	what := "sets the packet mark"
	if s.FromConntrack {
		what = "sets the packet mark from the connection's"
	}
	return fmt.Sprintf("table %s %s chain %s (%s, hook %s)", s.Family, s.Table, s.Chain, what, s.Hook)
}

// MarkSetters lists the chains of the other tables (families inet, ip and
// ip6) reached from their prerouting and output base chains (but nat
// chains) whose rules set the packet mark of TCP packets, once per chain
// and hook.
func (m *Manager) MarkSetters() ([]MarkSetter, error) {
	c, chains, err := m.listChains()
	if err != nil {
		return nil, err
	}
	var out []MarkSetter
	sets := map[string]map[string]setContents{} // by table
	for _, ch := range chains {
		t := ch.Table
		if t == nil || ch.Hooknum == nil {
			continue
		}
		var hook string
		switch *ch.Hooknum {
		case *nftables.ChainHookPrerouting:
			hook = "prerouting"
		case *nftables.ChainHookOutput:
			hook = "output"
		default:
			continue
		}
		fam, ok := familyNames[t.Family]
		if !ok || (t.Family == nftables.TableFamilyINet && t.Name == m.spec.Table) {
			continue
		}
		if ch.Type == nftables.ChainTypeNAT {
			// A nat chain sees a connection's first packet only, and no
			// untracked one: never a spliced flow's (kube-proxy's
			// KUBE-MARK-MASQ would count on every Kubernetes node).
			continue
		}
		key := fam + " " + t.Name
		if sets[key] == nil {
			sets[key] = map[string]setContents{}
		}
		// Every chain the base chain reaches, breadth first.
		seen := map[string]bool{ch.Name: true}
		for queue := []string{ch.Name}; len(queue) > 0; queue = queue[1:] {
			name := queue[0]
			rules, err := c.GetRules(t, &nftables.Chain{Name: name, Table: t})
			if err != nil {
				return nil, fmt.Errorf("table %s: list the rules of chain %s: %w", key, name, err)
			}
			setsMark, fromCT := false, false
			for _, r := range rules {
				s, ct, next, err := markRule(c, t, sets[key], r.Exprs)
				if err != nil {
					return nil, fmt.Errorf("table %s chain %s: %w", key, name, err)
				}
				setsMark, fromCT = setsMark || s, fromCT || ct
				for _, n := range next {
					if !seen[n] {
						seen[n] = true
						queue = append(queue, n)
					}
				}
			}
			if setsMark {
				s := MarkSetter{Family: fam, Table: t.Name, Chain: name, Hook: hook, FromConntrack: fromCT}
				if !slices.Contains(out, s) {
					out = append(out, s)
				}
			}
		}
	}
	return out, nil
}

// markRule reads a rule: whether it sets the packet mark, from the
// connection's mark or not, and the chains it jumps or goes to (its
// verdict's, its verdict map's). What follows a match that no TCP packet
// passes ("meta l4proto udp", "ip protocol udp", "udp dport 53") is left
// out: no spliced flow's packet gets there. wg-quick's full tunnel
// restores the mark from the connection's for UDP only (its tunnel's
// packets), and taken for every packet's it refused every splice.
func markRule(c *nftables.Conn, t *nftables.Table, cache map[string]setContents, exprs []expr.Any) (sets, fromCT bool, next []string, err error) {
	loadsCTMark := false
	// proto: the registers that hold the layer 4 protocol (protoExact)
	// or IPv6's next header (protoNextHeader).
	proto := map[uint32]int{}
	const protoExact, protoNextHeader = 1, 2
rule:
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Ct:
			if e.Key == expr.CtKeyMARK && !e.SourceRegister {
				loadsCTMark = true
			}
			if !e.SourceRegister {
				delete(proto, e.Register)
			}
		case *expr.Meta:
			if e.Key == expr.MetaKeyMARK && e.SourceRegister {
				sets = true
				fromCT = fromCT || loadsCTMark
			}
			if !e.SourceRegister {
				delete(proto, e.Register)
				if e.Key == expr.MetaKeyL4PROTO {
					proto[e.Register] = protoExact
				}
			}
		case *expr.Payload:
			if e.OperationType != expr.PayloadLoad {
				continue
			}
			delete(proto, e.DestRegister)
			if e.Base != expr.PayloadBaseNetworkHeader || e.Len != 1 {
				continue
			}
			v4 := t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyINet
			v6 := t.Family == nftables.TableFamilyIPv6 || t.Family == nftables.TableFamilyINet
			switch {
			case e.Offset == 9 && v4: // ip protocol
				proto[e.DestRegister] = protoExact
			case e.Offset == 6 && v6: // ip6 nexthdr
				proto[e.DestRegister] = protoNextHeader
			}
		case *expr.Immediate:
			delete(proto, e.Register)
		case *expr.Bitwise:
			delete(proto, e.DestRegister)
		case *expr.Cmp:
			p := proto[e.Register]
			if p == 0 || len(e.Data) != 1 {
				continue
			}
			// An IPv6 TCP packet with extension headers has another
			// next header: only "is not TCP" is sure.
			if (e.Op == expr.CmpOpEq && e.Data[0] != unix.IPPROTO_TCP) ||
				(e.Op == expr.CmpOpNeq && e.Data[0] == unix.IPPROTO_TCP && p == protoExact) {
				break rule
			}
		case *expr.Target:
			switch e.Name {
			case "MARK":
				sets = true
			case "CONNMARK":
				if connmarkRestores(e) {
					sets, fromCT = true, true
				}
			}
		case *expr.Verdict:
			if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
				next = append(next, e.Chain)
			}
		case *expr.Lookup:
			if e.IsDestRegSet {
				delete(proto, e.DestRegister)
			}
			if !e.IsDestRegSet || e.DestRegister != 0 { // a verdict map's lookup
				continue
			}
			s, err := readSet(c, t, cache, e.SetName)
			if err != nil {
				return false, false, nil, err
			}
			for _, el := range s.els {
				if v, ok := elementVerdict(el); ok && (v.Kind == expr.VerdictJump || v.Kind == expr.VerdictGoto) {
					next = append(next, v.Chain)
				}
			}
		}
	}
	return sets, fromCT, next, nil
}

// connmarkRestores reports whether an xtables CONNMARK target copies the
// connection's mark to the packet (--restore-mark): its info's mode
// (struct xt_connmark_tginfo1: ctmark, ctmask, nfmask, mode;
// xt_connmark_tginfo2 adds shift_dir and shift_bits before mode).
func connmarkRestores(e *expr.Target) bool {
	const restore = 2 // XT_CONNMARK_RESTORE
	b, ok := e.Info.(*xt.Unknown)
	if !ok {
		return false
	}
	off := 12
	if e.Rev >= 2 {
		off = 14
	}
	return len(*b) > off && (*b)[off] == restore
}

// MarkRules describes the ip rules (IPv4 and IPv6) that select routes by
// firewall mark, other than spliced's own.
func (m *Manager) MarkRules() ([]string, error) {
	rt, err := m.rtnl()
	if err != nil {
		return nil, err
	}
	defer rt.Close()
	list, err := rt.Rule.List()
	if err != nil {
		return nil, fmt.Errorf("list ip rules: %w", err)
	}
	var out []string
	for i := range list {
		r := &list[i]
		a := r.Attributes
		if a == nil || a.FwMark == nil || isOurRule(r, m.spec.Mark) {
			continue
		}
		mask := uint32(0xffffffff)
		if a.FwMask != nil {
			mask = *a.FwMask
		}
		if *a.FwMark == 0 && mask == 0 {
			continue // matches every packet
		}
		s := familyName(r.Family) + " rule"
		if a.Priority != nil {
			s += fmt.Sprintf(" %d:", *a.Priority)
		}
		if r.Flags&unix.FIB_RULE_INVERT != 0 {
			s += " not"
		}
		s += fmt.Sprintf(" fwmark 0x%x/0x%x", *a.FwMark, mask)
		if a.Table != nil {
			s += fmt.Sprintf(" lookup %d", *a.Table)
		}
		out = append(out, s)
	}
	return out, nil
}
