package splice

import "encoding/binary"

// AppendBareSegment appends to b an IPv4 or IPv6 packet with tuple k that
// carries a TCP header and nothing else: sequence number seq, the given
// flags, acknowledgment number and window 0, no options, checksums
// complete. ttl is the IPv4 TTL or IPv6 hop limit; IPv4 packets have
// don't-fragment set. The gateway builds its resets and divert commands
// with it.
func AppendBareSegment(b []byte, k Key, seq Seq, flags uint8, ttl uint8) []byte {
	start := len(b)
	src, dst := k.Src[:], k.Dst[:]
	if k.IsIPv4() {
		src, dst = src[12:], dst[12:]
		b = append(b, make([]byte, IPv4MinHeaderLen)...)
		h := b[start:]
		h[IPv4VersionIHLOffset] = 0x45
		binary.BigEndian.PutUint16(h[IPv4TotalLenOffset:], IPv4MinHeaderLen+TCPMinHeaderLen)
		binary.BigEndian.PutUint16(h[IPv4FlagsFragOffset:], 0x4000) // DF
		h[8] = ttl
		h[IPv4ProtocolOffset] = 6
		copy(h[IPv4SrcOffset:], src)
		copy(h[IPv4DstOffset:], dst)
		IPv4(h).UpdateChecksum()
	} else {
		b = append(b, make([]byte, IPv6HeaderLen)...)
		h := b[start:]
		h[0] = 0x60
		binary.BigEndian.PutUint16(h[IPv6PayloadLenOffset:], TCPMinHeaderLen)
		h[IPv6NextHeaderOffset] = 6
		h[7] = ttl // hop limit
		copy(h[IPv6SrcOffset:], src)
		copy(h[IPv6DstOffset:], dst)
	}
	tcp := len(b)
	b = append(b, make([]byte, TCPMinHeaderLen)...)
	t := TCP(b[tcp:])
	t.SetSrcPort(k.SrcPort)
	t.SetDstPort(k.DstPort)
	t.SetSeq(seq)
	t[TCPDataOffOffset] = TCPMinHeaderLen / 4 << 4
	t.SetFlags(flags)
	t.SetChecksum(TCPChecksum(src, dst, t))
	return b
}
