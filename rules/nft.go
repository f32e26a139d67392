package rules

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// table returns our table object.
func (spec *Spec) table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: spec.Table}
}

// queueTable adds to the batch the messages that atomically replace our
// whole table with the spec: "add table; delete table; add table; ...".
// The first add makes the delete succeed when the table does not exist.
func queueTable(c *nftables.Conn, spec *Spec, divert map[uint16][]splice.Key) error {
	t := spec.table()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	return queueContents(c, spec, t, divert)
}

// listTable lists the chains of family inet (the callers keep t's) and
// the sets of table t.
func listTable(c *nftables.Conn, t *nftables.Table) ([]*nftables.Chain, []*nftables.Set, error) {
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, nil, err
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, nil, err
	}
	return chains, sets, nil
}

// queueReplace adds to the batch the messages that atomically replace
// the contents of our existing table with the spec, keeping the table
// (an owned one: see owner): every chain is flushed and deleted, every
// named set deleted, then the contents added. The kernel deletes a table
// in the same order (rules, sets, chains).
func queueReplace(c *nftables.Conn, spec *Spec, divert map[uint16][]splice.Key) error {
	t := spec.table()
	chains, sets, err := listTable(c, t)
	if err != nil {
		return err
	}
	var ours []*nftables.Chain
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == spec.Table {
			ours = append(ours, &nftables.Chain{Name: ch.Name, Table: t})
		}
	}
	for _, ch := range ours {
		c.FlushChain(ch)
	}
	for _, st := range sets {
		if !st.Anonymous {
			c.DelSet(&nftables.Set{Table: t, Name: st.Name})
		}
	}
	for _, ch := range ours {
		c.DelChain(ch)
	}
	return queueContents(c, spec, t, divert)
}

// queueInPlace adds to a batch what restores the existing table t to
// spec without deleting it: every chain of t is flushed (and deleted if
// spec has no such chain), every set but the divert sets spec has is
// deleted, then the contents are added again. The base chains that stay
// keep their hooks, so that a packet a queue holds resumes where it
// would have (see Manager.UpdateServices); the divert sets keep their
// elements. A base chain whose hook or priority was changed cannot be
// updated: the batch then fails, and the caller replaces the table.
func queueInPlace(c *nftables.Conn, spec *Spec, divert map[uint16][]splice.Key) error {
	t := spec.table()
	chains, sets, err := listTable(c, t)
	if err != nil {
		return err
	}
	ours := map[string]bool{ChainPrerouting: true, ChainServices: true, ChainSockets: true, ChainInput: true}
	keep := map[string]bool{}
	if spec.Divert.Enabled {
		ours[ChainDivert], ours[ChainDivertQueues], ours[ChainDivertPMTU], ours[ChainDivertCommand] = true, true, true, true
		keep[DivertAnySetName(false)], keep[DivertAnySetName(true)] = true, true
		for i := range spec.Divert.Queues {
			keep[DivertSetName(i, false)], keep[DivertSetName(i, true)] = true, true
		}
	}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != spec.Table {
			continue
		}
		c.FlushChain(&nftables.Chain{Name: ch.Name, Table: t})
	}
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == spec.Table && !ours[ch.Name] {
			c.DelChain(&nftables.Chain{Name: ch.Name, Table: t})
		}
	}
	for _, st := range sets {
		if !keep[st.Name] {
			c.DelSet(&nftables.Set{Table: t, Name: st.Name})
		}
	}
	return queueContents(c, spec, t, divert)
}

// queueContents adds the chains, rules and sets of spec to table t.
func queueContents(c *nftables.Conn, spec *Spec, t *nftables.Table, divert map[uint16][]splice.Key) error {
	if spec.Divert.Enabled {
		if err := queueDivert(c, spec, t, divert); err != nil {
			return err
		}
	}
	pre := c.AddChain(&nftables.Chain{
		Name:     ChainPrerouting,
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookPrerouting,
		Priority: nftables.ChainPriorityMangle,
	})
	svc := c.AddChain(&nftables.Chain{Name: ChainServices, Table: t})
	sockets := c.AddChain(&nftables.Chain{Name: ChainSockets, Table: t})
	if spec.Divert.Enabled && spec.Divert.SkipMark != 0 {
		// What the kernel datapath rewrote belongs to a spliced flow, for
		// which no gateway socket exists: spare it the socket lookups.
		c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: markedExprs(spec.Divert.SkipMark)})
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
		l4protoTCP(),
		matchCtMark(spec.CtMark),
		[]expr.Any{
			&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
			// A socket of the connection, not the listener that a SYN
			// cookie's ACK finds (its handshake is not over).
			&expr.Socket{Key: expr.SocketKeyWildcard, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0}},
		},
		setCtMark(spec.CtMark, false),
	)})
	// A SYN tries the services before the socket rule: a socket may
	// claim it that is in TIME_WAIT (the gateway closed first and the
	// client reuses its port), and would answer it with an ACK, as no
	// listener holds the original destination; TPROXY hands such a SYN
	// to the service's listener and ends the TIME_WAIT socket. A SYN no
	// service takes comes back for the socket rule (an FTP data
	// listener bound transparently to the server's address).
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
		l4protoTCP(),
		tcpFlags(flagSYN|flagACK, flagSYN),
		[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainServices}},
	)})
	// A packet for a transparent socket of the gateway goes to it, unless
	// that socket is a TPROXY listener (bound to the wildcard address):
	// the lookup finds one for a packet to any host on its port, and
	// such a packet reaches a listener only through a service's TPROXY
	// rule. Without the exception every flow through the gateway to a
	// listen port (15001, say) was taken by that listener's service.
	// The exception has a chain of its own: the wildcard key breaks the
	// rule for a request or TIME_WAIT socket (not full sockets), which
	// must match.
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
		l4protoTCP(),
		[]expr.Any{
			&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainSockets},
		},
	)})
	c.AddRule(&nftables.Rule{Table: t, Chain: sockets, Exprs: []expr.Any{
		&expr.Socket{Key: expr.SocketKeyWildcard, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
		&expr.Verdict{Kind: expr.VerdictReturn},
	}})
	c.AddRule(&nftables.Rule{Table: t, Chain: sockets, Exprs: concat(
		setMark(spec.Mark),
		[]expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}},
	)})
	// An ICMP error about a packet a transparent socket of the gateway
	// sent (an upstream socket bound to the client's address) is
	// addressed to that address, which is not the gateway's: without
	// the mark it is forwarded to the client, which ignores it, and the
	// socket never hears of it. A path MTU error lost so stalls the flow
	// for good. The socket expression finds the socket by the error's
	// quoted tuple.
	for _, proto := range []byte{unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6} {
		c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
			[]expr.Any{
				&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
				&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
				// Not a listener on the wildcard address (a TPROXY
				// listener): the lookup by the quote's source port
				// finds one for any forwarded host using that port.
				&expr.Socket{Key: expr.SocketKeyWildcard, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0}},
			},
			setMark(spec.Mark),
			[]expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}},
		)})
	}
	// What the services chain takes of a packet that is no SYN: only
	// the ACK of a SYN-cookie handshake, whose connection has the bit
	// (see above). Without the bit's match every packet the gateway
	// only routes went through every service's rules, each a set
	// lookup of its port.
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
		matchCtMark(spec.CtMark),
		[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainServices}},
	)})
	// The mark routed the packet to the gateway's own sockets; that
	// done, it is taken off again before the socket sees it. With
	// net.ipv4.tcp_fwmark_accept on, a socket accepted from a SYN (or
	// a SYN cookie's ACK) takes that packet's mark, and its SYN-ACK and
	// everything after it would be routed by spliced's route table back
	// into the gateway: no intercepted connection opened
	// (TestLabFwmarkAccept). With net.ipv4.fwmark_reflect on, the
	// kernel's replies to a packet without a socket (a reset) take its
	// mark the same way.
	input := c.AddChain(&nftables.Chain{
		Name:     ChainInput,
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookInput,
		Priority: nftables.ChainPriorityMangle,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: concat(
		matchMark(spec.Mark),
		clearMark(spec.Mark),
	)})
	return queueServices(c, spec, t, svc)
}

// queueServices adds the sets and TPROXY rules of every service.
func queueServices(c *nftables.Conn, spec *Spec, t *nftables.Table, chain *nftables.Chain) error {
	for i := range spec.Services {
		s := &spec.Services[i]
		sets := map[string]*nftables.Set{}
		for _, d := range s.sets() {
			set, err := addIntervalSet(c, t, d)
			if err != nil {
				return fmt.Errorf("service %s: %w", s.Name, err)
			}
			sets[d.name] = set
		}
		v4, v6 := s.Families()
		for _, fam := range []struct {
			on bool
			v6 bool
		}{{v4, false}, {v6, true}} {
			if !fam.on {
				continue
			}
			for _, kind := range []serviceRule{ruleSYNConntrack, ruleSYN, ruleCookieACK} {
				c.AddRule(&nftables.Rule{
					Table:    t,
					Chain:    chain,
					Exprs:    serviceExprs(spec, s, sets, fam.v6, kind),
					UserData: userdata.AppendString(nil, userdata.TypeComment, ruleComment(s)),
				})
			}
		}
	}
	return nil
}

// serviceRule is one of a service's rules, per address family.
type serviceRule int

const (
	// ruleSYNConntrack sets spliced's conntrack mark bit on a SYN's
	// connection (see ruleCookieACK). It is a rule of its own because a
	// packet conntrack did not take (INVALID: a SYN from the reply side
	// of a stale entry, as when the gateway's own socket started a
	// connection's current entry and the client now reuses the port)
	// has no ct mark, and reading it ends the rule: in the SYN's rule it
	// would skip the TPROXY statement after it, and the SYN, already
	// marked for local delivery, would find no socket and be lost.
	ruleSYNConntrack serviceRule = iota
	// ruleSYN sends a new connection's SYN to the listener.
	ruleSYN
	// ruleCookieACK sends the ACK that completes a handshake the
	// listener answered with a SYN cookie to the listener. Such an ACK
	// finds no socket (the listener kept no request), so the socket rule
	// of the prerouting chain does not deliver it; the conntrack mark
	// set on the SYN says it belongs to the listener. Any other packet
	// without a socket is routed on as before: a listener would answer
	// it with a reset.
	ruleCookieACK
)

// serviceExprs is one rule of a service (see serviceRule).
func serviceExprs(spec *Spec, s *Service, sets map[string]*nftables.Set, v6 bool, kind serviceRule) []expr.Any {
	nfproto, tproxyFamily := byte(unix.NFPROTO_IPV4), byte(unix.NFPROTO_IPV4)
	saddrOff, daddrOff, addrLen := uint32(12), uint32(16), uint32(4)
	if v6 {
		nfproto, tproxyFamily = unix.NFPROTO_IPV6, unix.NFPROTO_IPV6
		saddrOff, daddrOff, addrLen = 8, 24, 16
	}
	lookup := func(name string) *expr.Lookup {
		return &expr.Lookup{SourceRegister: 1, SetName: name, SetID: sets[name].ID}
	}
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
	}
	e = append(e, l4protoTCP()...)
	e = append(e,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		lookup(portsSet(s.Name)),
	)
	if !s.AnySrc {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: saddrOff, Len: addrLen},
			lookup(addrSet(s.Name, "src", v6)))
	}
	if !s.AnyDst {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOff, Len: addrLen},
			lookup(addrSet(s.Name, "dst", v6)))
	}
	switch kind {
	case ruleSYNConntrack, ruleSYN:
		// tcp flags & (syn|ack) == syn: new connections only.
		e = append(e, tcpFlags(flagSYN|flagACK, flagSYN)...)
		if kind == ruleSYNConntrack {
			return append(e, setCtMark(spec.CtMark, true)...)
		}
	case ruleCookieACK:
		// ct mark & C == C, tcp flags & (syn|rst|ack) == ack.
		e = append(e, matchCtMark(spec.CtMark)...)
		e = append(e, tcpFlags(flagSYN|flagRST|flagACK, flagACK)...)
	}
	e = append(e, setMark(spec.Mark)...)
	return append(e,
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(s.Listen)},
		&expr.TProxy{Family: tproxyFamily, TableFamily: unix.NFPROTO_INET, RegPort: 1},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
}

func l4protoTCP() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

// TCP header flags.
const (
	flagSYN = 0x02
	flagRST = 0x04
	flagACK = 0x10
)

// tcpFlags is "tcp flags & mask == want".
func tcpFlags(mask, want byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{mask}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{want}},
	}
}

// matchCtMark is "ct mark & C == C". An untracked packet has no ct mark
// and does not match.
func matchCtMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mark),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
}

// setCtMark is "ct mark set ct mark | C" (on) or "ct mark set ct mark &
// ~C" (off): only our bits change.
func setCtMark(mark uint32, on bool) []expr.Any {
	xor := uint32(0)
	if on {
		xor = mark
	}
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^mark),
			Xor:  binaryutil.NativeEndian.PutUint32(xor)},
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
	}
}

// setMark is "meta mark set meta mark | M": only our bits change.
func setMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^mark),
			Xor:  binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// matchMark is "meta mark & M == M".
func matchMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mark),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
}

// clearMark is "meta mark set meta mark & ~M": only our bits change.
func clearMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^mark),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// addIntervalSet adds a named interval set with its elements encoded the
// way nft encodes them: each interval is a start element and an
// interval-end element holding the first value after it; a gap before the
// first interval starts with an interval-end element at zero.
func addIntervalSet(c *nftables.Conn, t *nftables.Table, d setDef) (*nftables.Set, error) {
	set := &nftables.Set{Table: t, Name: d.name, Interval: true}
	var ivs [][2][]byte // [start, end+1]; end+1 nil when the interval runs to the maximum
	switch d.typ() {
	case "inet_service":
		set.KeyType = nftables.TypeInetService
		for _, r := range d.ports {
			iv := [2][]byte{binary.BigEndian.AppendUint16(nil, r.First), nil}
			if r.Last < 0xffff {
				iv[1] = binary.BigEndian.AppendUint16(nil, r.Last+1)
			}
			ivs = append(ivs, iv)
		}
	default:
		set.KeyType = nftables.TypeIPAddr
		if d.v6 {
			set.KeyType = nftables.TypeIP6Addr
		}
		for _, p := range d.addrs {
			first, next, ok := prefixBounds(p)
			iv := [2][]byte{first.AsSlice(), nil}
			if ok {
				iv[1] = next.AsSlice()
			}
			ivs = append(ivs, iv)
		}
	}
	var elems []nftables.SetElement
	if len(ivs) > 0 && !isZero(ivs[0][0]) {
		elems = append(elems, nftables.SetElement{Key: make([]byte, len(ivs[0][0])), IntervalEnd: true})
	}
	for _, iv := range ivs {
		elems = append(elems, nftables.SetElement{Key: iv[0]})
		if iv[1] != nil {
			elems = append(elems, nftables.SetElement{Key: iv[1], IntervalEnd: true})
		}
	}
	if err := c.AddSet(set, elems); err != nil {
		return nil, fmt.Errorf("add set %s: %w", d.name, err)
	}
	return set, nil
}

// prefixBounds returns the first address of p and the first address after
// it; ok is false when p reaches the end of the address space.
func prefixBounds(p netip.Prefix) (first, next netip.Addr, ok bool) {
	first = p.Masked().Addr()
	b := first.AsSlice()
	// last = first | host bits; next = last + 1
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	for i := len(b) - 1; i >= 0; i-- {
		b[i]++
		if b[i] != 0 {
			next, _ = netip.AddrFromSlice(b)
			return first, next, true
		}
	}
	return first, netip.Addr{}, false
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
