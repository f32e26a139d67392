package splice

import (
	"encoding/binary"
	"time"
)

// Verdict is what the engine decided for a packet.
type Verdict uint8

const (
	// Forward: the packet was rewritten in place; send it on.
	Forward Verdict = iota
	// DropSYN: a SYN on a spliced flow (paper 3.7: all connections were
	// established with the gateway, so a SYN here is forged or stale).
	DropSYN
	// DropSeq: the segment lies outside the receiver's window.
	DropSeq
	// DropAck: it acknowledges data never sent, or data far older than
	// anything in flight.
	DropAck
	// DropRST: a RST whose sequence number is outside the window.
	DropRST
	// DropMalformed: the packet's headers are inconsistent.
	DropMalformed
	// DropUnsupported: a valid packet the engine does not rewrite
	// (fragments, unknown IPv6 extension headers).
	DropUnsupported
	// DropNoFlow: the packet belongs to no spliced flow.
	DropNoFlow
	// DropDuplicate: a spurious retransmission at the end of a flow, or
	// a duplicate ACK it drew, that would make a closed socket send a
	// reset. See Flow.spuriousEnd.
	DropDuplicate
	// DropCE: a packet marked Congestion Experienced on its way from a
	// sender that negotiated ECN to a receiver that did not, which would
	// ignore the mark (see Rewrite).
	DropCE
	numVerdicts
)

// NumVerdicts is the number of verdicts, for counter arrays.
const NumVerdicts = int(numVerdicts)

func (v Verdict) String() string {
	return [...]string{"forward", "drop_syn", "drop_seq", "drop_ack", "drop_rst", "drop_malformed", "drop_unsupported", "drop_no_flow", "drop_duplicate", "drop_ce"}[v]
}

// minWindow is a floor for window-based bounds: tiny or zero windows must
// not turn retransmissions and window probes into drops.
const minWindow = 66000

// maxWindow is the largest window a TCP receiver advertises (65535 with
// the largest window scale, 14): the checks' bounds lie a window ahead
// and behind, and with two such windows they still span less than half
// the sequence space, where comparisons modulo 2^32 hold.
const maxWindow = 0xffff << 14

// relearnSlack is how far beyond its receiver's window a relearning
// direction's sender may have moved past the record (see Flow.Relearn):
// the record is refreshed every second, and the earlier daemon went on
// forwarding for up to that second before it died. 512 MiB is a second
// at 4.3 Gbit/s, four times what the Go engine forwards in bulk (the
// README's benchmarks: about 1 Gbit/s, the whole flow on one queue).
const relearnSlack = 1 << 29

// relearnTop is the furthest a relearning direction's sender can have
// sent: while no daemon ran nothing of the flow was forwarded, so its
// receiver acknowledged at most what reached it before, and it sent at
// most a window (the largest its receiver can advertise, see
// AdoptRelearn) beyond the acknowledgment it got; the earlier daemon
// forwarded at most relearnSlack past the record before it died. A
// forged packet beyond it, taken for the ends' (raising the state past
// anything they will send), made their real packets fall behind the
// checks' lower bounds: one blind guess in four killed the flow.
//
// Clamped so that it lies less than 2^31 ahead of the checks' lower
// bounds (a window behind sndNxt and ackSeen; ackSeen is not past
// sndNxt), where comparisons modulo 2^32 hold; only a receiver that
// offers a window near the largest there is (scale 14) loses part of
// the slack, and its window alone reaches a GiB.
func (s *dirState) relearnTop() Seq {
	win := uint64(max(s.maxWin, 1))
	reach := min(win+relearnSlack, 1<<31-1-uint64(max(s.maxWin, minWindow)))
	return s.ackSeen.Add(uint32(reach))
}

// Rewrite checks a packet of direction d against the flow and, if it
// passes, rewrites it in place so it continues the other connection:
// ports, addresses (other is the other direction's input tuple, whose
// reverse is this direction's output tuple), sequence and ack offsets,
// SACK blocks, timestamps, window scale, options the receiving leg never
// negotiated, and the checksums. A packet that fails a check changes
// nothing, neither in the packet nor in the flow.
//
// csumComplete says whether the packet's TCP checksum is complete; if not
// (CHECKSUM_PARTIAL from NFQUEUE, the field holds only the pseudo-header
// sum) the checksum is computed over the whole segment, since the kernel
// treats the checksum of an altered packet as complete.
//
// It does not allocate.
func (f *Flow) Rewrite(p *Packet, d Dir, other *Key, now int64, csumComplete bool) Verdict {
	ackIn, v := f.check(p, d, false)
	if v != Forward {
		return v
	}
	// ECN is negotiated per connection, and the two legs of a splice
	// may differ: a client that asks for it (Apple's systems, Linux with
	// tcp_ecn=1) gets it from the gateway's socket (tcp_ecn=2, the
	// default, accepts it), while the gateway's own connection to the
	// server does not ask. Such a sender marks its packets ECN-capable;
	// a router would then mark congestion (CE) instead of dropping, and
	// the receiver, which negotiated no ECN, ignores the mark: the
	// sender never slows down, and the bottleneck's queue fills. As at
	// a tunnel's egress to a leg without ECN (RFC 6040), a CE mark
	// becomes the drop it stands for, and the rest go Not-ECT.
	stripECN := f.closed&(flowStripECN<<d) != 0
	if stripECN && p.ECN() == ECNCE {
		return DropCE
	}
	t := p.TCP()
	flags := t.Flags()
	s, o := &f.d[d], &f.d[1-d]
	seq := t.Seq()
	end := seq.Add(p.SegmentLen())
	win := max(s.maxWin, 1)
	relearnS, relearnO := f.relearning(d), f.relearning(1-d)

	// Nothing of a RST but where it lies is tracked: the receiver takes
	// nothing from one (one it accepts ends the connection, any other is
	// dropped after a challenge ACK), neither payload, FIN, ACK, window
	// nor timestamps. And a RST needs no acceptable ACK to pass the
	// checks, only a sequence number in the window: tracked, its payload
	// or FIN raised sndNxt to where a blind attacker chose, and a second
	// RST there ended the flow (see below); its window raised the other
	// direction's largest window, the checks' bound, to 1 GiB; its TSval
	// set the sender's timestamp offset, so that PAWS dropped every real
	// packet after it.
	rst := flags&FlagRST != 0
	if !rst {
		// A RST is never a retransmission.
		if v := f.spuriousEnd(s, o, flags, p.SegmentLen(), end, ackIn, now); v != Forward {
			return v
		}
	}
	raiseSeq := p.SegmentLen() == 0 && !rst && seq.LessThan(s.ackSeen) && seq != s.ackSeen.Sub(1)
	// Relearning, what the record forwarded is no bound: the ends moved on.
	lowerSeq := p.SegmentLen() == 0 && !rst && s.sndNxt.LessThan(seq) && !relearnS

	// Committed: from here on the packet is forwarded.
	var oldSum uint64
	if csumComplete {
		oldSum = headerSum(p)
	}
	if p.SegmentLen() > 0 && !rst {
		// A segment that starts in the window may end beyond it (forged,
		// or corrupted: its receiver drops it). Its end must not raise
		// the lower bound above what the receiver still waits for, or
		// every later segment ending near the acknowledged point (the
		// retransmission of a lost one) is dropped for ever: the
		// receiver's largest window grows by the excess, as conntrack's
		// td_maxwin does (tcp_in_window).
		sent := end
		if top := s.ackSeen.Add(win); !relearnS && top.LessThan(end) {
			if grown := uint64(s.maxWin) + uint64(top.Size(end)); grown <= maxWindow {
				s.maxWin = uint32(grown)
			} else {
				// Up to the largest window there is, no further: an
				// attacker who sees the flow grew it 64 KB a segment,
				// past 2^31, where the checks turn over (an ACK of
				// anything new fell behind the lower bound). What
				// lies beyond is sent to nobody: it raises nothing.
				s.maxWin = max(s.maxWin, maxWindow)
				sent = s.ackSeen.Add(s.maxWin)
			}
		}
		s.sndNxt = maxSeq(s.sndNxt, sent)
	}
	if flags&(FlagFIN|FlagRST) == FlagFIN && s.flags&dirFIN == 0 && s.ackSeen.LessThan(end) {
		// Not a FIN that ends at or before what the receiver
		// acknowledged: the receiver has every byte up to there, and
		// drops it unread (tcp_data_queue: a retransmission), and no
		// FIN went there (none was seen): forged. Taken for the sender's
		// FIN, the receiver's next ACK would acknowledge it at once, and
		// one such packet each way would end the flow while its ends go on.
		s.flags |= dirFIN
		s.finSeq = end.Sub(1)
		s.finAt = now
	}
	if flags&(FlagACK|FlagRST) == FlagACK {
		if relearnO {
			// The receiver's acknowledgment is its rcv_nxt now: it covers
			// all the other direction's data that reached it, forwarded
			// by the earlier daemon or since; what it has not received
			// comes again (retransmitted) and raises sndNxt. Unless it
			// holds data past a hole (SACK blocks beyond the ACK): that
			// came from the earlier daemon too, and once the hole is
			// filled the receiver acknowledges all of it at once. Until
			// an ACK shows no hole, the direction keeps relearning, its
			// sndNxt raised to the blocks (within the receiver's window).
			o.sndNxt = maxSeq(o.sndNxt, ackIn)
			if top, ok := sackTop(t.Options(), o.seqOff); ok && ackIn.LessThan(top) {
				o.sndNxt = maxSeq(o.sndNxt, minSeq(top, ackIn.Add(max(o.maxWin, minWindow))))
			} else {
				f.closed &^= flowRelearn << (1 - d)
			}
		}
		o.ackSeen = maxSeq(o.ackSeen, ackIn)
		if o.flags&(dirFIN|dirFINAcked) == dirFIN && o.finSeq.LessThan(ackIn) {
			// The end's timer restarts: repeats that crossed this ACK
			// are spurious however late it came (see spuriousEnd).
			o.flags |= dirFINAcked
			o.finAt = now
		}
	}
	if rst && (seq == s.sndNxt || seq == s.ackSeen || s.rstAtFIN(seq)) {
		// Only a RST the receiver accepts ends the flow: one at exactly
		// its rcv_nxt (RFC 5961 3.2), which a real end sends as its
		// snd_nxt or as the ack it received. Any other RST in the window
		// draws a challenge ACK and the connection lives on; were the flow
		// taken as finished, its entries would go and it would stall. A
		// blind attacker hits one of the two numbers with odds of 2^-31.
		f.closed |= flowRST
	}
	if !rst {
		w := uint32(t.Window()) << s.wsIn
		s.lastWin = w
		o.maxWin = max(o.maxWin, w)
		s.winUnit = s.winUnit || w>>s.wsOut != 0
	}
	f.lastSeen = now

	t.SetSrcPort(s.srcPort)
	t.SetDstPort(s.dstPort)
	if raiseSeq {
		// A pure ACK whose sequence number lies behind what the receiver
		// already acknowledged. Across a splice this is normal: the
		// sender may have sent data under the gateway socket's larger
		// window, and when its window then shrinks its pure ACKs carry
		// snd_una+snd_wnd, which can fall behind the receiver's rcv_nxt.
		// The receiver would drop such an ACK as out of window, losing
		// the ACK and window information it carries, and if both ends do
		// it they deadlock. A pure ACK's sequence number carries no data:
		// move it to the receiver's rcv_nxt.
		//
		// Except for one exactly one behind: that is a window probe or a
		// keepalive (snd_una-1 from a sender that has every
		// acknowledgment), sent to be answered. The receiver answers an
		// old sequence number with an ACK of its rcv_nxt and its window;
		// moved into the window, the probe would be accepted in silence,
		// and a sender whose window-opening ACK was lost would probe a
		// closed window for ever.
		seq = s.ackSeen
	}
	if lowerSeq {
		// A pure ACK from beyond the data forwarded: the sender sent
		// data the flow did not forward (held for an unsplice, passed
		// to the proxy, lost before the gateway). Its receiver must not
		// see that sequence number: a TCP takes the window of an
		// in-window ACK only from a segment at or after the one that
		// last set it (snd_wl1, RFC 9293 3.10.7.4), so after such an
		// ACK with a closed window, the window updates of a socket
		// rebuilt at the data forwarded (an unsplice) are ignored and
		// the flow stalls for ever. A pure ACK's sequence number carries
		// no data: move it back to the end of what was forwarded.
		seq = s.sndNxt
	}
	if moved := uint32(seq - t.Seq()); moved != 0 && flags&FlagURG != 0 {
		t.MoveUrgent(moved)
	}
	t.SetSeq(seq.Add(s.seqOff))
	if flags&FlagACK != 0 {
		t.SetAck(t.Ack().Sub(o.seqOff))
	}
	t.SetWindow(scaleWindow(t.Window(), s.wsIn, s.wsOut, s.winUnit))
	f.rewriteOptions(t.Options(), s, o, rst)
	if stripECN && p.ECN() != ECNNotECT {
		p.clearECN()
	}
	if s.flags&dirAddrs != 0 {
		p.setAddrs(&other.Dst, &other.Src)
		if !p.v6 {
			p.IPv4().UpdateChecksum()
		}
	}

	if csumComplete {
		t.SetChecksum(UpdateChecksum(t.Checksum(), Fold(oldSum), Fold(headerSum(p))))
	} else {
		t.SetChecksum(0)
		t.SetChecksum(TCPChecksum(p.Src(), p.Dst(), p.Segment()))
	}
	return Forward
}

// check is Rewrite's checks of a packet of direction d, after
// conntrack's tcp_in_window and RFC 5961, in the sender's own sequence
// space: the verdict Rewrite gives the packet (unless it drops it as a
// spurious duplicate) and, for an ACK, the acknowledgment number in the
// space of the data it acknowledges. It changes nothing. oldAck lets an
// acknowledgment pass however far it lies behind (see LearnAck).
func (f *Flow) check(p *Packet, d Dir, oldAck bool) (ackIn Seq, v Verdict) {
	t := p.TCP()
	flags := t.Flags()
	if flags&FlagSYN != 0 {
		return 0, DropSYN
	}
	s, o := &f.d[d], &f.d[1-d]
	seq := t.Seq()
	end := seq.Add(p.SegmentLen())
	win := max(s.maxWin, 1)
	relearnS, relearnO := f.relearning(d), f.relearning(1-d)
	if flags&FlagRST != 0 {
		// Relearning (see Relearn), the sender's snd_nxt, where its RST
		// lies, is anywhere from what the record acknowledged to the
		// furthest it can have sent.
		if !s.rstAtFIN(seq) && (relearnS && (seq.LessThan(s.ackSeen) || s.relearnTop().LessThan(seq)) || !relearnS && !seq.InWindow(s.ackSeen, win+1)) {
			return 0, DropRST
		}
	} else {
		upper := s.ackSeen.Add(win)
		if relearnS {
			upper = s.relearnTop()
		}
		lower := s.sndNxt.Sub(max(s.maxWin, minWindow))
		if upper.LessThan(seq) || end.LessThan(lower) {
			return 0, DropSeq
		}
	}
	if flags&(FlagACK|FlagRST) == 0 {
		// A receiver in a synchronized state drops a segment without ACK
		// unread (RFC 9293 3.10.7.4), and one that needs no acceptable
		// ACK is easy to forge: the first packet after a splice teaches
		// the engine its sender's timestamp clock.
		return 0, DropAck
	}
	if flags&FlagACK != 0 {
		ackIn = t.Ack().Sub(o.seqOff)
		// Relearning, the receiver may acknowledge what the earlier
		// daemon forwarded past the record, up to the furthest the
		// other direction's sender can have sent.
		top := o.sndNxt
		if relearnO {
			top = o.relearnTop()
		}
		if top.LessThan(ackIn) || !oldAck && ackIn.LessThan(o.ackSeen.Sub(max(o.maxWin, minWindow))) {
			return 0, DropAck
		}
	}
	return ackIn, Forward
}

// rstAtFIN reports whether a RST at seq lies at the sender's FIN, which
// is the last thing it sent and which the receiver acknowledged: a
// receiver that got the FIN (CLOSE_WAIT, LAST_ACK, CLOSING) accepts it
// there, one before its rcv_nxt, as some stacks send it (Linux:
// tcp_reset_check), and the window check would drop it. A FIN the
// stream went on past (a forged one that passed the checks) is no
// receiver's last: a RST there ends nothing.
func (s *dirState) rstAtFIN(seq Seq) bool {
	end := seq.Add(1)
	return s.flags&dirFIN != 0 && seq == s.finSeq && s.ackSeen == end && s.sndNxt == end
}

// finDupWindow is how soon after a FIN went through a retransmission of
// it counts as spurious. A tail loss probe comes after 2*SRTT plus 2 ms; a
// real loss is repaired by the retransmission timeout, 200 ms at least.
const finDupWindow = int64(100 * time.Millisecond)

// spuriousEnd recognizes spurious retransmissions at the end of a flow,
// and the duplicate ACKs they draw. When the gateway's latency jitters, a
// sender retransmits (a tail loss probe of its FIN, a SACK recovery of a
// segment that was only late, its FIN again while the ACK of it waits in
// a slow queue) although the original is on its way. The receiver answers
// each duplicate with a duplicate ACK; the first ACK of the last FIN
// closes the sender's socket, and the sender answers every later one with
// a reset. Three cases are dropped (a FIN's time, finAt, is when it was
// forwarded and again when it was first acknowledged):
//
//   - a repeat of a FIN less than finDupWindow after its time, with
//     nothing new in it; should the original or its ACK be lost, the
//     sender's retransmission timeout repeats it again, later, and that
//     one passes;
//   - after both FINs were acknowledged, the first segment that holds only
//     acknowledged data; a second one passes (the sender lost its ACK);
//   - after both FINs were acknowledged, less than finDupWindow after the
//     later FIN's time (the ACK that finished the flow), a pure ACK that
//     acknowledges nothing new: the ACK that closed the flow went through
//     already, and duplicates drawn by repeats that crossed it, however
//     late it came, would only meet a closed socket. Should it be lost
//     beyond the gateway, the peer's FIN comes again after its
//     retransmission timeout, and the ACK that answers it passes.
func (f *Flow) spuriousEnd(s, o *dirState, flags uint8, segLen uint32, end, ackIn Seq, now int64) Verdict {
	if segLen == 0 {
		if flags&(FlagACK|FlagRST) == FlagACK && f.Finished() && !o.ackSeen.LessThan(ackIn) &&
			now-max(s.finAt, o.finAt) < finDupWindow {
			return DropDuplicate
		}
		return Forward
	}
	if flags&FlagFIN != 0 && s.flags&dirFIN != 0 && end.LessThanEq(s.sndNxt) && now-s.finAt < finDupWindow {
		return DropDuplicate
	}
	if f.Finished() && end.LessThanEq(s.ackSeen) && s.flags&dirDupDropped == 0 {
		s.flags |= dirDupDropped
		return DropDuplicate
	}
	return Forward
}

// headerSum is the sum of everything Rewrite may change under the TCP
// checksum: the pseudo-header addresses and the TCP header without its
// checksum field.
func headerSum(p *Packet) uint64 {
	t := p.TCP()
	hl := t.HeaderLen()
	s := Sum(p.Src(), 0)
	s = Sum(p.Dst(), s)
	s = Sum(t[:TCPChecksumOffset], s)
	return Sum(t[TCPUrgentOffset:hl], s)
}

// scaleWindow converts a window field from one shift to another, clamped
// to the field and rounded down: a sender never learns of more window
// than its receiver offered. A window below one unit of the output shift
// (a receiver short of buffer space offers a few hundred bytes) becomes
// 0 once the receiver has offered a whole unit (unit): it will offer one
// again, and its window update then lets the sender go on. Rounded up
// instead, the sender sent up to a whole unit and the receiver dropped
// what lay beyond its window (TcpExtBeyondWindow), to be sent again after
// a retransmission timeout. A receiver that never offered a unit (its
// whole buffer smaller than one) gets 1: 0 would stop the flow for good.
func scaleWindow(field uint16, in, out uint8, unit bool) uint16 {
	if in == out {
		return field
	}
	w := uint64(field) << in
	v := w >> out
	switch {
	case v > 0xffff:
		return 0xffff
	case v == 0 && w != 0 && !unit:
		return 1
	}
	return uint16(v)
}

// nextOption reads the TCP option at opts[i:] the way Linux's
// tcp_parse_options does, so that the engine and the receiver agree on
// what each byte is: it returns the option's kind, its bytes (kind and
// length included; nil for a NOP) and where the next one starts, and ok
// false at EOL, at the end and at a malformed length, where the walk
// stops.
func nextOption(opts []byte, i int) (kind byte, opt []byte, next int, ok bool) {
	if i >= len(opts) || opts[i] == OptEOL {
		return 0, nil, 0, false
	}
	if opts[i] == OptNOP {
		return OptNOP, nil, i + 1, true
	}
	if i+1 >= len(opts) {
		return 0, nil, 0, false
	}
	n := int(opts[i+1])
	if n < 2 || i+n > len(opts) {
		return 0, nil, 0, false
	}
	return opts[i], opts[i : i+n], i + n, true
}

// sackBlocks reports whether opt (a SACK option) has the length of one or
// more whole blocks; the receiver ignores one that has not.
func sackBlocks(opt []byte) bool {
	return len(opt) >= 2+optSACKBlockLen && (len(opt)-2)%optSACKBlockLen == 0
}

// rewriteOptions rewrites the options the receiver reads (nextOption);
// options with an unexpected length are left alone (the receiver ignores
// them too). rst: the segment is a RST, whose timestamps teach nothing.
func (f *Flow) rewriteOptions(opts []byte, s, o *dirState, rst bool) {
	for kind, opt, i, ok := nextOption(opts, 0); ok; kind, opt, i, ok = nextOption(opts, i) {
		switch kind {
		case OptTimestamps:
			if len(opt) == optTimestampsLen {
				s.rewriteTimestamps(opt, o, rst)
			}
		case OptSACK:
			if !sackBlocks(opt) {
				break
			}
			if s.flags&dirStripSACK != 0 {
				nop(opt)
				break
			}
			for b := 2; b < len(opt); b += 4 {
				v := binary.BigEndian.Uint32(opt[b:])
				binary.BigEndian.PutUint32(opt[b:], v-o.seqOff)
			}
		}
	}
}

// sackTop is the highest right edge of the SACK blocks in opts, less
// off (in the data sender's sequence space); ok is false when there is
// none.
func sackTop(opts []byte, off uint32) (top Seq, ok bool) {
	for kind, opt, i, more := nextOption(opts, 0); more; kind, opt, i, more = nextOption(opts, i) {
		if kind != OptSACK || !sackBlocks(opt) {
			continue
		}
		for b := 2 + 4; b < len(opt); b += optSACKBlockLen {
			right := Seq(binary.BigEndian.Uint32(opt[b:]) - off)
			if !ok || top.LessThan(right) {
				top, ok = right, true
			}
		}
	}
	return top, ok
}

func (s *dirState) rewriteTimestamps(opt []byte, o *dirState, rst bool) {
	val := binary.BigEndian.Uint32(opt[2:])
	ecr := binary.BigEndian.Uint32(opt[6:])
	if !rst {
		s.tsVal, s.tsEcr = val, ecr
	}
	if s.flags&dirStripTS != 0 {
		nop(opt)
		return
	}
	if s.flags&dirTS == 0 {
		return
	}
	if s.flags&dirTSLearned == 0 {
		if rst {
			// A RST teaches no offset (see Rewrite): with none to
			// translate it by, the option goes. A receiver takes a RST
			// without one (RFC 7323 requires timestamps on every
			// segment but a RST, and its PAWS check passes any RST).
			nop(opt)
			return
		}
		// Anchor the sender's clock at the output leg's clock at capture
		// (the receiver's last TSval came from that socket, so PAWS holds),
		// then jump ahead so that the sender's raw TSvals fall behind.
		s.tsOff -= val
		s.tsJump = pawsJump(s.tsOff)
		s.tsOff += s.tsJump
		s.flags |= dirTSLearned
	}
	binary.BigEndian.PutUint32(opt[2:], val+s.tsOff)
	// TSecr echoes a value of the receiver's output clock; map it back
	// to the receiver's own clock. Until the receiver's offset is known
	// the echo cannot be mapped, and an echo of a TSval the gateway's old
	// socket sent, before the jump, maps to nothing meaningful: 0 makes
	// them ignored for RTT estimation.
	binary.BigEndian.PutUint32(opt[6:], o.mapEcho(ecr))
}

// mapEcho maps a TSecr that echoes this direction's output clock back to
// its sender's own clock, or 0 if it cannot be mapped.
func (o *dirState) mapEcho(ecr uint32) uint32 {
	if o.flags&dirTSLearned == 0 {
		return 0
	}
	e := ecr - o.tsOff
	// An echo of a value sent after the jump lies an RTT or so behind the
	// sender's latest TSval; one sent before it lies about tsJump behind.
	if o.tsJump > 1 && int64(int32(o.tsVal-e)) >= int64(o.tsJump/2) {
		return 0
	}
	return e
}

// The TSval jump: see pawsJump.
const (
	pawsTarget  = 1 << 30       // how far behind the receiver's TS.Recent raw TSvals should be
	maxPAWSJump = 1<<31 - 1<<28 // the largest forward jump a receiver accepts, with 2^28 ticks to spare
)

// pawsJump returns how far a direction's TSvals jump forward at the
// splice, given the offset cont that keeps them continuous with the
// receiver's old connection to the gateway.
//
// If the table disappears (an operator's `nft flush ruleset`) or the
// daemon stops, a spliced flow's packets reach the ends unrewritten. Their
// sequence numbers are then in the wrong space, and a receiver would
// accept the ones that happen to fall into its window and place their
// bytes at the wrong offset. That is likely, not rare, when the offsets
// are small: in transparent mode both connections have the same 4-tuple,
// and a Linux host derives ISNs and TS offsets from the tuple, so the
// gateway's ISN toward the server is within microseconds of the
// client's. PAWS (RFC 7323) protects the receiver instead: a segment whose
// TSval lies behind TS.Recent (modulo 2^31) is dropped before its sequence
// number is looked at. A forward jump is legal, so the engine moves the
// receiver's TS.Recent about 2^30 ticks ahead of the sender's own clock,
// and every raw segment fails PAWS. When cont is itself far ahead or
// behind, the jump is clamped to what the receiver accepts; for a small
// band of offsets (about 6%) raw TSvals then stay ahead, as before.
func pawsJump(cont uint32) uint32 {
	j := int64(pawsTarget) - int64(int32(cont))
	return uint32(min(max(j, 0), maxPAWSJump))
}

func nop(b []byte) {
	for i := range b {
		b[i] = OptNOP
	}
}
