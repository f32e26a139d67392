package gateway

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

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

// resetFlows are the spliced flows whose ends were sent resets while
// the daemon stops (resetSpliced), by engine flow id: a reset may miss,
// and the end that gets one at a sequence number other than its rcv_nxt
// answers with a challenge ACK (RFC 5961), or it goes on sending. Seen
// under load (TestLabStopDuringSplices under -race, a lost ACK left the
// flow's record behind): with no daemon left to answer, both ends waited
// for their own timeouts, for ever for an end that only reads. Until the
// table goes, the packet path answers such a packet with a reset at the
// very sequence number it acknowledges (answerReset).
type resetFlows struct {
	on       atomic.Bool // any flow was reset: the packet path looks
	mu       sync.Mutex
	ids      map[uint64]bool
	answered atomic.Uint64
	last     atomic.Int64 // when a packet was last answered (UnixNano)
}

// resetToEnd resets flows, as the daemon stops, and has the packet path
// answer their packets from then on (see answerReset). Those on the bpf
// datapath leave the program: it would forward a challenge ACK to the
// other end, whose answer is nothing; their packets come to the queue
// now, and the engine's entry, which a promoted flow keeps, finds them.
// It returns how many packets went out.
func (g *Gateway) resetToEnd(flows []*splicedFlow) int {
	g.resetFlows.add(flows)
	sent := g.resetSpliced(flows)
	if k := g.kpath; k != nil {
		for _, sf := range flows {
			if sf.entry.Offloaded() {
				k.dp.DeleteFlow(sf.entry.ID, sf.entry.Keys)
			}
		}
	}
	return sent
}

func (r *resetFlows) add(flows []*splicedFlow) {
	r.mu.Lock()
	if r.ids == nil {
		r.ids = map[uint64]bool{}
	}
	for _, sf := range flows {
		r.ids[sf.entry.ID] = true
	}
	r.mu.Unlock()
	r.on.Store(true)
}

func (r *resetFlows) has(id uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ids[id]
}

// answerReset reports whether p, a packet of the spliced flow e, belongs
// to a flow whose ends were reset; then it sends p's sender a reset at
// the sequence number p acknowledges, its rcv_nxt, which it accepts
// (RFC 5961 3.2), and p must be dropped. It is not on the hot path: the
// caller checks resetFlows.on first.
func (g *Gateway) answerReset(e *splice.Entry, p *splice.Packet) bool {
	if !g.resetFlows.has(e.ID) {
		return false
	}
	if g.resetSender(p) {
		g.resetFlows.answered.Add(1)
		g.resetFlows.last.Store(time.Now().UnixNano())
	}
	return true
}

// resetSender sends p's sender a reset at the sequence number p
// acknowledges, its rcv_nxt, which it accepts (RFC 5961 3.2), and reports
// whether it went out. A packet that is a reset, or acknowledges nothing,
// is not answered.
func (g *Gateway) resetSender(p *splice.Packet) bool {
	t := p.TCP()
	if t.Flags()&(splice.FlagRST|splice.FlagACK) != splice.FlagACK {
		return false // its end is resetting itself, or it acknowledges nothing
	}
	var rst splice.Packet
	return rst.Parse(splice.AppendBareSegment(nil, p.KeyOf().Reverse(), t.Ack(), splice.FlagRST, 64)) == splice.OK && g.inject.send(&rst) == nil
}

// awaitResetAnswers gives the ends of the flows just reset time to
// answer a reset that missed (see resetFlows): at least resetAnswerMin,
// until no packet needed an answer for resetAnswerQuiet, at most
// resetAnswerMax.
func (g *Gateway) awaitResetAnswers() {
	start := time.Now()
	for now := start; now.Sub(start) < resetAnswerMax; now = time.Now() {
		last := time.Unix(0, g.resetFlows.last.Load())
		if now.Sub(start) >= resetAnswerMin && now.Sub(last) >= resetAnswerQuiet {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A reset that missed comes back as a challenge ACK after about a round
// trip to its end; under load a queue's backlog comes first.
const (
	resetAnswerMin   = 100 * time.Millisecond
	resetAnswerQuiet = 50 * time.Millisecond
	resetAnswerMax   = time.Second
)
