package gateway

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"spliced/logging"
	"spliced/splice"
)

// Flows an earlier daemon spliced that nobody can continue. A daemon
// killed (kill -9, a crash) leaves its table and the divert entries of
// every flow it diverted. The next one adopts the flows the bpf
// datapath's pins or the nfqueue datapath's record hold; the others have
// no state anywhere: a flow being spliced or unspliced at the kill, one
// the program had handed back to the Go engine, every one where no
// record was kept (no bpffs). Their entries used to be left out of the
// new table, and their packets then went on unrewritten. A NAT flow's
// server leg ends at the gateway's own address, whose stack answers with
// resets; a transparent flow keeps the ends' addresses, so each end got
// the other's packets at sequence numbers of another connection and
// answered with duplicate ACKs, for ever: in TestLabKillLostFlowsReset
// both ends of 4 of 4 such flows waited until their own deadline (58 s
// after the restart; without one, TCP's retransmission timeout, about 15
// minutes, or never for an end with nothing to send).
//
// Now the new table keeps those tuples diverted for lostFor, and the
// packet path answers a packet on one of them with a reset at the
// sequence number it acknowledges: its sender's rcv_nxt, which it
// accepts (RFC 5961 3.2). An end with nothing to send sends no packet to
// answer: each tuple's sender is sent a probe, an ACK outside its
// window, which it answers with an ACK of its own (RFC 793; Linux limits
// such answers to one per tcp_invalid_ratelimit, half a second, hence a
// second probe). A SYN on such a tuple (a new connection from the same
// port) ends its entry, and its reverse's (a transparent flow's server
// leg, which the new connection's upstream takes again); its
// retransmission goes the usual way.
type orphanTuples struct {
	on       atomic.Bool // tuples are kept: the packet path looks
	mu       sync.Mutex
	keys     map[splice.Key]bool // true once a packet was answered
	forget   []splice.Key        // tuples whose entries go at the reaper's next round
	since    time.Time
	probed   int // probe rounds sent
	answered atomic.Uint64
}

// lostFor is how long the tuples of lost flows stay diverted: a sender
// retransmits at doubling intervals (0.2, 0.4, ... 51 s: 102 s for the
// first nine), and the probes are answered at once.
const lostFor = 2 * time.Minute

// lostProbeAgain is when the second probe goes out: past the rate limit
// of an end that answered another packet just before the first.
const lostProbeAgain = time.Second

// findLost records the tuples of the table installed now (an earlier
// daemon's) that belong to no flow of this one: called by the start's
// install, while no divert entry is added or removed (Diverter.Exclusive),
// after the adoptions.
func (g *Gateway) findLost() {
	old, err := g.diverter.Tuples()
	if err != nil {
		g.log.Warn("read the divert entries an earlier spliced left; flows it left that nobody continues are not reset", logging.Err(err))
		return
	}
	if len(old) == 0 {
		return
	}
	live := map[splice.Key]bool{}
	for _, keys := range g.liveDivert() {
		for _, k := range keys {
			live[k] = true
		}
	}
	lost := map[splice.Key]bool{}
	for _, k := range old {
		if !live[k] {
			lost[k] = false
		}
	}
	if len(lost) == 0 {
		return
	}
	g.lost.mu.Lock()
	g.lost.keys, g.lost.since = lost, time.Now()
	g.lost.mu.Unlock()
	g.lost.on.Store(true)
	g.log.Warn("flows an earlier spliced diverted and nobody can continue (in a splice or unsplice at its end, or of which no record was kept): their ends are reset",
		"tuples", len(lost))
}

// lostDivert adds the lost tuples to out (see liveDivert), on the first
// queue: their packets need no order.
func (g *Gateway) lostDivert(add func(q uint16, k splice.Key)) {
	if !g.lost.on.Load() {
		return
	}
	g.lost.mu.Lock()
	defer g.lost.mu.Unlock()
	for k := range g.lost.keys {
		add(0, k)
	}
}

// probeLost sends each lost tuple's sender that has not been answered
// yet an ACK outside its window, from its peer's address, which it
// answers with an ACK (see orphanTuples).
func (g *Gateway) probeLost() {
	g.lost.mu.Lock()
	var keys []splice.Key
	for k, answered := range g.lost.keys {
		if !answered {
			keys = append(keys, k)
		}
	}
	g.lost.probed++
	g.lost.mu.Unlock()
	sent := 0
	for _, k := range keys {
		// A random sequence number, which lands in the receiver's
		// window with a chance of its window in 2^32: then the
		// probe is a pure ACK, which changes nothing either.
		seq := splice.Seq(rand.Uint32())
		b := splice.AppendBareSegment(nil, k.Reverse(), seq, splice.FlagACK, 64)
		var p splice.Packet
		if p.Parse(b) != splice.OK {
			continue
		}
		t := p.TCP()
		t.SetAck(splice.Seq(rand.Uint32()))
		t.SetChecksum(0)
		t.SetChecksum(splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()))
		if g.inject.send(&p) == nil {
			sent++
		}
	}
	if len(keys) > 0 {
		g.log.Debug("probed the ends of lost flows", "tuples", len(keys), "sent", sent)
	}
}

// isLost reports whether k is a lost tuple still diverted.
func (g *Gateway) isLost(k splice.Key) bool {
	g.lost.mu.Lock()
	defer g.lost.mu.Unlock()
	_, ok := g.lost.keys[k]
	return ok
}

// answerLost reports whether p, a packet of no flow of this daemon's,
// is on a lost tuple; then it answers it (see orphanTuples), and p must be
// dropped.
func (g *Gateway) answerLost(p *splice.Packet, key splice.Key) bool {
	g.lost.mu.Lock()
	answered, ok := g.lost.keys[key]
	if !ok {
		g.lost.mu.Unlock()
		return false
	}
	flags := p.TCP().Flags()
	if flags&(splice.FlagSYN|splice.FlagACK) == splice.FlagSYN {
		// A new connection from the tuple's port: its end has
		// forgotten the old one. Its reverse goes too where it is lost:
		// a transparent flow's server leg, which the new connection's
		// upstream socket takes again (the client's address and port).
		// Kept, the server's SYN-ACK to that socket was diverted and
		// answered with a reset, and the connection never opened.
		for _, k := range []splice.Key{key, key.Reverse()} {
			if _, ok := g.lost.keys[k]; ok {
				delete(g.lost.keys, k)
				g.lost.forget = append(g.lost.forget, k)
			}
		}
		g.lost.mu.Unlock()
		return true
	}
	if !answered {
		g.lost.keys[key] = true
	}
	g.lost.mu.Unlock()
	if g.resetSender(p) {
		g.lost.answered.Add(1)
	}
	return true
}

// reapLost removes the entries of the tuples answered with a SYN, sends
// the second probe, and once lostFor has passed removes every lost
// tuple's entry. The reaper calls it.
func (g *Gateway) reapLost(now time.Time) {
	if !g.lost.on.Load() {
		return
	}
	g.lost.mu.Lock()
	forget := g.lost.forget
	g.lost.forget = nil
	probe := g.lost.probed == 1 && now.Sub(g.lost.since) >= lostProbeAgain
	expired := now.Sub(g.lost.since) >= lostFor
	if expired {
		for k := range g.lost.keys {
			forget = append(forget, k)
		}
		g.lost.keys = nil
		g.lost.on.Store(false)
	}
	g.lost.mu.Unlock()
	if probe {
		g.probeLost()
	}
	if len(forget) > 0 {
		if err := g.diverter.Delete(0, forget...); err != nil {
			g.log.Error("remove the divert entries of lost flows", "tuples", len(forget), logging.Err(err))
		}
	}
	if expired {
		g.log.Info("no longer diverting the tuples of lost flows", "resets_sent", g.lost.answered.Load())
	}
}
