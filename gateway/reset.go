package gateway

import (
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
			out = append(out, splice.AppendBareSegment(nil, out4, splice.Seq(uint32(s)+info.SeqOffset), splice.FlagRST, 64))
		}
	}
	return out
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
