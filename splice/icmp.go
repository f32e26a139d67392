package splice

import (
	"bytes"
	"encoding/binary"
)

// Path MTU errors about spliced flows.
//
// A spliced flow's packets leave the gateway rewritten. A router that
// finds one too big for its next hop (the gateway's own forwarding, when
// the other leg's path has a smaller MTU, or a router beyond it) answers
// the packet's source with an ICMP "fragmentation needed" (ICMPv6 "packet
// too big") that quotes the packet as rewritten: in the other leg's
// sequence space, and with NAT from the gateway's address and port. The
// sender cannot use it: with NAT it never reaches the sender, and
// otherwise the sender's kernel finds its sequence number outside what
// it sent (TcpExtOutOfWindowIcmps) and ignores it. The sender goes on
// sending segments too big for the path, and the flow stalls for good
// (the sender's retransmissions are as big). The gateway queues such an
// error to the engine (see rules.Divert), which translates it into the
// sender's terms, as conntrack's NAT does for the connections it tracks:
// the quote becomes the segment as the sender sent it, and the error goes
// to the sender.

// ICMPError is a parsed path MTU error (ICMP destination unreachable,
// fragmentation needed; ICMPv6 packet too big) quoting a TCP segment.
type ICMPError struct {
	b    []byte // the packet, up to the IP length
	v6   bool
	icmp int // offset of the ICMP header
	q    int // offset of the quoted IP header
	qt   int // offset of the quoted TCP header
}

// ICMP and ICMPv6 values of the path MTU errors.
const (
	protoICMP          = 1
	protoICMPv6        = 58
	icmpDestUnreach    = 3
	icmpFragNeeded     = 4
	icmpv6PacketTooBig = 2
	icmpHeaderLen      = 8 // type, code, checksum, 4 bytes that hold the MTU
	// quotedTCPMin: the first 8 bytes of the quoted segment (ports and
	// sequence number), all that RFC 792 promises and a sender needs.
	quotedTCPMin = 8
)

// ParseICMPError reads b as a path MTU error quoting a TCP segment whose
// IP header has no options (IPv4) or extension headers (IPv6), the only
// form the rules queue. ok is false for anything else, or a malformed
// one.
func ParseICMPError(b []byte) (m ICMPError, ok bool) {
	if len(b) < 1 {
		return m, false
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < IPv4MinHeaderLen {
			return m, false
		}
		ip := IPv4(b)
		hl, tl := ip.HeaderLen(), ip.TotalLen()
		if hl < IPv4MinHeaderLen || tl < hl || tl > len(b) || ip.IsFragment() || ip.Protocol() != protoICMP {
			return m, false
		}
		m = ICMPError{b: b[:tl], icmp: hl, q: hl + icmpHeaderLen, qt: hl + icmpHeaderLen + IPv4MinHeaderLen}
		if m.qt+quotedTCPMin > tl || b[hl] != icmpDestUnreach || b[hl+1] != icmpFragNeeded {
			return m, false
		}
		q := IPv4(b[m.q:])
		if b[m.q] != 0x45 || q.Protocol() != protoTCP || q.IsFragment() {
			return m, false
		}
	case 6:
		if len(b) < IPv6HeaderLen {
			return m, false
		}
		ip := IPv6(b)
		end := IPv6HeaderLen + ip.PayloadLen()
		if end > len(b) || ip.NextHeader() != protoICMPv6 {
			return m, false
		}
		m = ICMPError{b: b[:end], v6: true, icmp: IPv6HeaderLen, q: IPv6HeaderLen + icmpHeaderLen, qt: IPv6HeaderLen + icmpHeaderLen + IPv6HeaderLen}
		// Any code: RFC 4443 has the receiver ignore it.
		if m.qt+quotedTCPMin > end || b[m.icmp] != icmpv6PacketTooBig {
			return m, false
		}
		if b[m.q]>>4 != 6 || IPv6(b[m.q:]).NextHeader() != protoTCP {
			return m, false
		}
		// A quote between IPv4-mapped addresses has an IPv4 flow's key
		// (Packet.Parse refuses such packets for the same reason).
		if q := IPv6(b[m.q:]); [12]byte(q.Src()) == v4InV6Prefix || [12]byte(q.Dst()) == v4InV6Prefix {
			return m, false
		}
	default:
		return m, false
	}
	// An error goes to the source of the packet it quotes (RFC 792;
	// RFC 4443 section 2.4): one addressed elsewhere is about no packet
	// the engine forwarded to that address.
	if src, _ := m.quotedAddrs(); !bytes.Equal(m.outerDst(), src) {
		return m, false
	}
	return m, true
}

// IsICMP reports whether b is an ICMP or ICMPv6 packet (after any IPv6
// extension headers), parsable as a path MTU error or not.
func IsICMP(b []byte) bool {
	if len(b) < 1 {
		return false
	}
	switch b[0] >> 4 {
	case 4:
		return len(b) >= IPv4MinHeaderLen && IPv4(b).Protocol() == protoICMP
	case 6:
		if len(b) < IPv6HeaderLen {
			return false
		}
		next, off := IPv6(b).NextHeader(), IPv6HeaderLen
		for range 8 { // a bounded walk: no packet needs more
			switch next {
			case protoICMPv6:
				return true
			case ipv6HopByHop, ipv6DestOptions, ipv6Routing, ipv6Fragment:
				if off+8 > len(b) {
					return false
				}
				n := 8 // a fragment header is 8 bytes; its second byte is reserved
				if next != ipv6Fragment {
					n += int(b[off+1]) * 8
				}
				next, off = b[off], off+n
			default:
				return false
			}
		}
	}
	return false
}

// Bytes returns the packet.
func (m *ICMPError) Bytes() []byte { return m.b }

// MTU returns the next-hop MTU the error reports.
func (m *ICMPError) MTU() uint32 {
	if m.v6 {
		return binary.BigEndian.Uint32(m.b[m.icmp+4:])
	}
	return uint32(binary.BigEndian.Uint16(m.b[m.icmp+6:]))
}

// addrLen is the length of one address of the packet's family.
func (m *ICMPError) addrLen() int {
	if m.v6 {
		return 16
	}
	return 4
}

// quotedAddrs returns the quoted IP header's source and destination.
func (m *ICMPError) quotedAddrs() (src, dst []byte) {
	if m.v6 {
		q := IPv6(m.b[m.q:])
		return q.Src(), q.Dst()
	}
	q := IPv4(m.b[m.q:])
	return q.Src(), q.Dst()
}

// outerDst returns the error's own destination address.
func (m *ICMPError) outerDst() []byte {
	if m.v6 {
		return IPv6(m.b).Dst()
	}
	return IPv4(m.b).Dst()
}

// QuotedKey returns the tuple of the quoted segment, as it was sent. Read
// backwards it is the input key of the other direction of its flow.
func (m *ICMPError) QuotedKey() Key {
	src, dst := m.quotedAddrs()
	t := TCP(m.b[m.qt:])
	return keyOf(src, dst, t.SrcPort(), t.DstPort())
}

// checksumValid reports whether the ICMP checksum verifies.
func (m *ICMPError) checksumValid() bool {
	return Fold(m.icmpSum()) == 0xffff
}

// icmpSum is the one's-complement sum over the ICMP message, with the
// pseudo-header for ICMPv6 (RFC 4443 section 2.3).
func (m *ICMPError) icmpSum() uint64 {
	var s uint64
	if m.v6 {
		ip := IPv6(m.b)
		s = Sum(ip.Src(), 0)
		s = Sum(ip.Dst(), s)
		s += protoICMPv6 + uint64(len(m.b)-m.icmp)
	}
	return Sum(m.b[m.icmp:], s)
}

// Translate rewrites the error into the terms of the quoted segment's
// sender: the segment was forwarded by flow e in direction d. The quote
// gets the tuple the sender sent it with and its own sequence (and, if
// quoted, acknowledgment) number, and the error goes to the sender; the
// checksums are updated (the quoted TCP checksum too, when quoted).
// Options and the window in the quote stay as forwarded: no sender reads
// them. It returns false, changing nothing, when the error's checksum
// does not verify: corrupted or forged, its receiver would drop it, and
// a translation would make it valid.
func (m *ICMPError) Translate(e *Entry, d Dir) bool {
	if !m.checksumValid() {
		return false
	}
	e.mu.Lock()
	seqOff, ackOff := e.flow.d[d].seqOff, e.flow.d[1-d].seqOff
	e.mu.Unlock()
	in := e.Keys[d] // the tuple as the sender sent it
	al := m.addrLen()
	sender, addressed := in.Src[16-al:], in.Dst[16-al:]

	// The quoted TCP header: ports, sequence and acknowledgment numbers,
	// and the quoted pseudo-header's addresses, as far as quoted; the
	// quoted checksum follows the change if it is quoted itself.
	qsrc, qdst := m.quotedAddrs()
	t := TCP(m.b[m.qt:])
	tcpFields := min(len(t), TCPSeqOffset+8) // ports, seq, ack
	tcpFields &^= 3                          // whole 32-bit words
	oldSum := Sum(t[:tcpFields], Sum(qdst, Sum(qsrc, 0)))
	t.SetSrcPort(in.SrcPort)
	t.SetDstPort(in.DstPort)
	t.SetSeq(t.Seq().Sub(seqOff))
	if len(t) >= TCPAckOffset+4 {
		t.SetAck(t.Ack().Add(ackOff))
	}
	copy(qsrc, sender)
	copy(qdst, addressed)
	if len(t) >= TCPChecksumOffset+2 {
		newSum := Sum(t[:tcpFields], Sum(qdst, Sum(qsrc, 0)))
		t.SetChecksum(UpdateChecksum(t.Checksum(), Fold(oldSum), Fold(newSum)))
	}
	if !m.v6 {
		IPv4(m.b[m.q:]).UpdateChecksum()
	}

	// The error itself: to the sender, with its checksum recomputed
	// (ICMPv6's covers the destination too).
	copy(m.outerDst(), sender)
	if !m.v6 {
		IPv4(m.b).UpdateChecksum()
	}
	binary.BigEndian.PutUint16(m.b[m.icmp+2:], 0)
	binary.BigEndian.PutUint16(m.b[m.icmp+2:], ^Fold(m.icmpSum()))
	return true
}
