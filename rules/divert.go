package rules

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Divert configures the spliced-flow part of the table: the packets of
// every spliced flow are looked up in sets of 4-tuples in a prerouting
// chain that runs before conntrack and TPROXY, marked untracked, and queued
// to the splice engine. Each queue has its own pair of sets (IPv4, IPv6)
// and one rule per family; adding a flow adds two elements (~0.1 ms) to
// the sets of the queue the gateway chose for it, never a rule. Choosing
// per flow, rather than letting the kernel hash addresses, spreads flows
// between the same two hosts over all queues (cores) while both directions
// of one flow stay on one queue, in order.
//
// Elements are added from the packet path too, which costs microseconds
// where a netlink transaction costs 50-500: the sets are dynamic, and an
// output chain (divertcmd) turns a command packet the gateway sends
// through a raw socket with the mark DivertCommandMark+i (built by
// AppendDivertCommand: the tuple in its IP and TCP headers) into an
// update of the sets of queue i, and drops it. The update is done when
// the send returns, and the drop makes the send fail with EPERM: that
// failure is the command's success. A command no rule took (the chain
// was changed, or the set is full and the update failed) leaves the
// machine, harmless, and its send succeeds: the gateway then adds the
// elements through netlink, which says what is wrong.
type Divert struct {
	Enabled bool
	// Queue is the first NFQUEUE number, Queues how many there are.
	Queue, Queues uint16
	// Timeout bounds how long an element lives if spliced never deletes it
	// (a safety net after a crash); spliced refreshes the elements of live
	// flows (Diverter.Refresh) well before they expire.
	Timeout time.Duration
	// NativeQueue selects the nft queue expression; without it (kernels
	// without CONFIG_NFT_QUEUE) the xtables NFQUEUE target is used through
	// nft_compat. Install probes and sets it.
	NativeQueue bool
	// SkipMark, when not 0, is the mark bit of packets another datapath
	// rewrote already (the kernel datapath, package splice/bpf, at tcx
	// ingress): the first rule of the divert chain untracks such packets
	// (as the queue rules untrack what the Go engine rewrites) and
	// accepts them, so that they never reach the sets and the queues and
	// are never rewritten twice.
	SkipMark uint32
}

// ChainDivert is the chain of the divert rules.
const ChainDivert = "divert"

// ChainDivertQueues and ChainDivertPMTU hold the per-queue rules: the
// divert chain sends a packet there only when one lookup in the set of
// every queue's tuples (DivertAnySetName) found its tuple, or for an
// ICMP packet. Without that gate every packet the gateway forwarded paid
// one lookup per queue: 1-byte request-response on a port the gateway
// only routes ran at about 26.7k/s with 64 queues against 38.7k/s with
// one (2-CPU lab VM), about 6 µs a packet.
const (
	ChainDivertQueues = "divert_queues"
	ChainDivertPMTU   = "divert_pmtu"
)

// ChainDivertCommand is the output chain that turns divert command
// packets into set elements.
const ChainDivertCommand = "divertcmd"

// DivertCommandMark is the mark of the command packets that divert a
// tuple to queue index 0; queue index i uses DivertCommandMark+i. Any
// packet with such a mark that the output path sees is taken for a
// command.
const DivertCommandMark = 0x5c1d0000

// AppendDivertCommand appends to b the command packet that diverts tuple
// k: an IP packet from k's source to its destination carrying a TCP
// header with k's ports. Should it ever leave the machine (no rule took
// it), it does no harm: no flag is set, its TCP checksum is wrong, and
// its TTL is 1.
func AppendDivertCommand(b []byte, k splice.Key) []byte {
	b = splice.AppendBareSegment(b, k, 0, 0, 1)
	// The right checksum with its top bit flipped: wrong, and not the
	// other form of the same one's-complement sum (0 and 0xffff).
	t := splice.TCP(b[len(b)-splice.TCPMinHeaderLen:])
	t.SetChecksum(t.Checksum() ^ 0x8000)
	return b
}

// DivertSetName is the name of the divert set of queue index i (0-based)
// for one family: divert4_0, divert6_0, divert4_1, ...
func DivertSetName(i uint16, v6 bool) string {
	if v6 {
		return fmt.Sprintf("divert6_%d", i)
	}
	return fmt.Sprintf("divert4_%d", i)
}

// DivertAnySetName is the name of the set of every queue's tuples of one
// family: divert4_any, divert6_any. Every element of a queue's set is in
// it (added first, deleted last, in the same transactions), so that the
// gate never lets a packet of a diverted tuple pass unqueued.
func DivertAnySetName(v6 bool) string {
	if v6 {
		return "divert6_any"
	}
	return "divert4_any"
}

// Priority of the divert chain: raw, before conntrack (-200) and mangle.
const divertPriority = nftables.ChainPriority(-300)

// Spliced-flow queues must neither bypass nor fail open: a packet that
// passed unrewritten would corrupt the flow.
const xtNFQFlags = 0

// xtNFQBypass lets a packet pass when no daemon listens on its queue
// (NFQ_FLAG_BYPASS, the value of NFT_QUEUE_FLAG_BYPASS too): only for
// packets that pass harmlessly as they are.
const xtNFQBypass = 0x1

func divertSetType(v6 bool) nftables.SetDatatype {
	addr := nftables.TypeIPAddr
	if v6 {
		addr = nftables.TypeIP6Addr
	}
	return nftables.MustConcatSetType(addr, nftables.TypeInetService, addr, nftables.TypeInetService)
}

// divertSet is the divert set of queue index i: dynamic, so that the
// command rules can add to it.
func divertSet(t *nftables.Table, i uint16, v6 bool, timeout time.Duration) *nftables.Set {
	return divertSetNamed(t, DivertSetName(i, v6), v6, timeout)
}

// divertAnySet is the set of every queue's tuples of one family.
func divertAnySet(t *nftables.Table, v6 bool, timeout time.Duration) *nftables.Set {
	return divertSetNamed(t, DivertAnySetName(v6), v6, timeout)
}

func divertSetNamed(t *nftables.Table, name string, v6 bool, timeout time.Duration) *nftables.Set {
	return &nftables.Set{Table: t, Name: name, KeyType: divertSetType(v6), Concatenation: true,
		HasTimeout: true, Timeout: timeout, Dynamic: true, Size: divertSetSize}
}

// elementChunk is how many elements one netlink message carries: an
// IPv6 divert element (a 40-byte key, a timeout and their headers) takes
// about 64 bytes of the 64 KiB attribute that lists them.
const elementChunk = 512

// divertSetSize bounds the elements of one divert set (two per flow); the
// kernel would bound a dynamic set without a size to 65,535.
const divertSetSize = 1 << 22

// queueDivert adds the divert sets and chains to a batch, with the
// tuples of live flows (by queue index) as elements.
func queueDivert(c *nftables.Conn, spec *Spec, t *nftables.Table, live map[uint16][]splice.Key) error {
	d := &spec.Divert
	chain := c.AddChain(&nftables.Chain{
		Name: ChainDivert, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: &[]nftables.ChainPriority{divertPriority}[0],
	})
	queues := c.AddChain(&nftables.Chain{Name: ChainDivertQueues, Table: t})
	pmtu := c.AddChain(&nftables.Chain{Name: ChainDivertPMTU, Table: t})
	cmds := c.AddChain(&nftables.Chain{
		Name: ChainDivertCommand, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: &[]nftables.ChainPriority{divertPriority}[0],
	})
	if d.SkipMark != 0 {
		c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: skipMarkedExprs(d.SkipMark)})
	}
	var all []splice.Key
	for i := range d.Queues {
		all = append(all, live[i]...)
	}
	anyV4, anyV6 := elementsOf(all, d.Timeout)
	anySets := [2]*nftables.Set{divertAnySet(t, false, d.Timeout), divertAnySet(t, true, d.Timeout)}
	for f, els := range [2][]nftables.SetElement{anyV4, anyV6} {
		if err := addSetWith(c, anySets[f], els); err != nil {
			return err
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: append(tupleExprs(f == 1),
			&expr.Lookup{SourceRegister: 1, SetName: anySets[f].Name, SetID: anySets[f].ID},
			&expr.Verdict{Kind: expr.VerdictGoto, Chain: ChainDivertQueues})})
	}
	for _, proto := range []byte{unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6} {
		c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Verdict{Kind: expr.VerdictGoto, Chain: ChainDivertPMTU},
		}})
	}
	for i := range d.Queues {
		v4els, v6els := elementsOf(live[i], d.Timeout)
		for f, els := range [2][]nftables.SetElement{v4els, v6els} {
			v6 := f == 1
			set := divertSet(t, i, v6, d.Timeout)
			if err := addSetWith(c, set, els); err != nil {
				return err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: queues, Exprs: divertExprs(d, d.Queue+i, set, v6)})
			c.AddRule(&nftables.Rule{Table: t, Chain: pmtu, Exprs: pmtuExprs(d, d.Queue+i, set, v6)})
			c.AddRule(&nftables.Rule{Table: t, Chain: cmds, Exprs: divertCommandExprs(i, anySets[f], set, v6)})
			c.AddRule(&nftables.Rule{Table: t, Chain: cmds, Exprs: pmtuExprs(d, d.Queue+i, set, v6)})
		}
	}
	return nil
}

// addSetWith adds set to a batch with els as its elements, one message
// per elementChunk of them: a netlink attribute (the list of a message's
// elements) holds at most 64 KiB, and the library does not check (a
// longer list's length wraps).
func addSetWith(c *nftables.Conn, set *nftables.Set, els []nftables.SetElement) error {
	if err := c.AddSet(set, nil); err != nil {
		return fmt.Errorf("add set %s: %w", set.Name, err)
	}
	for len(els) > 0 {
		chunk := els[:min(len(els), elementChunk)]
		els = els[len(chunk):]
		if err := c.SetAddElements(set, chunk); err != nil {
			return fmt.Errorf("add elements to set %s: %w", set.Name, err)
		}
	}
	return nil
}

// skipMarkedExprs is "meta mark & M == M notrack accept".
func skipMarkedExprs(mark uint32) []expr.Any {
	e := markedExprs(mark)
	return append(e[:len(e)-1:len(e)-1], &expr.Notrack{}, &expr.Verdict{Kind: expr.VerdictAccept})
}

// markedExprs is "meta mark & M == M accept".
func markedExprs(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mark),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

func divertExprs(d *Divert, queue uint16, set *nftables.Set, v6 bool) []expr.Any {
	e := append(tupleExprs(v6),
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Notrack{},
	)
	return append(e, queueExprs(d, queue)...)
}

// pmtuExprs is the rule that queues a path MTU error about a spliced
// flow to the flow's queue: an ICMP "fragmentation needed" or ICMPv6
// "packet too big" whose quoted segment, read backwards, is a tuple of
// the set: the quote is a packet the engine rewrote, going the other way.
// The sender of that packet knows it by other numbers (another sequence
// space, with NAT other addresses and ports), so it would ignore the
// error and go on sending segments too big for the path, for good: the
// engine translates the quote back (see splice.ICMPError). The rule is
// in the divert chain, for errors that arrive (from a router beyond the
// gateway, or with NAT addressed to the gateway), and in the output
// chain, for the errors the gateway's own forwarding sends. Only a quote
// with a plain IP header (no IPv4 options, no IPv6 extension headers)
// matches; the engine handles no other. The queue bypasses a daemon that
// is not there: the error then goes on as it came, as without the rule.
func pmtuExprs(d *Divert, queue uint16, set *nftables.Set, v6 bool) []expr.Any {
	nfproto, proto := byte(unix.NFPROTO_IPV4), byte(unix.IPPROTO_ICMP)
	// Offsets from the start of the ICMP header: the quote starts after
	// its 8 bytes; the quoted segment's ports after the quoted IP header.
	typeCode := []byte{3, 4} // destination unreachable, fragmentation needed
	verOff, ver := uint32(8), []byte{0x45}
	nextOff := uint32(8 + 9)
	src, dst, alen, l4 := uint32(8+12), uint32(8+16), uint32(4), uint32(8+20)
	regs := [4]uint32{1, 9, 10, 11}
	if v6 {
		nfproto, proto = unix.NFPROTO_IPV6, unix.IPPROTO_ICMPV6
		typeCode = []byte{2} // packet too big (its code is always 0)
		ver = []byte{0x60}
		nextOff = 8 + 6
		src, dst, alen, l4 = 8+8, 8+24, 16, 8+40
		regs = [4]uint32{1, 2, 13, 17}
	}
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: uint32(len(typeCode))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: typeCode},
	}
	if v6 {
		// The version is the high nibble of the quote's first byte.
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: verOff, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0xf0}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ver})
	} else {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: verOff, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ver})
	}
	e = append(e,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: nextOff, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		// The key of the other direction: the quote's destination first.
		&expr.Payload{DestRegister: regs[0], Base: expr.PayloadBaseTransportHeader, Offset: dst, Len: alen},
		&expr.Payload{DestRegister: regs[1], Base: expr.PayloadBaseTransportHeader, Offset: l4 + 2, Len: 2},
		&expr.Payload{DestRegister: regs[2], Base: expr.PayloadBaseTransportHeader, Offset: src, Len: alen},
		&expr.Payload{DestRegister: regs[3], Base: expr.PayloadBaseTransportHeader, Offset: l4, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Notrack{},
	)
	return append(e, queueExprsFlags(d, queue, true)...)
}

// divertCommandExprs is the command rule of queue index i: "meta mark
// DivertCommandMark+i <tuple> update @any update @set drop". An update
// restarts the timeout of an element that exists. The gate's set comes
// first: if its update fails (a full set), the rule stops there, and the
// queue's set never holds a tuple the gate would let pass.
func divertCommandExprs(i uint16, anySet, set *nftables.Set, v6 bool) []expr.Any {
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(DivertCommandMark + uint32(i))},
	}
	e = append(e, tupleExprs(v6)...)
	return append(e,
		&expr.Dynset{SrcRegKey: 1, SetName: anySet.Name, SetID: anySet.ID, Operation: uint32(unix.NFT_DYNSET_OP_UPDATE)},
		&expr.Dynset{SrcRegKey: 1, SetName: set.Name, SetID: set.ID, Operation: uint32(unix.NFT_DYNSET_OP_UPDATE)},
		&expr.Verdict{Kind: expr.VerdictDrop})
}

// tupleExprs loads a TCP packet's 4-tuple of one family into the
// registers of a set key (it matches only that family and TCP).
func tupleExprs(v6 bool) []expr.Any {
	nfproto := byte(unix.NFPROTO_IPV4)
	src, dst, alen := uint32(12), uint32(16), uint32(4)
	// 32-bit registers: each field of the concatenation starts in the
	// next register after the previous one (NFT_REG32_00 is 8; 1 is the
	// legacy name of the 16-byte register that starts there).
	regs := [4]uint32{1, 9, 10, 11}
	if v6 {
		nfproto = unix.NFPROTO_IPV6
		src, dst, alen = 8, 24, 16
		regs = [4]uint32{1, 2, 13, 17}
	}
	e := l4protoTCP()
	e = append(e,
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Payload{DestRegister: regs[0], Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: alen},
		&expr.Payload{DestRegister: regs[1], Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Payload{DestRegister: regs[2], Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: alen},
		&expr.Payload{DestRegister: regs[3], Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
	)
	return e
}

// queueExprs queue a packet to queue, with the nft queue expression or
// the xtables target.
func queueExprs(d *Divert, queue uint16) []expr.Any {
	return queueExprsFlags(d, queue, false)
}

// queueExprsFlags is queueExprs, bypassing the queue when no daemon
// listens if bypass is set.
func queueExprsFlags(d *Divert, queue uint16, bypass bool) []expr.Any {
	flags := uint16(xtNFQFlags)
	if bypass {
		flags |= xtNFQBypass
	}
	if d.NativeQueue {
		return []expr.Any{&expr.Queue{Num: queue, Total: 1, Flag: expr.QueueFlag(flags)}}
	}
	// struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; }
	// in host byte order, padded to 8 bytes.
	info := make([]byte, 8)
	binary.NativeEndian.PutUint16(info[0:], queue)
	binary.NativeEndian.PutUint16(info[2:], 1)
	binary.NativeEndian.PutUint16(info[4:], flags)
	return []expr.Any{&expr.Target{Name: "NFQUEUE", Rev: 3, Info: &[]xt.Unknown{info}[0]}}
}

// divertKey encodes a 4-tuple as a set key: each field padded to a
// multiple of 4 bytes, as registers hold them.
func divertKey(k splice.Key) []byte {
	if k.IsIPv4() {
		b := make([]byte, 16)
		copy(b[0:4], k.Src[12:])
		binary.BigEndian.PutUint16(b[4:], k.SrcPort)
		copy(b[8:12], k.Dst[12:])
		binary.BigEndian.PutUint16(b[12:], k.DstPort)
		return b
	}
	b := make([]byte, 40)
	copy(b[0:16], k.Src[:])
	binary.BigEndian.PutUint16(b[16:], k.SrcPort)
	copy(b[20:36], k.Dst[:])
	binary.BigEndian.PutUint16(b[36:], k.DstPort)
	return b
}

// tupleOfDivertKey is the inverse of divertKey: the tuple of a divert
// set's key, or false when b is not shaped like one (another set's key:
// its length, or a padding byte that is not zero).
func tupleOfDivertKey(b []byte) (splice.Key, bool) {
	var k splice.Key
	var alen int
	switch len(b) {
	case 16:
		alen = 4
	case 40:
		alen = 16
	default:
		return k, false
	}
	// Each field padded to a multiple of 4 bytes: address, port (2 of
	// 4), address, port (2 of 4).
	sport, dst, dport := alen, alen+4, 2*alen+4
	if b[sport+2] != 0 || b[sport+3] != 0 || b[dport+2] != 0 || b[dport+3] != 0 {
		return k, false
	}
	if alen == 4 {
		k.Src = netip.AddrFrom4([4]byte(b[:4])).As16()
		k.Dst = netip.AddrFrom4([4]byte(b[dst : dst+4])).As16()
	} else {
		k.Src = [16]byte(b[:16])
		k.Dst = [16]byte(b[dst : dst+16])
	}
	k.SrcPort = binary.BigEndian.Uint16(b[sport:])
	k.DstPort = binary.BigEndian.Uint16(b[dport:])
	return k, true
}

// DivertDeletedByOthers returns the tuples of the divert set elements
// that another process deleted, as the nftables monitor reports them:
// for an element deletion sent through another socket than the one the
// Manager changes its table through (see owner), the keys shaped like
// divert keys; nil for any other event. An unowned table's divert sets
// can be flushed by anyone (`nft flush set inet spliced divert4_0`); the
// drift check, which leaves the elements out, did not see it, and the
// flows' packets passed unrewritten until the next refresh (a third of
// kernel.divert_timeout, 8 h by default), which killed every such flow
// (TestLabDivertSetFlushed). The monitor names no table or set for an
// element, so a set of another table with keys of the same shape
// counts too: the caller keeps the tuples of its live flows.
func (m *Manager) DivertDeletedByOthers(ev *nftables.MonitorEvent) []splice.Key {
	if ev.Type != nftables.MonitorEventTypeDelSetElem || ev.Header.PID == m.own.port.Load() {
		return nil
	}
	els, _ := ev.Data.([]nftables.SetElement)
	var keys []splice.Key
	for _, e := range els {
		if k, ok := tupleOfDivertKey(e.Key); ok {
			keys = append(keys, k)
		}
	}
	return keys
}

// Diverter adds and removes the set elements of spliced flows. It keeps
// one netlink connection open; safe for concurrent use.
type Diverter struct {
	// cmdMu: divert commands (read side, see Commands) are sent while no
	// table install runs (write side, see Exclusive), as adds are.
	cmdMu sync.RWMutex
	// stopped: no divert entry is added any more (see Stop); set under
	// cmdMu, so that no command is being sent once Stop returns.
	stopped atomic.Bool
	// mu: one of the diverter's transactions at a time. Each takes mu,
	// then the Manager's socket (see lock); Exclusive takes mu alone and
	// lets an install take the socket.
	mu      sync.Mutex
	m       *Manager
	table   *nftables.Table
	timeout time.Duration

	// Adds that wait for a transaction (see Add), and how many
	// transactions carried adds.
	pendingMu  sync.Mutex
	pending    []*addRequest
	addCommits atomic.Uint64
}

// addRequest is one Add waiting for a transaction; done and err are
// written under Diverter.mu.
type addRequest struct {
	q    uint16
	keys []splice.Key
	done bool
	err  error
}

// NewDiverter returns the element updater of m's table. It sends on m's
// netlink socket, the one that owns the table (see owner).
func (m *Manager) NewDiverter() (*Diverter, error) {
	return &Diverter{m: m, table: m.spec.table(), timeout: m.spec.Divert.Timeout}, nil
}

// lock takes d.mu and then the Manager's socket, for one of the
// diverter's transactions; unlock releases both.
func (d *Diverter) lock() (c *nftables.Conn, unlock func(), err error) {
	d.mu.Lock()
	c, o, err := d.m.lockedConn()
	if err != nil {
		d.mu.Unlock()
		return nil, nil, err
	}
	return c, func() { o.mu.Unlock(); d.mu.Unlock() }, nil
}

// Exclusive runs fn while no element is added or deleted, for a table
// reinstall that must carry every live element over.
func (d *Diverter) Exclusive(fn func()) {
	d.cmdMu.Lock()
	defer d.cmdMu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	fn()
}

// Commands runs send, which sends divert commands (see Divert), while no
// table install runs: the install carries the elements of the flows it
// was given, and a command that raced it could add to the sets it
// replaces.
func (d *Diverter) Commands(send func() error) error {
	d.cmdMu.RLock()
	defer d.cmdMu.RUnlock()
	if d.stopped.Load() {
		return ErrDiverterStopped
	}
	return send()
}

// Stop ends the adding of divert entries, before the daemon removes its
// table: from then on Commands and Add return ErrDiverterStopped and
// send nothing. It returns once no command is being sent. Without it, a
// splice that began as the daemon stopped sent its divert command after
// the table was gone: no rule took the command, which went on to the
// tuple's destination (a server one hop away counts it in
// Tcp.InCsumErrors, its checksum being wrong on purpose).
func (d *Diverter) Stop() {
	d.cmdMu.Lock()
	d.stopped.Store(true)
	d.cmdMu.Unlock()
}

// ErrDiverterStopped: the diverter adds no divert entries any more (see
// Diverter.Stop).
var ErrDiverterStopped = errors.New("divert entries are no longer added: spliced is stopping")

// Has reports whether tuple k is in the divert sets of queue index q. It
// lists the whole set: for checks, not for every flow.
func (d *Diverter) Has(q uint16, k splice.Key) (bool, error) {
	c, unlock, err := d.lock()
	if err != nil {
		return false, err
	}
	defer unlock()
	els, err := c.GetSetElements(divertSet(d.table, q, !k.IsIPv4(), d.timeout))
	if err != nil {
		return false, fmt.Errorf("list divert set: %w", err)
	}
	want := divertKey(k)
	for _, e := range els {
		if bytes.Equal(e.Key, want) {
			return true, nil
		}
	}
	return false, nil
}

// Tuples lists every tuple in the table's divert sets (the gate's sets,
// which hold each queue's): at a start, before the new table replaces
// it, what an earlier daemon left diverted. A table or a set that does
// not exist (none installed, or one of a version before the gate's sets)
// holds none. It takes the Manager's socket only, so that it can run
// inside Exclusive, before the install that replaces the table.
func (d *Diverter) Tuples() ([]splice.Key, error) {
	c, o, err := d.m.lockedConn()
	if err != nil {
		return nil, err
	}
	defer o.mu.Unlock()
	if ok, err := tableExists(c, d.table.Name); err != nil || !ok {
		return nil, err
	}
	sets, err := c.GetSets(d.table)
	if err != nil {
		return nil, fmt.Errorf("list the sets of table inet %s: %w", d.table.Name, err)
	}
	has := map[string]bool{}
	for _, s := range sets {
		has[s.Name] = true
	}
	var out []splice.Key
	for _, v6 := range []bool{false, true} {
		if !has[DivertAnySetName(v6)] {
			continue
		}
		els, err := c.GetSetElements(divertAnySet(d.table, v6, d.timeout))
		if err != nil {
			return out, fmt.Errorf("list divert set %s: %w", DivertAnySetName(v6), err)
		}
		for _, e := range els {
			if k, ok := keyOfElement(e.Key, v6); ok {
				out = append(out, k)
			}
		}
	}
	return out, nil
}

// keyOfElement decodes a divert set's element key (see divertKey).
func keyOfElement(b []byte, v6 bool) (splice.Key, bool) {
	if !v6 {
		if len(b) != 16 {
			return splice.Key{}, false
		}
		return splice.KeyFrom(
			netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[0:4])), binary.BigEndian.Uint16(b[4:])),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[8:12])), binary.BigEndian.Uint16(b[12:]))), true
	}
	if len(b) != 40 {
		return splice.Key{}, false
	}
	return splice.KeyFrom(
		netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[0:16])), binary.BigEndian.Uint16(b[16:])),
		netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[20:36])), binary.BigEndian.Uint16(b[36:]))), true
}

// Close ends the diverter. The socket is the Manager's, which closes it
// (Manager.Close).
func (d *Diverter) Close() error { return nil }

func (d *Diverter) elements(keys []splice.Key, timeout time.Duration) (v4, v6 []nftables.SetElement) {
	return elementsOf(keys, timeout)
}

// elementsOf makes set elements of tuples, by family.
func elementsOf(keys []splice.Key, timeout time.Duration) (v4, v6 []nftables.SetElement) {
	for _, k := range keys {
		e := nftables.SetElement{Key: divertKey(k), Timeout: timeout}
		if k.IsIPv4() {
			v4 = append(v4, e)
		} else {
			v6 = append(v6, e)
		}
	}
	return v4, v6
}

// Add diverts the flows with these tuples to queue index q (0-based).
//
// Adds are committed in groups: a transaction costs about the same for
// one element as for many, and splices come in bursts (a service's
// connections spliced right after connect). An Add that finds another
// transaction running waits for it, then commits every Add that queued
// meanwhile in one transaction, unless one of those did it already.
func (d *Diverter) Add(q uint16, keys ...splice.Key) error {
	if d.stopped.Load() {
		return ErrDiverterStopped
	}
	r := &addRequest{q: q, keys: keys}
	d.pendingMu.Lock()
	d.pending = append(d.pending, r)
	d.pendingMu.Unlock()
	d.mu.Lock()
	if r.done {
		d.mu.Unlock()
		return r.err
	}
	c, o, err := d.m.lockedConn()
	if err != nil {
		// r fails with this error: no later transaction may commit it
		// (its caller goes on as if it never went in).
		d.pendingMu.Lock()
		d.pending = slices.DeleteFunc(d.pending, func(p *addRequest) bool { return p == r })
		d.pendingMu.Unlock()
		d.mu.Unlock()
		return err
	}
	defer func() { o.mu.Unlock(); d.mu.Unlock() }()
	d.pendingMu.Lock()
	batch := d.pending
	d.pending = nil
	d.pendingMu.Unlock()
	d.addLocked(c, batch)
	return r.err
}

// addLocked commits the adds of batch in one transaction on c (d.lock
// held). If it fails, each add is tried alone, so that one bad request
// fails only its own caller.
func (d *Diverter) addLocked(c *nftables.Conn, batch []*addRequest) {
	defer func() {
		for _, r := range batch {
			r.done = true
		}
	}()
	add := func(s *nftables.Set, els []nftables.SetElement) error { return c.SetAddElements(s, els) }
	d.addCommits.Add(1)
	if len(batch) == 1 {
		batch[0].err = d.applyLocked(c, batch[0].q, batch[0].keys, add)
		return
	}
	for _, r := range batch {
		// Only a malformed element fails here; the caller removes
		// whatever part of its request went in (see Add's callers).
		r.err = d.queueLocked(r.q, r.keys, add)
	}
	if c.Flush() == nil {
		return
	}
	// A failed transaction changed nothing: each add alone.
	for _, r := range batch {
		if r.err == nil {
			r.err = d.applyLocked(c, r.q, r.keys, add)
		}
	}
}

// Delete stops diverting these tuples from queue index q. Missing
// elements are not an error.
func (d *Diverter) Delete(q uint16, keys ...splice.Key) error {
	err := d.apply(q, keys, func(c *nftables.Conn, s *nftables.Set, els []nftables.SetElement) error {
		return c.SetDeleteElements(s, els)
	})
	if errors.Is(err, unix.ENOENT) {
		// One element was gone (timed out, or the table was replaced):
		// delete the others one by one, from each set on its own, so
		// that one missing from a set keeps none in the other.
		var errs []error
		for _, k := range keys {
			if e := d.deleteFromEach(q, k); e != nil {
				errs = append(errs, e)
			}
		}
		return errors.Join(errs...)
	}
	return err
}

// deleteFromEach deletes tuple k from the set of queue index q and then
// from the gate's set, each in a transaction of its own; a missing
// element is not an error.
func (d *Diverter) deleteFromEach(q uint16, k splice.Key) error {
	c, unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	v4, v6 := d.elements([]splice.Key{k}, d.timeout)
	els := append(v4, v6...)
	var errs []error
	for _, set := range []*nftables.Set{divertSet(d.table, q, !k.IsIPv4(), d.timeout), divertAnySet(d.table, !k.IsIPv4(), d.timeout)} {
		if err := c.SetDeleteElements(set, els); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete %v from %s: %w", k, set.Name, err))
		}
	}
	return errors.Join(errs...)
}

// DeleteMany removes the tuples of many flows in one transaction (one
// element delete costs milliseconds; a transaction of many costs about the
// same). byQueue maps a queue index to its tuples. If the transaction
// fails because an element is gone, it falls back to one flow at a time.
func (d *Diverter) DeleteMany(byQueue map[uint16][]splice.Key) error {
	c, unlock, err := d.lock()
	if err != nil {
		return err
	}
	for q, keys := range byQueue {
		v4, v6 := d.elements(keys, d.timeout)
		deleteChunked(c, divertSet(d.table, q, false, d.timeout), v4)
		deleteChunked(c, divertAnySet(d.table, false, d.timeout), v4)
		deleteChunked(c, divertSet(d.table, q, true, d.timeout), v6)
		deleteChunked(c, divertAnySet(d.table, true, d.timeout), v6)
	}
	err = c.Flush()
	unlock()
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return err
	}
	var errs []error
	for q, keys := range byQueue {
		for i := 0; i+1 < len(keys); i += 2 {
			if err := d.Delete(q, keys[i], keys[i+1]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// deleteChunked adds the deletion of els from set to a batch, one
// message per elementChunk of them (see addSetWith): the flows a busy
// router retires at once can be thousands, and a longer list's length
// wrapped, so the transaction failed and their entries stayed, diverting
// a later connection on one of their tuples to a queue that drops it.
func deleteChunked(c *nftables.Conn, set *nftables.Set, els []nftables.SetElement) {
	for len(els) > 0 {
		chunk := els[:min(len(els), elementChunk)]
		els = els[len(chunk):]
		c.SetDeleteElements(set, chunk)
	}
}

// refreshChunk is how many tuples one refresh transaction carries: each
// is sent three times, and a transaction must fit the netlink socket's
// send buffer.
const refreshChunk = 256

// Refresh restarts the timeout of the elements of live flows: live
// returns their tuples by queue index, and is called while no element is
// added or deleted, so a flow that ends meanwhile is deleted after its
// refresh, never resurrected by it. Each tuple is added (creating it if it
// was lost), deleted and added again in one transaction: the kernel keeps
// an existing element's expiry on a plain add (before Linux 6.13, and
// without NFTA_SET_ELEM_EXPIRATION, which google/nftables does not send),
// and the transaction is atomic, so no packet misses the set meanwhile. A
// transaction carries refreshChunk tuples (a delete costs a few
// milliseconds per transaction, not per element). It returns how many
// tuples it refreshed.
func (d *Diverter) Refresh(live func() map[uint16][]splice.Key) (int, error) {
	c, unlock, err := d.lock()
	if err != nil {
		return 0, err
	}
	defer unlock()
	n := 0
	for q, keys := range live() {
		for len(keys) > 0 {
			chunk := keys[:min(len(keys), refreshChunk)]
			keys = keys[len(chunk):]
			v4, v6 := d.elements(chunk, d.timeout)
			for _, x := range []struct {
				v6  bool
				els []nftables.SetElement
			}{{false, v4}, {true, v6}} {
				if len(x.els) == 0 {
					continue
				}
				for _, set := range []*nftables.Set{divertAnySet(d.table, x.v6, d.timeout), divertSet(d.table, q, x.v6, d.timeout)} {
					c.SetAddElements(set, x.els)
					c.SetDeleteElements(set, x.els)
					c.SetAddElements(set, x.els)
				}
			}
			if err := c.Flush(); err != nil {
				return n, fmt.Errorf("refresh divert entries: %w", err)
			}
			n += len(chunk)
		}
	}
	return n, nil
}

// Restore adds the tuples lost returns back to the divert sets of their
// queues (by queue index), for flows whose elements another process
// deleted (see Manager.DivertDeletedByOthers). lost is called while no
// element is added or deleted, as Refresh's live is, so a flow that ends
// meanwhile is deleted after its restore, never resurrected by it. An
// element that is there is left as it is. It returns how many tuples it
// restored; the error wraps ENOENT when a set or the table is gone (then
// a repair of the table is due, which carries every live element over).
func (d *Diverter) Restore(lost func() map[uint16][]splice.Key) (int, error) {
	c, unlock, err := d.lock()
	if err != nil {
		return 0, err
	}
	defer unlock()
	n := 0
	for q, keys := range lost() {
		v4, v6 := d.elements(keys, d.timeout)
		for _, x := range []struct {
			v6  bool
			els []nftables.SetElement
		}{{false, v4}, {true, v6}} {
			// The gate's set first (see divertCommandExprs).
			for _, set := range []*nftables.Set{divertAnySet(d.table, x.v6, d.timeout), divertSet(d.table, q, x.v6, d.timeout)} {
				for els := x.els; len(els) > 0; {
					chunk := els[:min(len(els), elementChunk)]
					els = els[len(chunk):]
					// Only an element it cannot encode fails here.
					c.SetAddElements(set, chunk)
				}
			}
		}
		n += len(keys)
	}
	if n == 0 {
		return 0, nil
	}
	if err := c.Flush(); err != nil {
		return 0, fmt.Errorf("restore divert entries: %w", err)
	}
	return n, nil
}

func (d *Diverter) apply(q uint16, keys []splice.Key, op func(*nftables.Conn, *nftables.Set, []nftables.SetElement) error) error {
	c, unlock, err := d.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return d.applyLocked(c, q, keys, func(s *nftables.Set, els []nftables.SetElement) error { return op(c, s, els) })
}

// applyLocked runs op on the tuples' elements in one transaction on c
// (d.lock held).
func (d *Diverter) applyLocked(c *nftables.Conn, q uint16, keys []splice.Key, op func(*nftables.Set, []nftables.SetElement) error) error {
	if err := d.queueLocked(q, keys, op); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("update divert sets: %w", err)
	}
	return nil
}

// queueLocked adds op on the tuples' elements to the transaction being
// built (d.lock held).
func (d *Diverter) queueLocked(q uint16, keys []splice.Key, op func(*nftables.Set, []nftables.SetElement) error) error {
	v4, v6 := d.elements(keys, d.timeout)
	for _, x := range []struct {
		v6  bool
		els []nftables.SetElement
	}{{false, v4}, {true, v6}} {
		if len(x.els) == 0 {
			continue
		}
		// The gate's set first (see divertCommandExprs); a delete
		// takes both in the same transaction.
		if err := op(divertAnySet(d.table, x.v6, d.timeout), x.els); err != nil {
			return err
		}
		if err := op(divertSet(d.table, q, x.v6, d.timeout), x.els); err != nil {
			return err
		}
	}
	return nil
}

// renderDivert renders the divert sets (without their elements, which
// come and go with flows) and chains.
func renderDivert(d *Divert) (sets, chains []string) {
	timeout := formatNFTDuration(d.Timeout)
	var out, rules, queues, pmtu, cmds []string
	if d.SkipMark != 0 {
		rules = append(rules, fmt.Sprintf("meta mark & 0x%08x == 0x%08x notrack accept", d.SkipMark, d.SkipMark))
	}
	fams := []struct {
		v6       bool
		ip, addr string
	}{{false, "ip", "ipv4_addr"}, {true, "ip6", "ipv6_addr"}}
	set := func(name, addr string) string {
		return fmt.Sprintf("\tset %s {\n\t\ttype %s . inet_service . %s . inet_service\n\t\tsize %d\n\t\tflags dynamic,timeout\n\t\ttimeout %s\n\t}\n",
			name, addr, addr, divertSetSize, timeout)
	}
	tuple := func(ip string) string { return fmt.Sprintf("%s saddr . tcp sport . %s daddr . tcp dport", ip, ip) }
	for _, fam := range fams {
		out = append(out, set(DivertAnySetName(fam.v6), fam.addr))
		rules = append(rules, fmt.Sprintf("%s @%s goto %s", tuple(fam.ip), DivertAnySetName(fam.v6), ChainDivertQueues))
	}
	rules = append(rules, "meta l4proto icmp goto "+ChainDivertPMTU, "meta l4proto ipv6-icmp goto "+ChainDivertPMTU)
	for i := range d.Queues {
		for _, fam := range fams {
			name := DivertSetName(i, fam.v6)
			out = append(out, set(name, fam.addr))
			p := fmt.Sprintf("%s @%s notrack %s bypass", pmtuText(fam.v6), name, queueStatement(d.Queue+i))
			queues = append(queues, fmt.Sprintf("%s @%s notrack %s", tuple(fam.ip), name, queueStatement(d.Queue+i)))
			pmtu = append(pmtu, p)
			cmds = append(cmds, fmt.Sprintf("meta mark 0x%08x update @%s { %s } update @%s { %s } drop", DivertCommandMark+uint32(i), DivertAnySetName(fam.v6), tuple(fam.ip), name, tuple(fam.ip)), p)
		}
	}
	return out, []string{renderChain(ChainDivert, "type filter hook prerouting priority raw; policy accept;", rules),
		renderChain(ChainDivertQueues, "", queues),
		renderChain(ChainDivertPMTU, "", pmtu),
		renderChain(ChainDivertCommand, "type filter hook output priority raw; policy accept;", cmds)}
}

// pmtuText is the match of pmtuExprs as nft lists it, up to the set.
func pmtuText(v6 bool) string {
	if v6 {
		return "icmpv6 type packet-too-big @th,64,8 & 0xf0 == 0x60 @th,112,8 0x6 @th,256,128 . @th,400,16 . @th,128,128 . @th,384,16"
	}
	return "icmp type destination-unreachable icmp code frag-needed @th,64,8 0x45 @th,136,8 0x6 @th,192,32 . @th,240,16 . @th,160,32 . @th,224,16"
}

func queueStatement(queue uint16) string { return fmt.Sprintf("queue num %d", queue) }

// formatNFTDuration formats a duration as nft lists it: 1d, 2h, 1h30m,
// 45s.
func formatNFTDuration(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	var s string
	days := d / (24 * time.Hour)
	d -= days * 24 * time.Hour
	h := d / time.Hour
	d -= h * time.Hour
	m := d / time.Minute
	d -= m * time.Minute
	sec := d / time.Second
	for _, p := range []struct {
		v    time.Duration
		unit string
	}{{days, "d"}, {h, "h"}, {m, "m"}, {sec, "s"}} {
		if p.v > 0 {
			s += fmt.Sprintf("%d%s", p.v, p.unit)
		}
	}
	return s
}
