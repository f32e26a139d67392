package splice

import "encoding/binary"

// IPv4 is a view of an IPv4 header. Packet.Parse validates it once; after
// that the accessors do no bounds checks of their own beyond Go's.
type IPv4 []byte

// Offsets of IPv4 header fields.
const (
	IPv4VersionIHLOffset   = 0
	IPv4TotalLenOffset     = 2
	IPv4FlagsFragOffset    = 6
	IPv4ProtocolOffset     = 9
	IPv4ChecksumOffset     = 10
	IPv4SrcOffset          = 12
	IPv4DstOffset          = 16
	IPv4MinHeaderLen       = 20
	ipv4MoreFragments      = 0x2000
	ipv4FragmentOffsetMask = 0x1fff
)

func (b IPv4) HeaderLen() int       { return int(b[IPv4VersionIHLOffset]&0x0f) * 4 }
func (b IPv4) TotalLen() int        { return int(binary.BigEndian.Uint16(b[IPv4TotalLenOffset:])) }
func (b IPv4) Protocol() uint8      { return b[IPv4ProtocolOffset] }
func (b IPv4) Src() []byte          { return b[IPv4SrcOffset : IPv4SrcOffset+4] }
func (b IPv4) Dst() []byte          { return b[IPv4DstOffset : IPv4DstOffset+4] }
func (b IPv4) Checksum() uint16     { return binary.BigEndian.Uint16(b[IPv4ChecksumOffset:]) }
func (b IPv4) SetChecksum(v uint16) { binary.BigEndian.PutUint16(b[IPv4ChecksumOffset:], v) }

// IsFragment reports whether the packet is a fragment (more fragments set
// or a non-zero offset).
func (b IPv4) IsFragment() bool {
	return binary.BigEndian.Uint16(b[IPv4FlagsFragOffset:])&(ipv4MoreFragments|ipv4FragmentOffsetMask) != 0
}

// UpdateChecksum recomputes the header checksum.
func (b IPv4) UpdateChecksum() {
	b.SetChecksum(0)
	b.SetChecksum(^Fold(Sum(b[:b.HeaderLen()], 0)))
}

// IPv6 is a view of an IPv6 fixed header.
type IPv6 []byte

// Offsets of IPv6 header fields.
const (
	IPv6PayloadLenOffset = 4
	IPv6NextHeaderOffset = 6
	IPv6SrcOffset        = 8
	IPv6DstOffset        = 24
	IPv6HeaderLen        = 40
)

func (b IPv6) PayloadLen() int   { return int(binary.BigEndian.Uint16(b[IPv6PayloadLenOffset:])) }
func (b IPv6) NextHeader() uint8 { return b[IPv6NextHeaderOffset] }
func (b IPv6) Src() []byte       { return b[IPv6SrcOffset : IPv6SrcOffset+16] }
func (b IPv6) Dst() []byte       { return b[IPv6DstOffset : IPv6DstOffset+16] }

// TCP is a view of a TCP header with its options.
type TCP []byte

// Offsets of TCP header fields, and flag bits.
const (
	TCPSrcPortOffset  = 0
	TCPDstPortOffset  = 2
	TCPSeqOffset      = 4
	TCPAckOffset      = 8
	TCPDataOffOffset  = 12
	TCPFlagsOffset    = 13
	TCPWindowOffset   = 14
	TCPChecksumOffset = 16
	TCPUrgentOffset   = 18
	TCPMinHeaderLen   = 20

	FlagFIN = 0x01
	FlagSYN = 0x02
	FlagRST = 0x04
	FlagPSH = 0x08
	FlagACK = 0x10
	FlagURG = 0x20
)

func (b TCP) SrcPort() uint16      { return binary.BigEndian.Uint16(b[TCPSrcPortOffset:]) }
func (b TCP) DstPort() uint16      { return binary.BigEndian.Uint16(b[TCPDstPortOffset:]) }
func (b TCP) Seq() Seq             { return Seq(binary.BigEndian.Uint32(b[TCPSeqOffset:])) }
func (b TCP) Ack() Seq             { return Seq(binary.BigEndian.Uint32(b[TCPAckOffset:])) }
func (b TCP) HeaderLen() int       { return int(b[TCPDataOffOffset]>>4) * 4 }
func (b TCP) Flags() uint8         { return b[TCPFlagsOffset] }
func (b TCP) Window() uint16       { return binary.BigEndian.Uint16(b[TCPWindowOffset:]) }
func (b TCP) Checksum() uint16     { return binary.BigEndian.Uint16(b[TCPChecksumOffset:]) }
func (b TCP) Urgent() uint16       { return binary.BigEndian.Uint16(b[TCPUrgentOffset:]) }
func (b TCP) Options() []byte      { return b[TCPMinHeaderLen:b.HeaderLen()] }
func (b TCP) SetSrcPort(v uint16)  { binary.BigEndian.PutUint16(b[TCPSrcPortOffset:], v) }
func (b TCP) SetDstPort(v uint16)  { binary.BigEndian.PutUint16(b[TCPDstPortOffset:], v) }
func (b TCP) SetSeq(v Seq)         { binary.BigEndian.PutUint32(b[TCPSeqOffset:], uint32(v)) }
func (b TCP) SetAck(v Seq)         { binary.BigEndian.PutUint32(b[TCPAckOffset:], uint32(v)) }
func (b TCP) SetWindow(v uint16)   { binary.BigEndian.PutUint16(b[TCPWindowOffset:], v) }
func (b TCP) SetChecksum(v uint16) { binary.BigEndian.PutUint16(b[TCPChecksumOffset:], v) }
func (b TCP) SetFlags(v uint8)     { b[TCPFlagsOffset] = v }
func (b TCP) SetUrgent(v uint16)   { binary.BigEndian.PutUint16(b[TCPUrgentOffset:], v) }

// MoveUrgent keeps the urgent point of a segment whose sequence number
// moved forward by moved (backward: modulo 2^32) at the byte it named.
// The urgent pointer is an offset from the sequence number: left alone,
// it would name a byte moved bytes later (earlier), which the receiver
// takes out of the stream as the urgent byte when it arrives (unless
// SO_OOBINLINE), leaving the real one inline. A point no longer ahead of
// the new sequence number is one the receiver has, or one before the
// segment (a sender marks only segments before it), and one beyond the
// field's reach is named again by the segments before it: the URG flag
// goes, with the pointer. moved must not be 0.
func (b TCP) MoveUrgent(moved uint32) {
	if ptr := uint32(b.Urgent()) - moved; int32(ptr) > 0 && ptr <= 0xffff {
		b.SetUrgent(uint16(ptr))
		return
	}
	b.SetFlags(b.Flags() &^ FlagURG)
	b.SetUrgent(0)
}

// TCP option kinds the engine reads or rewrites.
const (
	OptEOL           = 0
	OptNOP           = 1
	OptMSS           = 2
	OptWindowScale   = 3
	OptSACKPermitted = 4
	OptSACK          = 5
	OptTimestamps    = 8

	optTimestampsLen = 10
	optSACKBlockLen  = 8
)
