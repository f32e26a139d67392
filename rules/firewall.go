package rules

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The router's own firewall. Once spliced, a flow's packets are untracked
// (the divert chain's notrack) and, rewritten, they are forwarded: on the
// nfqueue datapath, and on the bpf one with bpf_forward: stack (the
// redirect skips the forward hook). A forward chain of another table that
// drops by default and accepts by conntrack state ("ct state
// established,related accept", the most common router ruleset) drops
// them: the flow stalls right after its splice (TestLabStatefulForwardFirewall).
// No rule of spliced's table can help (a packet must pass every base
// chain of its hook), so the daemon finds such chains and says what to
// add to them.

// UntrackedDrop is a forward chain of another table that drops untracked
// packets.
type UntrackedDrop struct {
	Family, Table, Chain string
}

func (u UntrackedDrop) String() string {
	return fmt.Sprintf("table %s %s chain %s", u.Family, u.Table, u.Chain)
}

// Fix is the rule that lets spliced flows through the chain.
func (u UntrackedDrop) Fix() string {
	if u.Family != "inet" && u.Chain == strings.ToUpper(u.Chain) {
		// iptables-nft's (its chains are upper case): a native rule
		// would make iptables refuse to list the table.
		cmd := "iptables"
		if u.Family == "ip6" {
			cmd = "ip6tables"
		}
		return fmt.Sprintf("%s -t %s -I %s -m conntrack --ctstate UNTRACKED -j ACCEPT", cmd, u.Table, u.Chain)
	}
	return fmt.Sprintf("nft insert rule %s %s %s ct state untracked accept", u.Family, u.Table, u.Chain)
}

// xtStateUntracked is XT_CONNTRACK_STATE_UNTRACKED, the untracked bit
// of the xtables conntrack match's state mask (1 << (IP_CT_NUMBER + 3)).
const xtStateUntracked = 1 << 8

// xtConntrack is what an xtables conntrack match (iptables-nft's "-m
// conntrack") tests of the state.
type xtConntrack struct {
	flags, invert xt.ConntrackFlags
	mask          uint16
}

// xtConntrackState reads an xtables conntrack match of revision 2 or 3
// (iptables uses 3; revision 1's mask has no untracked bit). As the
// kernel's conntrack_mt, an untracked packet matches when the match
// tests the state and its mask, inverted or not, takes it; the other
// tests are skipped for it.
func xtConntrackState(e *expr.Match) (xtConntrack, bool) {
	if e.Name != "conntrack" {
		return xtConntrack{}, false
	}
	switch info := e.Info.(type) {
	case *xt.ConntrackMtinfo2:
		return xtConntrack{xt.ConntrackFlags(info.MatchFlags), xt.ConntrackFlags(info.InvertFlags), info.StateMask}, true
	case *xt.ConntrackMtinfo3:
		return xtConntrack{xt.ConntrackFlags(info.MatchFlags), xt.ConntrackFlags(info.InvertFlags), info.StateMask}, true
	}
	return xtConntrack{}, false
}

// ctStateUntracked is the untracked bit of "ct state" (NF_CT_STATE_UNTRACKED_BIT).
const ctStateUntracked = 1 << 6

// UntrackedDrops lists the base chains at the forward hook of the tables
// other than ours (families inet, ip and ip6) that drop untracked
// packets: an untracked packet that the chain's rules, and those of the
// chains they jump or go to (verdict maps included), hand to no accept
// that depends on its "ct state" reaches a drop or reject that no
// condition guards, or the chain's end when its policy is drop. The rules
// are followed with the packet's state known (untracked) and all else
// unknown: a rule that accepts untracked packets under further
// conditions counts as accepting them, one that drops them under further
// conditions as not dropping them, and an accept under other conditions
// only (such as "iifname lan0 accept", which passes one direction of a
// flow) as none.
func (m *Manager) UntrackedDrops() ([]UntrackedDrop, error) {
	c, chains, err := m.listChains()
	if err != nil {
		return nil, err
	}
	var out []UntrackedDrop
	for _, ch := range chains {
		t := ch.Table
		if t == nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookForward {
			continue
		}
		fam, ok := familyNames[t.Family]
		if !ok || (t.Family == nftables.TableFamilyINet && t.Name == m.spec.Table) {
			continue
		}
		w := &untrackedWalk{c: c, t: t, seen: map[walkStep]bool{}, sets: map[string]setContents{}}
		o, err := w.chain(ch.Name, untrackedPath{})
		if err != nil {
			return nil, err
		}
		if o == dropsUntracked || (o == passesOn && ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop) {
			out = append(out, UntrackedDrop{Family: fam, Table: t.Name, Chain: ch.Name})
		}
	}
	return out, nil
}

// listChains lists the chains of every table, for the checks of other
// tables' rules, with the connection to read their rules through.
func (m *Manager) listChains() (*nftables.Conn, []*nftables.Chain, error) {
	c, err := m.nft()
	if err != nil {
		return nil, nil, err
	}
	chains, err := c.ListChains()
	if err != nil {
		return nil, nil, fmt.Errorf("list nftables chains: %w", err)
	}
	return c, chains, nil
}

// familyNames are the families whose forward hook IPv4 or IPv6 packets
// pass, as nft names them.
var familyNames = map[nftables.TableFamily]string{
	nftables.TableFamilyINet: "inet",
	nftables.TableFamilyIPv4: "ip",
	nftables.TableFamilyIPv6: "ip6",
}

// outcome is what a chain does with an untracked packet.
type outcome int

const (
	passesOn         outcome = iota // no verdict: the chain returns, or the policy applies
	acceptsUntracked                // accepted (maybe under further conditions)
	dropsUntracked                  // dropped or rejected whatever else the packet is
)

// untrackedPath is how an untracked packet reached a rule or chain: byState,
// through a match on its ct state that it passes; conditional, through
// matches it may fail (anything else).
type untrackedPath struct{ byState, conditional bool }

type walkStep struct {
	chain string
	path  untrackedPath
}

type setContents struct {
	set *nftables.Set
	els []nftables.SetElement
}

// untrackedWalk follows an untracked packet through the chains of a table.
type untrackedWalk struct {
	c    *nftables.Conn
	t    *nftables.Table
	seen map[walkStep]bool // a chain visited again on the same path passes the packet on, as it did
	sets map[string]setContents
}

// chain follows the packet through the rules of chain.
func (w *untrackedWalk) chain(chain string, p untrackedPath) (outcome, error) {
	step := walkStep{chain, p}
	if w.seen[step] {
		return passesOn, nil
	}
	w.seen[step] = true
	rules, err := w.c.GetRules(w.t, &nftables.Chain{Name: chain, Table: w.t})
	if err != nil {
		return passesOn, fmt.Errorf("list the rules of chain %s: %w", chain, err)
	}
	for _, r := range rules {
		ev, err := w.rule(r.Exprs)
		if err != nil {
			return passesOn, err
		}
		if ev.never {
			continue
		}
		q := untrackedPath{p.byState || ev.byState, p.conditional || ev.conditional}
		if ev.verdict != nil {
			o, end, err := w.verdict(*ev.verdict, q)
			if err != nil || o != passesOn || end {
				return o, err
			}
		}
		for _, v := range ev.maybe {
			o, _, err := w.verdict(v, untrackedPath{q.byState, true})
			if err != nil || o != passesOn {
				return o, err
			}
		}
	}
	return passesOn, nil
}

// verdict applies a rule's verdict to the packet that reached it on path
// p; end reports that the chain ends there.
func (w *untrackedWalk) verdict(v expr.Verdict, p untrackedPath) (o outcome, end bool, err error) {
	switch v.Kind {
	case expr.VerdictAccept:
		if p.byState || !p.conditional {
			return acceptsUntracked, true, nil
		}
	case expr.VerdictDrop:
		if !p.conditional {
			return dropsUntracked, true, nil
		}
	case expr.VerdictJump, expr.VerdictGoto:
		o, err := w.chain(v.Chain, p)
		if err != nil || o != passesOn {
			return o, true, err
		}
		return passesOn, v.Kind == expr.VerdictGoto && !p.conditional, nil
	case expr.VerdictReturn:
		return passesOn, !p.conditional, nil
	}
	return passesOn, false, nil
}

// ruleEval is what a rule does with an untracked packet.
type ruleEval struct {
	never                bool // the packet fails a ct state match
	byState, conditional bool // see untrackedPath
	verdict              *expr.Verdict
	maybe                []expr.Verdict // a verdict map's, on a key other than the state
}

// rule evaluates a rule's expressions for an untracked packet: the
// registers loaded with its ct state (and computed from it) are known,
// the rest not.
func (w *untrackedWalk) rule(exprs []expr.Any) (ruleEval, error) {
	var ev ruleEval
	known := map[uint32][]byte{}
	unknown := func() {
		clear(known) // registers overlap (4 of 16 bytes, 16 of 4): forget them all
		ev.conditional = true
	}
	match := func(ok bool) {
		if ok {
			ev.byState = true
		} else {
			ev.never = true
		}
	}
	for _, e := range exprs {
		if ev.never {
			break
		}
		switch e := e.(type) {
		case *expr.Ct:
			if e.SourceRegister { // ct set
				continue
			}
			if e.Key != expr.CtKeySTATE {
				// The kernel ends the rule (NFT_BREAK) for a packet
				// without a conntrack entry: only its state is read.
				ev.never = true
				continue
			}
			clear(known)
			known[e.Register] = binary.NativeEndian.AppendUint32(nil, ctStateUntracked)
		case *expr.Meta:
			if !e.SourceRegister { // a load; meta set is an effect
				clear(known)
			}
		case *expr.Immediate:
			clear(known)
		case *expr.Bitwise:
			v, ok := known[e.SourceRegister]
			if !ok || len(e.Mask) != len(e.Xor) || len(e.Mask) == 0 || len(e.Mask) > len(v) {
				unknown()
				continue
			}
			r := make([]byte, len(e.Mask))
			for i := range r {
				r[i] = v[i]&e.Mask[i] ^ e.Xor[i]
			}
			clear(known)
			known[e.DestRegister] = r
		case *expr.Cmp:
			v, ok := known[e.Register]
			if !ok || len(e.Data) == 0 || len(e.Data) > len(v) {
				unknown()
				continue
			}
			match(compare(e.Op, bytes.Compare(v[:len(e.Data)], e.Data)))
		case *expr.Lookup:
			if err := w.lookup(e, known, &ev); err != nil {
				return ev, err
			}
			if e.IsDestRegSet && e.DestRegister != 0 {
				clear(known) // a data map's value
			}
		case *expr.Verdict:
			ev.verdict = &expr.Verdict{Kind: e.Kind, Chain: e.Chain}
		case *expr.Reject:
			ev.verdict = &expr.Verdict{Kind: expr.VerdictDrop}
		case *expr.Target:
			if e.Name == "REJECT" { // iptables-nft's -j REJECT
				ev.verdict = &expr.Verdict{Kind: expr.VerdictDrop}
			}
		case *expr.Match:
			if st, ok := xtConntrackState(e); ok {
				if st.flags&xt.ConntrackState == 0 {
					ev.never = true // without a state test it matches no untracked packet
				} else {
					match((st.mask&xtStateUntracked != 0) != (st.invert&xt.ConntrackState != 0))
				}
				continue
			}
			unknown()
		case *expr.Counter, *expr.Log, *expr.Notrack:
		default:
			unknown()
		}
	}
	return ev, nil
}

// lookup evaluates a set lookup or a map's.
func (w *untrackedWalk) lookup(e *expr.Lookup, known map[uint32][]byte, ev *ruleEval) error {
	v, isKnown := known[e.SourceRegister]
	vmap := e.IsDestRegSet && e.DestRegister == 0
	if !isKnown && !vmap {
		ev.conditional = true
		return nil
	}
	s, err := w.set(e.SetName)
	if err != nil {
		return err
	}
	if !isKnown || s.set.Interval {
		ev.conditional = true
		if vmap {
			for _, el := range s.els {
				if d, ok := elementVerdict(el); ok {
					ev.maybe = append(ev.maybe, d)
				}
			}
		}
		return nil
	}
	for _, el := range s.els {
		if !bytes.Equal(el.Key, v) {
			continue
		}
		if e.Invert {
			ev.never = true
			return nil
		}
		ev.byState = true
		if vmap {
			if d, ok := elementVerdict(el); ok {
				ev.verdict = &d
			}
		}
		return nil
	}
	if e.Invert {
		ev.byState = true
	} else {
		ev.never = true
	}
	return nil
}

// set reads a set and its elements once per walk.
func (w *untrackedWalk) set(name string) (setContents, error) {
	return readSet(w.c, w.t, w.sets, name)
}

// readSet reads set name of table t and its elements, once per walk:
// cache holds what the walk read.
func readSet(c *nftables.Conn, t *nftables.Table, cache map[string]setContents, name string) (setContents, error) {
	if s, ok := cache[name]; ok {
		return s, nil
	}
	set, err := c.GetSetByName(t, name)
	if err != nil {
		return setContents{}, fmt.Errorf("get set %s: %w", name, err)
	}
	els, err := c.GetSetElements(set)
	if err != nil {
		return setContents{}, fmt.Errorf("list set %s: %w", name, err)
	}
	s := setContents{set, els}
	cache[name] = s
	return s, nil
}

// compare applies a cmp expression's operator to a bytes.Compare result,
// as the kernel does (memcmp).
func compare(op expr.CmpOp, d int) bool {
	switch op {
	case expr.CmpOpEq:
		return d == 0
	case expr.CmpOpNeq:
		return d != 0
	case expr.CmpOpLt:
		return d < 0
	case expr.CmpOpLte:
		return d <= 0
	case expr.CmpOpGt:
		return d > 0
	case expr.CmpOpGte:
		return d >= 0
	}
	return false
}

// elementVerdict reads the verdict of a verdict map's element. The
// library decodes it for no map: it is in Val, as the kernel sends it,
// nested NFTA_VERDICT_CODE (big endian) and NFTA_VERDICT_CHAIN.
func elementVerdict(el nftables.SetElement) (expr.Verdict, bool) {
	if el.VerdictData != nil {
		return *el.VerdictData, true
	}
	ad, err := netlink.NewAttributeDecoder(el.Val)
	if err != nil {
		return expr.Verdict{}, false
	}
	ad.ByteOrder = binary.BigEndian
	var v expr.Verdict
	found := false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			v.Kind, found = expr.VerdictKind(int32(ad.Uint32())), true
		case unix.NFTA_VERDICT_CHAIN:
			v.Chain = ad.String()
		}
	}
	return v, found && ad.Err() == nil
}
