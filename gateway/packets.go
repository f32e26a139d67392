package gateway

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/nfq"
	"spliced/splice"
)

// packetHandler serves one NFQUEUE queue. Its scratch Packet makes the
// per-packet path allocation-free; one handler runs on one goroutine.
type packetHandler struct {
	g *Gateway
	p splice.Packet
}

// engineCounters count what the packet path decided, by verdict.
type engineCounters struct {
	verdicts [splice.NumVerdicts]atomic.Uint64
	stripped atomic.Uint64 // payload packets taken over during a splice
	held     atomic.Uint64 // packets held while a splice froze its flow
	// heldDropped: a client's new data during an unsplice's drain
	// dropped beyond what one transition holds (see maxHeldUnsplicing)
	heldDropped atomic.Uint64
	// Path MTU errors about spliced flows (see translatePMTU), by what
	// became of them.
	pmtu [numPMTUResults]atomic.Uint64
}

// What became of a path MTU error the rules queued.
const (
	pmtuTranslated  = iota // sent on in its sender's terms
	pmtuNoFlow             // its flow ended meanwhile: sent on as it came
	pmtuBadChecksum        // dropped: corrupted or forged
	pmtuUnparsed           // not a form the engine translates: sent on as it came
	numPMTUResults
)

var pmtuResultNames = [numPMTUResults]string{"translated", "no_flow", "bad_checksum", "unparsed"}

func (h *packetHandler) handle(np *nfq.Packet) nfq.Decision {
	g := h.g
	p := &h.p
	switch p.Parse(np.Data) {
	case splice.Malformed:
		g.counters.verdicts[splice.DropMalformed].Add(1)
		return nfq.Drop
	case splice.Unsupported:
		if m, ok := splice.ParseICMPError(np.Data); ok {
			return g.translatePMTU(&m, np)
		}
		if splice.IsICMP(np.Data) {
			// The rules queue only path MTU errors, but match more
			// than the engine translates (IPv6 extension headers, the
			// first fragment of an error, a quote short of the
			// sequence number): such an error goes on as it came, as
			// without the rule.
			g.counters.pmtu[pmtuUnparsed].Add(1)
			return nfq.Accept
		}
		g.counters.verdicts[splice.DropUnsupported].Add(1)
		return nfq.Drop
	}
	if np.CsumNotVerified && !checksumValid(p) {
		// Corrupted on the way, or forged: its receiver drops it, and
		// nothing here may learn from it either: the engine would take a
		// corrupted ACK number or timestamp for the flow's (in the
		// unsplice's LearnAck too), a drain would take its payload over
		// and the copy leave with a checksum computed afresh (see
		// release), a garbled option layout would demote a bpf flow.
		// Only packets nothing verified are summed: a NIC's verdict
		// (CHECKSUM_UNNECESSARY) is taken as the kernel takes it. Held
		// packets handled again later (unfreeze, release) came this way.
		g.counters.verdicts[splice.DropMalformed].Add(1)
		return nfq.Drop
	}
	key := p.KeyOf()
	if g.transitions.active.Load() > 0 {
		if tr := g.transitions.get(key); tr != nil {
			return tr.handle(g, p, np, key)
		}
	}
	e, d, ok := g.engine.Lookup(key)
	if !ok {
		// A diverted tuple without a flow: its splice was abandoned or
		// it ended. Passing it unrewritten could corrupt the peer's view;
		// dropping it lets TCP recover. One an earlier daemon left
		// (see orphanTuples) is answered with a reset.
		if g.lost.on.Load() && g.answerLost(p, key) {
			return nfq.Drop
		}
		g.counters.verdicts[splice.DropNoFlow].Add(1)
		return nfq.Drop
	}
	if g.resetFlows.on.Load() && g.answerReset(e, p) {
		return nfq.Drop
	}
	return forward(g, e, d, p, np)
}

// translatePMTU sends on a path MTU error about a spliced flow (see
// splice.ICMPError) in the terms of the sender of the segment it quotes;
// the divert rules queue only errors whose quote, read backwards, is a
// diverted tuple. Without the translation the sender would never learn
// the smaller MTU and its flow would stall. The tuple may be a flow's
// whose splice has not completed or that ended: then its sockets sent
// the quoted segment, or none will need the error, and it goes on as it
// came.
func (g *Gateway) translatePMTU(m *splice.ICMPError, np *nfq.Packet) nfq.Decision {
	e, x, ok := g.engine.Lookup(m.QuotedKey().Reverse())
	if !ok {
		g.counters.pmtu[pmtuNoFlow].Add(1)
		return nfq.Accept
	}
	d := 1 - x // the quote's direction
	if !m.Translate(e, d) {
		g.counters.pmtu[pmtuBadChecksum].Add(1)
		return nfq.Drop
	}
	g.counters.pmtu[pmtuTranslated].Add(1)
	if g.log.Enabled(context.Background(), slog.LevelDebug) {
		g.log.Debug("path MTU error translated", logging.KeyFlow, e.ID, "direction", d.String(), "mtu", m.MTU())
	}
	np.Data = m.Bytes()
	return nfq.AcceptModified
}

// forward runs the engine on a packet of a spliced flow.
func forward(g *Gateway, e *splice.Entry, d splice.Dir, p *splice.Packet, np *nfq.Packet) nfq.Decision {
	for {
		if g.kpath != nil && e.Offloaded() {
			// Promoted to the bpf datapath (see promote).
			if e.CongestionDrop(p, d) {
				// Passed on by the program (rare): dropped here, the
				// flow stays with it.
				return verdictOf(g, splice.DropCE, p, np)
			}
			if dec, done := g.forwardOffloaded(e, np); done {
				return dec
			}
		}
		if d == splice.C2S && e.Watch.Load() && newData(p, e.HighestSeq(splice.C2S)) && e.CheckHeld(p, d) == splice.Forward {
			// Only a segment the engine would forward is the client's
			// next request: a forged one beyond the window (new data by
			// its sequence number alone) would start an unsplice, and
			// end an adopted flow with a reset at both ends.
			if g.unspliceOnData(e, np) {
				return nfq.Hold
			}
		}
		if v, ok := e.TryProcess(p, d, monotime.Now(), !np.CsumNotReady); ok {
			return verdictOf(g, v, p, np)
		}
		// Promoted between the checks: again.
	}
}

func verdictOf(g *Gateway, v splice.Verdict, p *splice.Packet, np *nfq.Packet) nfq.Decision {
	g.counters.verdicts[v].Add(1)
	if v != splice.Forward {
		return nfq.Drop
	}
	np.Data = p.Bytes()
	return nfq.AcceptModified
}

// phase of a flow while it moves between the proxy and the engine.
type phase uint8

const (
	// draining: the flow is diverted, its sockets still run TCP. Pure
	// ACKs reach them; payload is taken over (a copy kept, the packet
	// delivered without it) so the sockets only ever drain.
	phaseDraining phase = iota
	// frozen: the sockets are being captured; every packet is held.
	phaseFrozen
	// spliced: the engine owns the flow.
	phaseSpliced
	// aborted: the splice was abandoned, or the flow was unspliced;
	// packets reach the sockets unchanged until the divert entries are
	// gone.
	phaseAborted
	// unsplicing: the engine still forwards pure ACKs and
	// retransmissions; packets with new data are held until both ends
	// acknowledged everything forwarded to them.
	phaseUnsplicing
	// ended: an unsplice was abandoned and the flow is being reset
	// (abandonUnsplice): every packet is dropped.
	phaseEnded
)

// transition is a flow being spliced.
type transition struct {
	keys  [2]splice.Key // input tuples: from the client, from the server
	queue uint16        // index of the queue the flow is diverted to

	mu    sync.Mutex
	phase phase
	entry *splice.Entry
	taken [2][][]byte // payload packets taken over while draining, per direction
	held  []*nfq.Packet
	// heldBytes: the data of the packets held while unsplicing (see
	// maxHeldUnsplicing).
	heldBytes int
	// rstSeen: a RST went to a socket while the sockets drained; the
	// drain looks whether it reset one (drainStep).
	rstSeen bool
	// watchClient: the proxy reads every client request (HTTP); client
	// data that arrives while draining is the next request, which the
	// proxy must read itself: it reaches the socket, and the splice is
	// abandoned.
	watchClient bool
	clientData  bool
	// pending: client data that came while the splice completed, for a
	// watched flow: the next request, held for the proxy (see handOver).
	pending []*nfq.Packet
	// done: the transition left the table; packets that still found it
	// go the table's way.
	done     bool
	takenLen [2]int
	// What bounds the acknowledgments of payload taken over (see
	// ackFloor), by direction of the packets that carry them: the
	// unacknowledged bytes of the socket they arrive at when the splice
	// began, and the bytes the drain wrote to it since. The splice's
	// goroutine owns them.
	outq0, written [2]int
	// progress wakes the goroutine that drains the flow when the queue's
	// reader handled one of its packets (an ACK the drain waits for may
	// have come): buffered, one pending wake at most.
	progress chan struct{}
}

// newTransition returns a transition of the flow with these input tuples
// (from the client, from the server) on the queue with this index.
func newTransition(keys [2]splice.Key, queue uint16, phase phase, entry *splice.Entry) *transition {
	return &transition{keys: keys, queue: queue, phase: phase, entry: entry, progress: make(chan struct{}, 1)}
}

// wait returns when the queue's reader handled a packet of the flow
// (true) or after d (false), whichever comes first; t is the caller's
// timer, stopped on return.
func (tr *transition) wait(t *time.Timer, d time.Duration) bool {
	t.Reset(d)
	defer t.Stop()
	select {
	case <-tr.progress:
		return true
	case <-t.C:
		return false
	}
}

func (tr *transition) dir(k splice.Key) splice.Dir {
	if k == tr.keys[splice.C2S] {
		return splice.C2S
	}
	return splice.S2C
}

// What one unsplice holds of the new data (the client's next request)
// that comes while its drain waits for the ends' acknowledgments. A held
// packet stays in the kernel's queue (kernel.queue_len, for every flow of
// the queue) and its copy in the daemon: a client that sends a window's
// worth of data with its next request and withholds its acknowledgments
// had the gateway hold thousands of packets, up to whole 64 KiB GSO
// packets, for drain_timeout, and a few such clients filled a queue, whose
// every other spliced flow's packets the kernel then dropped. Past the
// bounds the data is dropped, its ACK learned; the client sends it again
// to the rebuilt socket, as after any loss.
const (
	maxHeldUnsplicing      = 128
	maxHeldBytesUnsplicing = 1 << 20
)

// unsplicePending turns a splice whose client sent its next request as
// the splice completed into that request's unsplice (tr.mu held): the
// request's packets (pending) are the first it holds, and count against
// its bounds. Uncounted, the unsplice held up to another 1 MiB beyond
// them, however much a client sent while the splice completed.
func (tr *transition) unsplicePending() {
	tr.phase = phaseUnsplicing
	tr.held, tr.pending = tr.pending, nil
	tr.heldBytes = 0
	for _, np := range tr.held {
		tr.heldBytes += len(np.Data)
	}
}

// handle decides about a packet of a flow in transition.
func (tr *transition) handle(g *Gateway, p *splice.Packet, np *nfq.Packet, key splice.Key) nfq.Decision {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	d := tr.decide(g, p, np, key)
	select {
	case tr.progress <- struct{}{}:
		if np != nil {
			np.Readied() // the drain may wait for it
		}
	default:
	}
	return d
}

// decide is handle's decision (tr.mu held).
func (tr *transition) decide(g *Gateway, p *splice.Packet, np *nfq.Packet, key splice.Key) nfq.Decision {
	switch tr.phase {
	case phaseFrozen:
		g.counters.held.Add(1)
		tr.held = append(tr.held, np.Detach())
		return nfq.Hold
	case phaseSpliced:
		if !tr.done && tr.early(p) {
			g.counters.held.Add(1)
			tr.pending = append(tr.pending, np.Detach())
			return nfq.Hold
		}
		return forward(g, tr.entry, tr.dir(key), p, np)
	case phaseAborted:
		return nfq.Accept
	case phaseEnded:
		return nfq.Drop
	case phaseUnsplicing:
		d := tr.dir(key)
		if newData(p, tr.entry.HighestSeq(d)) {
			// Held for the rebuilt socket; what it acknowledges counts
			// for the drain (the next request carries the client's ACK
			// of the response: waiting for another one would wait for a
			// retransmission). One that fails the engine's checks is
			// dropped, as the engine drops it: its ACK would end the
			// drain early.
			if v := tr.entry.LearnAck(p, d); v != splice.Forward {
				g.counters.verdicts[v].Add(1)
				return nfq.Drop
			}
			if len(tr.held) >= maxHeldUnsplicing || tr.heldBytes+len(np.Data) > maxHeldBytesUnsplicing {
				// Its ACK is learned; its data comes again, to the
				// rebuilt socket.
				g.counters.heldDropped.Add(1)
				return nfq.Drop
			}
			g.counters.held.Add(1)
			tr.heldBytes += len(np.Data)
			tr.held = append(tr.held, np.Detach())
			return nfq.Hold
		}
		return forward(g, tr.entry, d, p, np)
	}
	return tr.drain(g, p, np, key)
}

// drain handles a packet while the sockets drain (tr.mu held).
// A packet with a wrong checksum never gets here (handle drops it).
func (tr *transition) drain(g *Gateway, p *splice.Packet, np *nfq.Packet, key splice.Key) nfq.Decision {
	t := p.TCP()
	if t.Flags()&splice.FlagRST != 0 {
		// The socket judges it (RFC 5961 3.2: only a RST at exactly its
		// rcv_nxt resets it; any other draws a challenge ACK), and the
		// drain gives up the splice when a socket was reset (drainStep).
		// Giving up for any RST let a blind attacker keep every flow
		// from being spliced.
		tr.rstSeen = true
		return nfq.Accept
	}
	if p.PayloadLen() == 0 && t.Flags()&splice.FlagFIN == 0 {
		return nfq.Accept // ACK information for the socket
	}
	d := tr.dir(key)
	if tr.watchClient && d == splice.C2S {
		tr.clientData = true
		return nfq.Accept
	}
	tr.taken[d] = append(tr.taken[d], append([]byte(nil), p.Bytes()...))
	tr.takenLen[d] += p.PayloadLen()
	g.counters.stripped.Add(1)
	ack := stripPayload(p)
	if ack == nil {
		return nfq.Drop
	}
	np.Data = ack
	return nfq.AcceptModified
}

// transitions indexes flows in transition by both input tuples. The packet
// path looks here only while at least one exists.
type transitions struct {
	active atomic.Int32
	mu     sync.RWMutex
	m      map[splice.Key]*transition
}

func (ts *transitions) get(k splice.Key) *transition {
	ts.mu.RLock()
	defer ts.mu.RUnlock()
	return ts.m[k]
}

func (ts *transitions) add(tr *transition) {
	ts.mu.Lock()
	if ts.m == nil {
		ts.m = map[splice.Key]*transition{}
	}
	ts.m[tr.keys[0]] = tr
	ts.m[tr.keys[1]] = tr
	ts.mu.Unlock()
	ts.active.Add(1)
}

// remove takes tr out of the index. A later transition of the same flow
// may hold its tuples already: an unspliced flow's passthrough, retired
// (retirePassthrough) just as the proxy splices the flow again, is removed
// after the new splice was added. Its tuples stay the new one's; removed,
// they would send the splice's packets to the engine, which has no entry
// for the flow and drops them, and the drain would wait for ACKs that never
// reach the sockets.
func (ts *transitions) remove(tr *transition) {
	ts.mu.Lock()
	for _, k := range tr.keys {
		if ts.m[k] == tr {
			delete(ts.m, k)
		}
	}
	if len(ts.m) == 0 {
		// A map keeps the space of its largest size: after a burst of
		// splices (thousands at once) it would hold it for ever.
		ts.m = nil
	}
	ts.mu.Unlock()
	ts.active.Add(-1)
}

// checksumValid reports whether a packet's complete TCP checksum (not
// a CHECKSUM_PARTIAL one) is right.
func checksumValid(p *splice.Packet) bool {
	return splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()) == 0
}

// newData reports whether a packet carries a byte or a FIN beyond sent,
// the end of what the engine forwarded in its direction.
func newData(p *splice.Packet, sent splice.Seq) bool {
	n := p.SegmentLen()
	return n > 0 && sent.LessThan(p.TCP().Seq().Add(n))
}

// early reports whether a packet is client data of a watched flow that
// arrived while its splice completes (tr.mu held): the proxy must read it.
func (tr *transition) early(p *splice.Packet) bool {
	return tr.watchClient && tr.dir(p.KeyOf()) == splice.C2S && newData(p, tr.entry.HighestSeq(splice.C2S)) &&
		tr.entry.CheckHeld(p, splice.C2S) == splice.Forward
}
