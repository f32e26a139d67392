package rules

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
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
// rewrites packets' source (masquerade or snat), with the conditions
// under which it does that the check reads: the rule's own, and those of
// the rules that jumped to its chain. Other conditions (ports, marks,
// destinations) are taken to hold.
type SourceNAT struct {
	Family, Table, Chain string
	Masquerade           bool // else snat
	// IPv4, IPv6: the families of the packets it applies to (the
	// table's, "meta nfproto", an inet table's "snat ip" or "snat ip6").
	IPv4, IPv6 bool
	// From is the source prefix it is limited to (ip saddr, ip6 saddr);
	// not valid: any source.
	From netip.Prefix
	// Oif are the conditions on the output interface, all of which hold
	// where it applies; none: any interface.
	Oif []IfMatch
}

// IfMatch is a condition on an output interface's name: it is one of
// Names, or with Not none of them. A name ending in "*" is a prefix
// (nft's "wan*", iptables' "wan+").
type IfMatch struct {
	Names []string
	Not   bool
}

// Matches reports whether the interface named ifname meets m.
func (m IfMatch) Matches(ifname string) bool {
	in := slices.ContainsFunc(m.Names, func(n string) bool {
		if p, ok := strings.CutSuffix(n, "*"); ok {
			return strings.HasPrefix(ifname, p)
		}
		return ifname == n
	})
	return in != m.Not
}

// exact reports whether m lists whole names only.
func (m IfMatch) exact() bool {
	return !m.Not && !slices.ContainsFunc(m.Names, func(n string) bool { return strings.HasSuffix(n, "*") })
}

func (m IfMatch) equal(o IfMatch) bool { return m.Not == o.Not && slices.Equal(m.Names, o.Names) }

func (s SourceNAT) String() string {
	what := "snat"
	if s.Masquerade {
		what = "masquerade"
	}
	if s.Family == "inet" && s.IPv4 != s.IPv6 {
		what = map[bool]string{true: "IPv4 ", false: "IPv6 "}[s.IPv4] + what
	}
	if s.From.IsValid() {
		what += " from " + s.From.String()
	}
	var in, notIn []string
	for _, m := range s.Oif {
		if m.Not {
			notIn = append(notIn, m.Names...)
		} else {
			in = append(in, strings.Join(m.Names, " or "))
		}
	}
	on := "on every interface"
	if len(in) > 0 {
		on = "on " + strings.Join(in, " and ")
	}
	if len(notIn) > 0 {
		if len(in) > 0 {
			on += " but not "
		} else {
			on += " but "
		}
		on += strings.Join(notIn, ", ")
	}
	return fmt.Sprintf("table %s %s chain %s (%s %s)", s.Family, s.Table, s.Chain, what, on)
}

// Matches reports whether the rule applies to packets leaving on the
// interface named ifname (as far as its interface conditions tell).
func (s SourceNAT) Matches(ifname string) bool {
	for _, m := range s.Oif {
		if !m.Matches(ifname) {
			return false
		}
	}
	return true
}

// Applies reports whether the rule applies to packets of the family
// (ipv6 or not) leaving on ifname from one of sources (none: any
// address).
func (s SourceNAT) Applies(ifname string, ipv6 bool, sources []netip.Prefix) bool {
	if ipv6 && !s.IPv6 || !ipv6 && !s.IPv4 || !s.Matches(ifname) {
		return false
	}
	if !s.From.IsValid() || len(sources) == 0 {
		return true
	}
	return slices.ContainsFunc(sources, func(p netip.Prefix) bool { return p.Overlaps(s.From) })
}

// SourceNATs lists the source NAT rules of the other tables' postrouting
// nat chains (families inet, ip and ip6), following their jumps and
// gotos, verdict maps' among them. A rule reached on several paths
// under the same conditions is listed once.
func (m *Manager) SourceNATs() ([]SourceNAT, error) {
	c, chains, err := m.listChains()
	if err != nil {
		return nil, err
	}
	var out []SourceNAT
	links := map[uint32]string{}
	walks := map[string]*natWalk{} // by table
	for _, ch := range chains {
		t := ch.Table
		if t == nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookPostrouting || ch.Type != nftables.ChainTypeNAT {
			continue
		}
		fam, ok := familyNames[t.Family]
		if !ok || (t.Family == nftables.TableFamilyINet && t.Name == m.spec.Table) {
			continue
		}
		w := walks[fam+" "+t.Name]
		if w == nil {
			w = &natWalk{m: m, c: c, t: t, fam: fam, links: links,
				rules: map[string][]*nftables.Rule{}, sets: map[string]setContents{},
				done: map[string]bool{}, onPath: map[string]bool{}, out: &out}
			walks[fam+" "+t.Name] = w
		}
		cond := natCond{v4: t.Family != nftables.TableFamilyIPv6, v6: t.Family != nftables.TableFamilyIPv4}
		if err := w.chain(ch.Name, cond); err != nil {
			return nil, fmt.Errorf("table %s %s: %w", fam, t.Name, err)
		}
	}
	return out, nil
}

// maxNATWalk bounds the chains (under distinct conditions) one walk
// follows: jumps under ever different conditions could make it
// exponential.
const maxNATWalk = 10000

// natCond is what a packet that reaches a rule is known to be.
type natCond struct {
	v4, v6 bool
	from   netip.Prefix
	oif    []IfMatch
	never  bool // the conditions contradict each other
}

func (c natCond) clone() natCond {
	c.oif = slices.Clone(c.oif)
	return c
}

// key identifies c for the walk's memory of the chains it followed.
func (c natCond) key() string {
	return fmt.Sprint(c.v4, c.v6, c.from, c.oif)
}

// family keeps the packets of the family v6 (or not), or drops them.
func (c *natCond) family(v6, keep bool) {
	if v6 == keep {
		c.v4 = false
	} else {
		c.v6 = false
	}
	if !c.v4 && !c.v6 {
		c.never = true
	}
}

// source limits c to the source prefix p.
func (c *natCond) source(p netip.Prefix) {
	switch {
	case !c.from.IsValid() || p.Bits() > c.from.Bits() && c.from.Contains(p.Addr()):
		c.from = p
	case !p.Contains(c.from.Addr()):
		c.never = true
	}
}

// iface adds the interface condition m. A condition that lists whole
// names takes in the others: the names that meet them all remain.
func (c *natCond) iface(m IfMatch) {
	if m.Not && len(m.Names) == 0 || slices.ContainsFunc(c.oif, m.equal) {
		return // none of no names: any interface
	}
	c.oif = append(c.oif, m)
	i := slices.IndexFunc(c.oif, IfMatch.exact)
	if i < 0 {
		return
	}
	var names []string
	for _, n := range c.oif[i].Names {
		if (SourceNAT{Oif: c.oif}).Matches(n) {
			names = append(names, n)
		}
	}
	c.oif = []IfMatch{{Names: names}}
	c.never = len(names) == 0
}

// natWalk follows the rules of a table's postrouting nat chain.
type natWalk struct {
	m      *Manager
	c      *nftables.Conn
	t      *nftables.Table
	fam    string
	links  map[uint32]string // interface names by index, "" for none
	rules  map[string][]*nftables.Rule
	sets   map[string]setContents
	done   map[string]bool // chains followed, under a condition
	onPath map[string]bool
	steps  int
	out    *[]SourceNAT
}

// reg is what the walk knows a register holds.
type reg struct {
	kind uint8
	mask []byte // a source address's, after a bitwise and
}

const (
	regOifname = iota + 1
	regOif
	regNfproto
	regProtocol
	regSaddr // of the family the rule is limited to
)

// chain adds the source NAT rules of chain, and of the chains its rules
// jump or go to, under cond.
func (w *natWalk) chain(chain string, cond natCond) error {
	step := chain + "\x00" + cond.key()
	if w.done[step] || w.onPath[chain] {
		return nil
	}
	w.done[step] = true
	if w.steps++; w.steps > maxNATWalk {
		return fmt.Errorf("more than %d chains to follow (under distinct conditions)", maxNATWalk)
	}
	w.onPath[chain] = true
	defer delete(w.onPath, chain)
	rules, ok := w.rules[chain]
	if !ok {
		var err error
		if rules, err = w.c.GetRules(w.t, &nftables.Chain{Name: chain, Table: w.t}); err != nil {
			return fmt.Errorf("list the rules of chain %s: %w", chain, err)
		}
		w.rules[chain] = rules
	}
	for _, r := range rules {
		if err := w.rule(chain, r.Exprs, cond.clone()); err != nil {
			return err
		}
	}
	return nil
}

// rule follows a rule's expressions: the conditions it adds to rc, the
// source NAT it does, the chains it jumps to.
func (w *natWalk) rule(chain string, exprs []expr.Any, rc natCond) error {
	regs := map[uint32]reg{}
	add := func(masq bool) {
		s := SourceNAT{Family: w.fam, Table: w.t.Name, Chain: chain, Masquerade: masq, IPv4: rc.v4, IPv6: rc.v6, From: rc.from, Oif: rc.oif}
		if !slices.ContainsFunc(*w.out, func(o SourceNAT) bool { return o.String() == s.String() }) {
			*w.out = append(*w.out, s)
		}
	}
	for _, e := range exprs {
		if rc.never {
			return nil
		}
		switch e := e.(type) {
		case *expr.Meta:
			if e.SourceRegister { // meta set
				continue
			}
			clear(regs) // registers overlap (4 of 16 bytes): forget them all
			if k, ok := map[expr.MetaKey]uint8{expr.MetaKeyOIFNAME: regOifname, expr.MetaKeyOIF: regOif,
				expr.MetaKeyNFPROTO: regNfproto, expr.MetaKeyPROTOCOL: regProtocol}[e.Key]; ok {
				regs[e.Register] = reg{kind: k}
			}
		case *expr.Payload:
			if e.OperationType != expr.PayloadLoad {
				clear(regs)
				continue
			}
			clear(regs)
			// ip saddr at 12 of the IPv4 header, ip6 saddr at 8.
			if e.Base == expr.PayloadBaseNetworkHeader &&
				(rc.v4 && !rc.v6 && e.Offset == 12 && e.Len <= 4 || rc.v6 && !rc.v4 && e.Offset == 8 && e.Len <= 16) {
				regs[e.DestRegister] = reg{kind: regSaddr}
			}
		case *expr.Bitwise:
			r, ok := regs[e.SourceRegister]
			clear(regs)
			if ok && r.kind == regSaddr && r.mask == nil && len(e.Mask) == len(e.Xor) && !slices.ContainsFunc(e.Xor, func(b byte) bool { return b != 0 }) {
				regs[e.DestRegister] = reg{kind: regSaddr, mask: e.Mask}
			}
		case *expr.Cmp:
			if e.Op == expr.CmpOpEq || e.Op == expr.CmpOpNeq {
				w.cmp(&rc, regs[e.Register], e.Data, e.Op == expr.CmpOpNeq)
			}
		case *expr.Lookup:
			r := regs[e.SourceRegister]
			vmap := e.IsDestRegSet && e.DestRegister == 0
			if e.IsDestRegSet && !vmap {
				clear(regs) // a data map's value
			}
			if err := w.lookup(chain, e, r, vmap, &rc); err != nil {
				return err
			}
		case *expr.Masq:
			add(true)
		case *expr.NAT:
			if e.Type != expr.NATTypeSourceNAT {
				continue
			}
			if w.fam == "inet" && (e.Family == unix.NFPROTO_IPV4 || e.Family == unix.NFPROTO_IPV6) {
				rc.family(e.Family == unix.NFPROTO_IPV6, true) // snat ip, snat ip6
			}
			if !rc.never {
				add(false)
			}
		case *expr.Target: // iptables-nft's -j MASQUERADE, -j SNAT
			if e.Name == "MASQUERADE" || e.Name == "SNAT" {
				add(e.Name == "MASQUERADE")
			}
		case *expr.Verdict:
			if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
				if err := w.chain(e.Chain, rc); err != nil {
					return err
				}
			}
		case *expr.Counter, *expr.Log, *expr.Match:
		default:
			// Anything else may load a register (an address, a port, a
			// NAT target's address): it no longer holds what it did.
			clear(regs)
		}
	}
	return nil
}

// cmp adds the condition of an equality (or, with not, inequality) test
// of a register's value.
func (w *natWalk) cmp(rc *natCond, r reg, data []byte, not bool) {
	switch r.kind {
	case regOifname:
		rc.iface(IfMatch{Names: []string{ifname(data)}, Not: not})
	case regOif:
		if len(data) != 4 {
			return
		}
		switch name := w.linkName(binary.NativeEndian.Uint32(data)); {
		case name != "":
			rc.iface(IfMatch{Names: []string{name}, Not: not})
		case !not:
			rc.never = true // the interface is gone: no packet leaves on it
		}
	case regNfproto:
		if len(data) == 1 && (data[0] == unix.NFPROTO_IPV4 || data[0] == unix.NFPROTO_IPV6) {
			rc.family(data[0] == unix.NFPROTO_IPV6, !not)
		}
	case regProtocol:
		if len(data) == 2 {
			switch binary.BigEndian.Uint16(data) {
			case unix.ETH_P_IP:
				rc.family(false, !not)
			case unix.ETH_P_IPV6:
				rc.family(true, !not)
			}
		}
	case regSaddr:
		if p, ok := sourcePrefix(data, r.mask, rc.v6); ok && !not {
			rc.source(p)
		}
	}
}

// lookup adds the condition of a set lookup on the output interface's
// name, and follows a verdict map's jumps and gotos: those of the
// elements for an interface name or a family under that condition, the
// others under rc's.
func (w *natWalk) lookup(chain string, e *expr.Lookup, r reg, vmap bool, rc *natCond) error {
	if !vmap && r.kind != regOifname {
		return nil // a condition the check does not read
	}
	s, err := w.set(e.SetName)
	if err != nil {
		return err
	}
	var names []string
	var keys []string // of the elements, "" where not an interface name
	if r.kind == regOifname {
		names, keys = ifnameElements(s)
	}
	if !vmap {
		if names != nil {
			rc.iface(IfMatch{Names: names, Not: e.Invert})
		}
		return nil
	}
	for i, el := range s.els {
		v, ok := elementVerdict(el)
		if !ok || v.Kind != expr.VerdictJump && v.Kind != expr.VerdictGoto {
			continue
		}
		ec := rc.clone()
		switch {
		case r.kind == regOifname && keys != nil && keys[i] != "":
			ec.iface(IfMatch{Names: []string{keys[i]}})
		case r.kind == regNfproto && len(el.Key) >= 1 && (el.Key[0] == unix.NFPROTO_IPV4 || el.Key[0] == unix.NFPROTO_IPV6):
			ec.family(el.Key[0] == unix.NFPROTO_IPV6, true)
		}
		if !ec.never {
			if err := w.chain(v.Chain, ec); err != nil {
				return err
			}
		}
	}
	return nil
}

// set reads a set and its elements once per walk.
func (w *natWalk) set(name string) (setContents, error) {
	return readSet(w.c, w.t, w.sets, name)
}

// linkName is the name of the interface with the index, in the
// Manager's namespace; "" if there is none.
func (w *natWalk) linkName(index uint32) string {
	if name, ok := w.links[index]; ok {
		return name
	}
	name := ""
	if rt, err := w.m.rtnl(); err == nil {
		if l, err := rt.Link.Get(index); err == nil && l.Attributes != nil {
			name = l.Attributes.Name
		}
		rt.Close()
	}
	w.links[index] = name
	return name
}

// ifname reads an interface name compared with meta oifname: a whole
// name ends in a NUL within its IFNAMSIZ bytes; a prefix ("wan*") does
// not, and is returned with a "*".
func ifname(data []byte) string {
	if i := bytes.IndexByte(data, 0); i >= 0 {
		return string(data[:i])
	}
	return string(data) + "*"
}

// ifnameElements reads a set of interface names: names, for the set's
// condition (nil if an element is neither a name nor a prefix, such as
// a range), and keys, each element's name ("" for none: an interval's
// end). An interval set (one with a prefix) holds each as a start
// element and an end element after its last value.
func ifnameElements(s setContents) (names, keys []string) {
	keys = make([]string, len(s.els))
	if !s.set.Interval {
		for i, el := range s.els {
			keys[i] = ifname(el.Key)
			names = append(names, keys[i])
		}
		slices.Sort(names)
		return names, keys
	}
	order := make([]int, len(s.els))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return bytes.Compare(s.els[a].Key, s.els[b].Key) })
	for j, i := range order {
		el := s.els[i]
		if el.IntervalEnd {
			continue
		}
		var end []byte
		if j+1 < len(order) && s.els[order[j+1]].IntervalEnd {
			end = s.els[order[j+1]].Key
		}
		name, ok := ifnameRange(el.Key, end)
		if !ok {
			return nil, keys
		}
		keys[i] = name
		names = append(names, name)
	}
	slices.Sort(names)
	return names, keys
}

// ifnameRange reads the interval [start, end) of interface names as a
// name (end is start + 1) or a prefix (end is the prefix + 1).
func ifnameRange(start, end []byte) (string, bool) {
	i := bytes.IndexByte(start, 0)
	if i <= 0 || end == nil || len(end) != len(start) || len(bytes.TrimLeft(start[i:], "\x00")) > 0 {
		return "", false
	}
	if bytes.Equal(end, increment(start)) {
		return string(start[:i]), true
	}
	p := slices.Clone(start)
	if p[i-1] != 0xff {
		p[i-1]++
		if bytes.Equal(end, p) {
			return string(start[:i]) + "*", true
		}
	}
	return "", false
}

// increment adds one to b, a big-endian number.
func increment(b []byte) []byte {
	b = slices.Clone(b)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i]++; b[i] != 0 {
			break
		}
	}
	return b
}

// sourcePrefix reads a source address compared with ip saddr or ip6
// saddr: data is the whole address, its first bytes (a prefix of whole
// bytes), or the address masked (mask: the bitwise and's, contiguous).
func sourcePrefix(data, mask []byte, v6 bool) (netip.Prefix, bool) {
	size := 4
	if v6 {
		size = 16
	}
	if len(data) == 0 || len(data) > size || mask != nil && len(mask) != len(data) {
		return netip.Prefix{}, false
	}
	n := len(data) * 8
	if mask != nil {
		n = 0
		for i, b := range mask {
			ones := bits.LeadingZeros8(^b)
			if b<<ones != 0 || n != i*8 && b != 0 { // a one after a zero: not a prefix
				return netip.Prefix{}, false
			}
			n += ones
		}
	}
	a := make([]byte, size)
	copy(a, data)
	addr, _ := netip.AddrFromSlice(a)
	return netip.PrefixFrom(addr, n).Masked(), true
}
