package rules

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// The router's source NAT. A transparent service's upstream connection
// has the client's own 4-tuple, so conntrack takes its packets for the
// client's intercepted connection, whose entry (NAT bindings included)
// was made when the client's SYN arrived: a masquerade or snat rule at
// postrouting never sees them. The servers get the client's address,
// which on a router that masquerades its LAN they cannot answer: the
// upstream connects time out, proxied or spliced (TestLabSourceNAT). The
// daemon finds such rules and says to use upstream: nat.

// SourceNAT is a rule of another table's postrouting nat chain that
// rewrites packets' source (masquerade or snat), with the interface
// condition under which it does: the rule's own, or that of the rule
// that jumped to its chain.
type SourceNAT struct {
	Family, Table, Chain string
	Masquerade           bool // else snat
	// Oif is the output interface the rule is limited to, "" for any;
	// OifPrefix: a name prefix (nft's "wan*", iptables' "wan+"); OifNot:
	// every interface but those.
	Oif               string
	OifPrefix, OifNot bool
}

func (s SourceNAT) String() string {
	what := "snat"
	if s.Masquerade {
		what = "masquerade"
	}
	on := "on every interface"
	if s.Oif != "" {
		name := s.Oif
		if s.OifPrefix {
			name += "*"
		}
		on = "on " + name
		if s.OifNot {
			on = "on every interface but " + name
		}
	}
	return fmt.Sprintf("table %s %s chain %s (%s %s)", s.Family, s.Table, s.Chain, what, on)
}

// Matches reports whether the rule applies to packets leaving on the
// interface named ifname (as far as its interface condition tells).
func (s SourceNAT) Matches(ifname string) bool {
	if s.Oif == "" {
		return true
	}
	m := ifname == s.Oif || s.OifPrefix && strings.HasPrefix(ifname, s.Oif)
	return m != s.OifNot
}

// SourceNATs lists the source NAT rules of the other tables' postrouting
// nat chains (families inet, ip and ip6), following their jumps and
// gotos.
func (m *Manager) SourceNATs() ([]SourceNAT, error) {
	c, err := m.nft()
	if err != nil {
		return nil, err
	}
	chains, err := c.ListChains()
	if err != nil {
		return nil, fmt.Errorf("list nftables chains: %w", err)
	}
	var out []SourceNAT
	for _, ch := range chains {
		t := ch.Table
		if t == nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookPostrouting || ch.Type != nftables.ChainTypeNAT {
			continue
		}
		fam, ok := familyNames[t.Family]
		if !ok || (t.Family == nftables.TableFamilyINet && t.Name == m.spec.Table) {
			continue
		}
		w := &natWalk{c: c, t: t, fam: fam, seen: map[string]bool{}}
		if err := w.chain(ch.Name, SourceNAT{}, &out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// natWalk follows the rules of a table's postrouting nat chain.
type natWalk struct {
	c    *nftables.Conn
	t    *nftables.Table
	fam  string
	seen map[string]bool
}

// chain appends the source NAT rules of chain, and of the chains its
// rules jump or go to, under the interface condition cond.
func (w *natWalk) chain(chain string, cond SourceNAT, out *[]SourceNAT) error {
	if w.seen[chain] {
		return nil
	}
	w.seen[chain] = true
	defer delete(w.seen, chain) // another path may reach it under another condition
	rules, err := w.c.GetRules(w.t, &nftables.Chain{Name: chain, Table: w.t})
	if err != nil {
		return fmt.Errorf("list the rules of chain %s: %w", chain, err)
	}
	for _, r := range rules {
		rc := cond
		oifReg := map[uint32]bool{}      // registers holding the output interface's name
		oifIndexReg := map[uint32]bool{} // or its index
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Meta:
				if !e.SourceRegister {
					delete(oifReg, e.Register)
					delete(oifIndexReg, e.Register)
					switch e.Key {
					case expr.MetaKeyOIFNAME:
						oifReg[e.Register] = true
					case expr.MetaKeyOIF:
						oifIndexReg[e.Register] = true
					}
				}
			case *expr.Cmp:
				if e.Op != expr.CmpOpEq && e.Op != expr.CmpOpNeq {
					continue
				}
				switch {
				case oifReg[e.Register]:
					name, prefix := ifname(e.Data)
					rc.Oif, rc.OifPrefix, rc.OifNot = name, prefix, e.Op == expr.CmpOpNeq
				case oifIndexReg[e.Register] && len(e.Data) == 4:
					if ifc, err := net.InterfaceByIndex(int(binary.NativeEndian.Uint32(e.Data))); err == nil {
						rc.Oif, rc.OifPrefix, rc.OifNot = ifc.Name, false, e.Op == expr.CmpOpNeq
					}
				}
			case *expr.Masq:
				s := rc
				s.Family, s.Table, s.Chain, s.Masquerade = w.fam, w.t.Name, chain, true
				*out = append(*out, s)
			case *expr.NAT:
				if e.Type == expr.NATTypeSourceNAT {
					s := rc
					s.Family, s.Table, s.Chain = w.fam, w.t.Name, chain
					*out = append(*out, s)
				}
			case *expr.Target: // iptables-nft's -j MASQUERADE, -j SNAT
				if e.Name == "MASQUERADE" || e.Name == "SNAT" {
					s := rc
					s.Family, s.Table, s.Chain, s.Masquerade = w.fam, w.t.Name, chain, e.Name == "MASQUERADE"
					*out = append(*out, s)
				}
			case *expr.Verdict:
				if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
					if err := w.chain(e.Chain, rc, out); err != nil {
						return err
					}
				}
			case *expr.Counter, *expr.Log:
			default:
				// Anything else may load a register (an address, a
				// port, a NAT target's address): it no longer holds the
				// interface.
				clear(oifReg)
				clear(oifIndexReg)
			}
		}
	}
	return nil
}

// ifname reads an interface name compared with meta oifname: a whole
// name ends in a NUL within its IFNAMSIZ bytes, a prefix ("wan*") does
// not.
func ifname(data []byte) (name string, prefix bool) {
	if i := bytes.IndexByte(data, 0); i >= 0 {
		return string(data[:i]), false
	}
	return string(data), true
}
