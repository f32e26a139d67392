package splice

import (
	"encoding/binary"
	"net/netip"
)

// Status is the result of parsing a packet.
type Status uint8

const (
	// OK: an IPv4 or IPv6 packet carrying a complete TCP header.
	OK Status = iota
	// Malformed: lengths or header fields are inconsistent.
	Malformed
	// Unsupported: valid, but not something the engine rewrites: not TCP,
	// a fragment, an IPv6 jumbogram or extension header it does not walk
	// (routing, fragment, AH, ESP, unknown), an IPv6 packet of an
	// IPv4-mapped address.
	Unsupported
)

func (s Status) String() string {
	return [...]string{"ok", "malformed", "unsupported"}[s]
}

// Packet is a parsed IP packet holding a TCP segment. The caller owns it
// and reuses it for every packet: Parse allocates nothing.
type Packet struct {
	b   []byte // the IP packet, exactly as long as its length fields say
	v6  bool
	l4  int // offset of the TCP header
	end int // offset just after the TCP payload
}

// Bytes is the whole IP packet.
func (p *Packet) Bytes() []byte { return p.b }

// IsIPv6 reports the IP version.
func (p *Packet) IsIPv6() bool { return p.v6 }

// IPv4 is the IPv4 header view (only if !IsIPv6).
func (p *Packet) IPv4() IPv4 { return IPv4(p.b) }

// IPv6 is the IPv6 header view (only if IsIPv6).
func (p *Packet) IPv6() IPv6 { return IPv6(p.b) }

// TCP is the TCP header view, options included.
func (p *Packet) TCP() TCP { return TCP(p.b[p.l4:p.end]) }

// Segment is the TCP header and payload: what the TCP checksum covers.
func (p *Packet) Segment() []byte { return p.b[p.l4:p.end] }

// PayloadLen is the number of TCP payload bytes.
func (p *Packet) PayloadLen() int { return p.end - p.l4 - p.TCP().HeaderLen() }

// Payload is the TCP payload.
func (p *Packet) Payload() []byte { return p.b[p.l4+p.TCP().HeaderLen() : p.end] }

// Src and Dst are the address bytes (4 or 16).
func (p *Packet) Src() []byte {
	if p.v6 {
		return IPv6(p.b).Src()
	}
	return IPv4(p.b).Src()
}

func (p *Packet) Dst() []byte {
	if p.v6 {
		return IPv6(p.b).Dst()
	}
	return IPv4(p.b).Dst()
}

// SegmentLen is the number of sequence numbers the segment occupies:
// payload, plus one for SYN and for FIN.
func (p *Packet) SegmentLen() uint32 {
	n := uint32(p.PayloadLen())
	f := p.TCP().Flags()
	if f&FlagSYN != 0 {
		n++
	}
	if f&FlagFIN != 0 {
		n++
	}
	return n
}

// IPv6 extension headers the parser walks to find TCP.
const (
	ipv6HopByHop    = 0
	ipv6Routing     = 43
	ipv6Fragment    = 44
	ipv6DestOptions = 60
	protoTCP        = 6
)

// Parse validates b as an IP packet with a TCP header and prepares the
// views. b may be longer than the packet (trailing bytes are ignored) but
// never shorter. After OK, the accessors index without further checks.
func (p *Packet) Parse(b []byte) Status {
	*p = Packet{}
	if len(b) < 1 {
		return Malformed
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < IPv4MinHeaderLen {
			return Malformed
		}
		ip := IPv4(b)
		hl, tl := ip.HeaderLen(), ip.TotalLen()
		if hl < IPv4MinHeaderLen || tl < hl || tl > len(b) {
			return Malformed // a 0 total length (big GSO) lands here too
		}
		if ip.IsFragment() || ip.Protocol() != protoTCP {
			return Unsupported
		}
		p.b, p.l4, p.end = b[:tl], hl, tl
	case 6:
		if len(b) < IPv6HeaderLen {
			return Malformed
		}
		ip := IPv6(b)
		pl := ip.PayloadLen()
		if pl == 0 {
			return Unsupported // jumbogram, or nothing to forward
		}
		end := IPv6HeaderLen + pl
		if end > len(b) {
			return Malformed
		}
		if [12]byte(ip.Src()) == v4InV6Prefix || [12]byte(ip.Dst()) == v4InV6Prefix {
			// IPv4-mapped: its key would be the IPv4 flow's between
			// those addresses (Key maps IPv4 addresses), which it is
			// not. Linux drops an IPv6 packet from such an address.
			return Unsupported
		}
		next, off := ip.NextHeader(), IPv6HeaderLen
		for next != protoTCP {
			switch next {
			case ipv6HopByHop, ipv6DestOptions:
				// Not ipv6Routing: with segments left, the fixed header's
				// destination is not the final one, which the TCP checksum's
				// pseudo-header holds; a rewrite of addresses and checksum
				// from it would be wrong. No spliced flow has a reason to
				// carry one: Unsupported (dropped).
				if off+8 > end {
					return Malformed
				}
				next, off = b[off], off+8+int(b[off+1])*8
				if off > end {
					return Malformed
				}
			default:
				return Unsupported
			}
		}
		p.b, p.v6, p.l4, p.end = b[:end], true, off, end
	default:
		return Malformed
	}
	if p.end-p.l4 < TCPMinHeaderLen {
		return Malformed
	}
	if hl := TCP(p.b[p.l4:]).HeaderLen(); hl < TCPMinHeaderLen || p.l4+hl > p.end {
		return Malformed
	}
	return OK
}

// Key is a flow's 4-tuple in one direction. It is packed and comparable,
// with no pointers, so map lookups hash 36 plain bytes: netip.AddrPort
// keys hold a pointer (the zone) and hash and compare slower. IPv4
// addresses are stored IPv4-mapped.
type Key struct {
	Src, Dst         [16]byte
	SrcPort, DstPort uint16
}

// v4InV6Prefix is the IPv4-mapped prefix ::ffff:0:0/96.
var v4InV6Prefix = [12]byte{10: 0xff, 11: 0xff}

// KeyOf returns the packet's key.
func (p *Packet) KeyOf() Key {
	t := p.TCP()
	return keyOf(p.Src(), p.Dst(), t.SrcPort(), t.DstPort())
}

// keyOf builds a key from raw addresses of one family (4 or 16 bytes,
// as a header holds them) and ports.
func keyOf(src, dst []byte, srcPort, dstPort uint16) Key {
	k := Key{SrcPort: srcPort, DstPort: dstPort}
	if len(src) == 16 {
		copy(k.Src[:], src)
		copy(k.Dst[:], dst)
	} else {
		copy(k.Src[:12], v4InV6Prefix[:])
		copy(k.Dst[:12], v4InV6Prefix[:])
		copy(k.Src[12:], src)
		copy(k.Dst[12:], dst)
	}
	return k
}

// KeyFrom builds a key from addresses (IPv4 or IPv6).
func KeyFrom(src, dst netip.AddrPort) Key {
	return Key{Src: src.Addr().As16(), Dst: dst.Addr().As16(), SrcPort: src.Port(), DstPort: dst.Port()}
}

// Reverse is the key of the opposite direction.
func (k Key) Reverse() Key {
	return Key{Src: k.Dst, Dst: k.Src, SrcPort: k.DstPort, DstPort: k.SrcPort}
}

// IsIPv4 reports whether both addresses are IPv4-mapped.
func (k Key) IsIPv4() bool {
	return [12]byte(k.Src[:12]) == v4InV6Prefix && [12]byte(k.Dst[:12]) == v4InV6Prefix
}

// SrcAddrPort and DstAddrPort return the endpoints (IPv4 unmapped).
func (k Key) SrcAddrPort() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(k.Src).Unmap(), k.SrcPort)
}

func (k Key) DstAddrPort() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(k.Dst).Unmap(), k.DstPort)
}

func (k Key) String() string { return k.SrcAddrPort().String() + " -> " + k.DstAddrPort().String() }

// ECN field values (RFC 3168): the low two bits of the IPv4 TOS byte and
// of the IPv6 traffic class.
const (
	ECNNotECT = 0
	ECNCE     = 3
)

// ECN returns the packet's ECN field.
func (p *Packet) ECN() uint8 {
	if p.v6 {
		return p.b[1] >> 4 & 3
	}
	return p.b[1] & 3
}

// clearECN makes the packet Not-ECT, updating the IPv4 header checksum
// by the change (RFC 1624) as the BPF program does: a header that was
// corrupt stays so.
func (p *Packet) clearECN() {
	if p.v6 {
		p.b[1] &^= 0x30
		return
	}
	old := binary.BigEndian.Uint16(p.b)
	p.b[1] &^= 3
	sum := binary.BigEndian.Uint16(p.b[IPv4ChecksumOffset:])
	binary.BigEndian.PutUint16(p.b[IPv4ChecksumOffset:], UpdateChecksum(sum, old, binary.BigEndian.Uint16(p.b)))
}

// setAddrs writes a key's addresses into the packet's IP header.
func (p *Packet) setAddrs(src, dst *[16]byte) {
	if p.v6 {
		copy(p.Src(), src[:])
		copy(p.Dst(), dst[:])
		return
	}
	copy(p.Src(), src[12:])
	copy(p.Dst(), dst[12:])
}
