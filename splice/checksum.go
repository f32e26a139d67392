package splice

import (
	"encoding/binary"
	"math/bits"
)

// Sum adds b to a one's-complement running sum (RFC 1071) and returns the
// new sum, unfolded. It reads b as big-endian 64-bit words: since 2^16 is 1
// modulo 0xffff, their sum folds to the same 16-bit one's-complement sum as
// 16-bit words would, at a quarter of the additions. b must start at an
// even offset of the checksummed data; an odd final byte is padded with
// zero, as RFC 1071 says.
func Sum(b []byte, initial uint64) uint64 {
	s, carry := initial, uint64(0)
	for len(b) >= 32 {
		s, carry = bits.Add64(s, binary.BigEndian.Uint64(b), carry)
		s, carry = bits.Add64(s, binary.BigEndian.Uint64(b[8:]), carry)
		s, carry = bits.Add64(s, binary.BigEndian.Uint64(b[16:]), carry)
		s, carry = bits.Add64(s, binary.BigEndian.Uint64(b[24:]), carry)
		b = b[32:]
	}
	for len(b) >= 8 {
		s, carry = bits.Add64(s, binary.BigEndian.Uint64(b), carry)
		b = b[8:]
	}
	if len(b) >= 4 {
		s, carry = bits.Add64(s, uint64(binary.BigEndian.Uint32(b)), carry)
		b = b[4:]
	}
	if len(b) >= 2 {
		s, carry = bits.Add64(s, uint64(binary.BigEndian.Uint16(b)), carry)
		b = b[2:]
	}
	if len(b) == 1 {
		s, carry = bits.Add64(s, uint64(b[0])<<8, carry)
	}
	s, carry = bits.Add64(s, carry, 0)
	return s + carry // at most one more end-around carry
}

// Fold reduces a running sum to the 16-bit one's-complement sum.
func Fold(s uint64) uint16 {
	s = (s >> 32) + (s & 0xffffffff)
	s = (s >> 32) + (s & 0xffffffff)
	s = (s >> 16) + (s & 0xffff)
	s = (s >> 16) + (s & 0xffff)
	return uint16(s)
}

// UpdateChecksum is RFC 1624's incremental update, equation 3:
//
//	HC' = ~(~HC + ~m + m')
//
// where HC is the old checksum field, m the one's-complement sum of the
// old contents of the changed words and m' of their new contents. Unlike
// equation 2 it never yields -0 for a non-zero result. Its one inexact
// case is data whose words are all zero (the result is 0x0000 where a full
// computation gives 0xffff); a TCP checksum cannot meet it, since the
// pseudo-header always holds the protocol number 6.
func UpdateChecksum(hc, oldSum, newSum uint16) uint16 {
	return ^Fold(uint64(^hc) + uint64(^oldSum) + uint64(newSum))
}

// pseudoHeaderSum is the sum of the TCP pseudo-header (RFC 793, RFC 8200
// section 8.1): both addresses, the protocol and the TCP length.
func pseudoHeaderSum(src, dst []byte, tcpLen int) uint64 {
	s := Sum(src, 0)
	s = Sum(dst, s)
	return s + 6 + uint64(tcpLen)
}

// TCPChecksum computes a TCP segment's checksum from scratch; the
// segment's own checksum field must be zero or is counted.
func TCPChecksum(src, dst []byte, segment []byte) uint16 {
	return ^Fold(Sum(segment, pseudoHeaderSum(src, dst, len(segment))))
}
