package gateway

import (
	"encoding/binary"
	"fmt"

	"spliced/logging"
	"spliced/splice"
)

// resetPackets builds the resets that end a spliced flow at both ends:
// when spliced stops, and when it gives up an idle flow. Without them the
// ends would find out only through their own timeouts: once the flow's
// divert entries are gone, its packets pass unrewritten and the ends
// refuse them (see the TSval jump in package splice).
//
// The receiver of direction d gets resets with the source of d's output
// tuple (the reverse of the other direction's input tuple), at the
// sequence number it acknowledged last and, if more was sent, at the end
// of what was sent: RFC 5961 makes a receiver reset only for a RST at
// exactly its rcv_nxt, which is one of the two unless data is lost in
// flight; otherwise it answers with a challenge ACK and its own timeout
// ends the connection.
func resetPackets(f splice.Flow, keys [2]splice.Key) [][]byte {
	var out [][]byte
	for d := splice.C2S; d <= splice.S2C; d++ {
		info := f.Info(d)
		out4 := keys[1-d].Reverse() // d's output tuple
		seqs := []splice.Seq{info.HighestAck}
		if info.HighestSeq != info.HighestAck {
			seqs = append(seqs, info.HighestSeq)
		}
		for _, s := range seqs {
			out = append(out, rstPacket(out4, uint32(s)+info.SeqOffset))
		}
	}
	return out
}

// rstPacket builds an IPv4 or IPv6 packet with tuple k holding a bare
// RST.
func rstPacket(k splice.Key, seq uint32) []byte {
	src, dst := k.Src, k.Dst
	v4 := k.IsIPv4()
	var b []byte
	var ipSrc, ipDst []byte
	if v4 {
		b = make([]byte, splice.IPv4MinHeaderLen+splice.TCPMinHeaderLen)
		b[splice.IPv4VersionIHLOffset] = 0x45
		binary.BigEndian.PutUint16(b[splice.IPv4TotalLenOffset:], uint16(len(b)))
		binary.BigEndian.PutUint16(b[splice.IPv4FlagsFragOffset:], 0x4000) // DF
		b[8] = 64                                                          // TTL
		b[splice.IPv4ProtocolOffset] = 6
		copy(b[splice.IPv4SrcOffset:], src[12:])
		copy(b[splice.IPv4DstOffset:], dst[12:])
		splice.IPv4(b).UpdateChecksum()
		ipSrc, ipDst = src[12:], dst[12:]
	} else {
		b = make([]byte, splice.IPv6HeaderLen+splice.TCPMinHeaderLen)
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[splice.IPv6PayloadLenOffset:], splice.TCPMinHeaderLen)
		b[splice.IPv6NextHeaderOffset] = 6
		b[7] = 64 // hop limit
		copy(b[splice.IPv6SrcOffset:], src[:])
		copy(b[splice.IPv6DstOffset:], dst[:])
		ipSrc, ipDst = src[:], dst[:]
	}
	t := splice.TCP(b[len(b)-splice.TCPMinHeaderLen:])
	t.SetSrcPort(k.SrcPort)
	t.SetDstPort(k.DstPort)
	t.SetSeq(splice.Seq(seq))
	t[splice.TCPDataOffOffset] = splice.TCPMinHeaderLen / 4 << 4
	t.SetFlags(splice.FlagRST)
	t.SetChecksum(splice.TCPChecksum(ipSrc, ipDst, t))
	return b
}

// resetSpliced sends the resets of flows to both of their ends, and
// returns how many packets went out.
func (g *Gateway) resetSpliced(flows []*splicedFlow) int {
	sent := 0
	for _, sf := range flows {
		for _, b := range resetPackets(sf.entry.Snapshot(), sf.keys()) {
			var p splice.Packet
			if r := p.Parse(b); r != splice.OK {
				g.log.Error("build reset", logging.KeyFlow, sf.flow.ID, logging.Err(fmt.Errorf("%v", r)))
				continue
			}
			if err := g.inject.send(&p); err != nil {
				g.injectErrors.Add(1)
				g.log.Debug("send reset", logging.KeyFlow, sf.flow.ID, logging.Err(err))
				continue
			}
			sent++
		}
	}
	return sent
}
