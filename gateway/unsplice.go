package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"spliced/api"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
	"spliced/tcprepair"
)

// Unsplice gives a spliced flow back to its proxy (paper 3.4). Steps:
//
//  1. drain: the engine keeps forwarding pure ACKs and retransmissions;
//     packets with new data, either way, are held; the flow is drained
//     once each end acknowledged everything forwarded to it (without
//     this, a segment lost in flight would never be resent: the rebuilt
//     socket would believe it acknowledged);
//  2. freeze: every packet is held; two sockets are rebuilt with
//     TCP_REPAIR from the engine's tracked state and leave repair mode
//     (they continue the conntrack entries the splice kept: see
//     conntrackCleaner);
//  3. release the held packets to the sockets, their ACKs raised to what
//     the sockets sent (a fresh socket drops a segment acknowledging less
//     than its snd_una), and hand the sockets to the proxy.
//
// The divert entries stay while packets of the flow may be queued: the
// queue passes them unchanged, and deleting an entry while data flows
// lets new packets overtake held ones. They go once the queue is empty
// (retirePassthrough).
// On error the flow stays spliced and nothing was lost.
//
// Like Splice, it runs on a transition worker.
func (g *Gateway) Unsplice(ctx context.Context, f *proxy.Flow) error {
	start := time.Now()
	done := make(chan error, 1)
	g.runTransition(func() { done <- g.unsplice(ctx, start, f) })
	return <-done
}

func (g *Gateway) unsplice(ctx context.Context, start time.Time, f *proxy.Flow) error {
	g.splicedMu.Lock()
	sf := g.spliced[f.ID]
	g.splicedMu.Unlock()
	if sf == nil {
		return fmt.Errorf("flow %d is not spliced", f.ID)
	}
	if sf.adopted {
		return errAdopted(f.ID)
	}
	if !f.CanResume() {
		return fmt.Errorf("flow %d: its proxy (%s) cannot take it back", f.ID, f.Proxy)
	}
	sf.entry.Pin() // no promotion from here on (see Entry.Pin)
	if err := g.reclaim(sf.entry); err != nil {
		sf.entry.Unpin()
		return err
	}
	if snap := sf.entry.Snapshot(); snap.Finished() || snap.FINSeen(splice.C2S) || snap.FINSeen(splice.S2C) {
		sf.entry.Unpin()
		return fmt.Errorf("flow %d is closing (a FIN or RST went through); it ends spliced", f.ID)
	}
	sf.entry.Watch.Store(false)
	tr := newTransition(sf.keys(), sf.queue, phaseUnsplicing, sf.entry)
	f.SetState(proxy.StateSplicing)
	g.transitions.add(tr)
	return g.completeUnsplice(ctx, sf, tr, start)
}

// unspliceOnData starts the unsplice of a watched flow whose client sent
// new data (the next request): the packet is held, and the flow is given
// back to its proxy in the background. It reports false when the flow is
// not the gateway's to unsplice (the packet is then forwarded).
func (g *Gateway) unspliceOnData(e *splice.Entry, np *nfq.Packet) bool {
	e.Pin() // no promotion from here on (see Entry.Pin)
	if err := g.reclaim(e); err != nil {
		e.Unpin()
		g.log.Warn("unsplice on client data", logging.KeyFlow, e.ID, logging.Err(err))
		return false
	}
	var p splice.Packet
	parsed := p.Parse(np.Data) == splice.OK
	// A FIN went through spliced (the backend closed, in the middle of
	// its response or after it): the flow is ending, and a rebuilt
	// socket cannot take it back (it would hold the FIN's sequence
	// number as received without its end of stream: the proxy would
	// wait on it for the rest of the response for upstream_timeout, or
	// for ever, and the client with it). The client's own FIN goes
	// through too, and the flow ends spliced; its data (a next request,
	// which its client can read no answer to) ends the flow with
	// resets, as the closed backend would answer it.
	snap := e.Snapshot()
	closing := snap.FINSeen(splice.S2C) || snap.FINSeen(splice.C2S)
	if closing && parsed && p.PayloadLen() == 0 {
		e.Unpin()
		return false
	}
	if !e.Watch.CompareAndSwap(true, false) {
		e.Unpin()
		return false
	}
	g.splicedMu.Lock()
	sf := g.spliced[e.ID]
	g.splicedMu.Unlock()
	adopted := sf != nil && sf.adopted && sf.flow.UnspliceOnClientData.Load()
	if sf == nil || !sf.flow.CanResume() && !adopted && !closing {
		e.Unpin()
		return false
	}
	tr := newTransition(sf.keys(), sf.queue, phaseUnsplicing, sf.entry)
	if parsed {
		e.LearnAck(&p, splice.C2S) // see transition.handle
	}
	g.counters.held.Add(1)
	tr.heldBytes += len(np.Data)
	tr.held = append(tr.held, np.Detach())
	sf.flow.SetState(proxy.StateSplicing)
	g.transitions.add(tr)
	np.Readied() // the goroutine started below
	if adopted {
		// No proxy can route the client's next request: the flow ends,
		// as when an unsplice fails (abandonUnsplice).
		g.runTransition(func() {
			err := g.abandonUnsplice(sf, tr, errAdopted(sf.flow.ID))
			g.log.Warn("next request on an adopted flow", logging.KeyFlow, sf.flow.ID, logging.Err(err))
		})
		return true
	}
	if closing {
		g.runTransition(func() {
			err := g.abandonUnsplice(sf, tr, errors.New("a FIN went through spliced; the flow cannot be handed back"))
			g.log.Info("client data after the flow's FIN", logging.KeyFlow, sf.flow.ID, logging.Err(err))
		})
		return true
	}
	start := time.Now() // the client's next data came
	g.runTransition(func() {
		if err := g.completeUnsplice(context.Background(), sf, tr, start); err != nil {
			g.log.Warn("unsplice abandoned", logging.KeyFlow, sf.flow.ID, logging.Err(err))
		}
	})
	return true
}

// completeUnsplice runs an unsplice whose transition is registered: drain,
// rebuild, release, resume.
func (g *Gateway) completeUnsplice(ctx context.Context, sf *splicedFlow, tr *transition, start time.Time) error {
	f := sf.flow
	f.UnspliceStarted.Store(monotime.Of(start))
	sw := newStopwatch(start)
	if err := g.unspliceDrain(ctx, tr, start.Add(g.drainTimeout(f.Service))); err != nil {
		return g.abandonUnsplice(sf, tr, err)
	}
	sw.lap(stepUnspliceDrain)
	tr.mu.Lock()
	tr.phase = phaseFrozen
	tr.mu.Unlock()
	g.queues.Barrier(int(tr.queue)) // what the engine forwarded before the freeze is out
	sw.lap(stepUnspliceBarrier)
	snap := sf.entry.Snapshot()
	params := sf.params()
	client, server := rebuiltConns(&params, snap, monotime.Since(sf.splicedAt))
	cc, sc, err := restoreBoth(&client, &server)
	if err != nil {
		return g.abandonUnsplice(sf, tr, err)
	}
	sw.lap(stepRebuild)
	for i, c := range []*net.TCPConn{cc, sc} {
		if sf.legs[i].ecn {
			g.rebuiltECN.remember(c)
		}
	}
	// Point of no return: the engine lets go of the flow.
	g.splicedMu.Lock()
	delete(g.spliced, f.ID)
	// The rebuilt server socket keeps the jumped clock for the rest of
	// the flow (see avoidPort), which leaves the engine's table now.
	g.jumped[serverLeg(f)] = time.Time{}
	g.splicedMu.Unlock()
	g.engine.Delete(sf.entry)
	// The record for restarts goes after the hand back (unstoreUnspliced).
	defer g.unstoreUnspliced(sf)
	for _, c := range []*net.TCPConn{cc, sc} {
		if err := tcprepair.Resume(c); err != nil {
			g.log.Error("unsplice: leave repair mode", logging.KeyFlow, f.ID, logging.Err(err))
		}
	}
	released := g.releaseToSockets(tr, client.SndNxt, server.SndNxt)
	sw.lap(stepUnspliceRelease)
	g.addPassthrough(f.ID, tr)
	go g.retirePassthrough(f.ID, tr)
	g.unsplices.Add(1)
	st := sf.entry.Stats()
	g.foldUnspliced(f, st)
	f.SetState(proxy.StateProxied)
	took := time.Since(start)
	g.log.Info("flow unspliced", logging.KeyFlow, f.ID, logging.KeyService, f.Service,
		logging.KeyClient, f.Client, logging.KeyServer, f.Server,
		"took_us", took.Microseconds(), "held_packets", released,
		"spliced_bytes_c2s", st[splice.C2S].Bytes, "spliced_bytes_s2c", st[splice.S2C].Bytes, sw.attrs())
	g.flowEvent(api.EventUnspliced, f, fmt.Sprintf("took %d µs", took.Microseconds()))
	if !f.Resume(cc, sc) {
		g.log.Error("unsplice: the proxy did not take the flow back; resetting it", logging.KeyFlow, f.ID)
		proxy.Reset(cc)
		proxy.Reset(sc)
		return nil
	}
	sw.lap(stepHandBack)
	sw.commit(g)
	g.unspliceCost.observe(time.Since(start))
	return nil
}

// unstoreUnspliced removes the record for restarts of a flow given back
// to its proxy, once the proxy has it: four map deletions that need not
// delay the hand back (a daemon killed in between would adopt a flow
// whose sockets died with it, which then times out). The proxy may have
// spliced the flow again meanwhile, and the record, keyed by the flow's
// ID and tuples, is then the new splice's: its storeFlow overwrites it or
// removes it, so it stays. storeMu, held exclusively, orders the check
// with that storeFlow.
func (g *Gateway) unstoreUnspliced(sf *splicedFlow) {
	if g.store == nil || !sf.stored.Load() {
		return
	}
	g.storeMu.Lock()
	defer g.storeMu.Unlock()
	if g.storeClosed.Load() {
		return
	}
	g.splicedMu.Lock()
	respliced := g.spliced[sf.flow.ID] != nil
	g.splicedMu.Unlock()
	if respliced {
		sf.stored.Store(false)
		return
	}
	g.unstoreFrom(g.store, sf)
}

// unspliceDrain waits until each end acknowledged everything the engine
// forwarded to it. What it waits for comes in the flow's packets: it
// checks again whenever the queue's reader handled one, and every
// millisecond for the deadline and ctx.
func (g *Gateway) unspliceDrain(ctx context.Context, tr *transition, deadline time.Time) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		snap := tr.entry.Snapshot()
		if snap.Finished() {
			return errors.New("unsplice abandoned: the flow ended while draining")
		}
		c2s, s2c := snap.Info(splice.C2S), snap.Info(splice.S2C)
		if !c2s.HighestAck.LessThan(c2s.HighestSeq) && !s2c.HighestAck.LessThan(s2c.HighestSeq) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("unsplice abandoned: the ends did not acknowledge everything forwarded to them in time (client->server %d bytes, server->client %d bytes unacknowledged)",
				uint32(c2s.HighestSeq-c2s.HighestAck), uint32(s2c.HighestSeq-s2c.HighestAck))
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("unsplice abandoned: %w", err)
		}
		tr.wait(timer, time.Millisecond)
	}
}

// abandonUnsplice ends an unsplice that could not complete, and returns
// why. Most flows stay spliced (resplice). A flow whose proxy reads every
// client request to route it (HTTP: UnspliceOnClientData) cannot: the
// held packets carry the client's next request, and forwarding them, or
// anything after, would take it to the backend unrouted, past deny
// routes; and a client makes a drain fail at will, by not acknowledging
// the response. Such a flow ends: its held packets are dropped and both
// ends reset.
func (g *Gateway) abandonUnsplice(sf *splicedFlow, tr *transition, why error) error {
	f := sf.flow
	if !f.UnspliceOnClientData.Load() {
		g.resplice(tr, f)
		return fmt.Errorf("%w; the flow stays spliced", why)
	}
	tr.mu.Lock()
	tr.phase = phaseEnded
	held := tr.held
	tr.held = nil
	tr.mu.Unlock()
	for _, np := range held {
		np.Verdict(nfq.Drop)
	}
	g.unspliceAborts.Add(1)
	g.splicedMu.Lock()
	_, mine := g.spliced[f.ID] // else the reaper ended it meanwhile
	delete(g.spliced, f.ID)
	if mine {
		g.jumped[serverLeg(f)] = time.Now().Add(timeWaitMargin)
	}
	g.splicedMu.Unlock()
	if mine {
		g.resetSpliced([]*splicedFlow{sf})
		g.unstore(sf)
		g.engine.Delete(sf.entry)
		g.conntrack.forget(sf.keys())
	}
	g.transitions.remove(tr)
	if !mine {
		return why
	}
	f.SetState(proxy.StateClosing)
	reason := "unsplice abandoned, flow reset: its next request cannot be routed"
	g.countClosed(sf)
	g.logClosed(sf, reason)
	af := describeFlow(f, sf)
	g.events.publish(api.Event{Kind: proxy.EventClosed, Flow: &af, Detail: reason})
	g.flows.Remove(f)
	if err := g.diverter.Delete(tr.queue, tr.keys[0], tr.keys[1]); err != nil {
		g.log.Error("remove divert entries", logging.KeyFlow, f.ID, logging.Err(err))
	}
	return fmt.Errorf("%w; the flow was reset: its proxy must route the request held", why)
}

// resplice ends an abandoned unsplice: held packets go through the engine
// in order, and the flow stays spliced.
func (g *Gateway) resplice(tr *transition, f *proxy.Flow) {
	unpin := g.queues.Pin(int(tr.queue))
	tr.mu.Lock()
	tr.phase = phaseSpliced
	held := tr.held
	tr.held = nil
	var p splice.Packet
	for _, np := range held {
		d := nfq.Drop
		if p.Parse(np.Data) == splice.OK {
			d = forward(g, tr.entry, tr.dir(p.KeyOf()), &p, np)
		}
		np.Verdict(d)
	}
	tr.mu.Unlock()
	unpin()
	g.transitions.remove(tr)
	g.unspliceAborts.Add(1)
	f.SetState(proxy.StateSpliced)
	g.splicedMu.Lock()
	sf := g.spliced[f.ID]
	g.splicedMu.Unlock()
	if sf != nil {
		sf.entry.Unpin()
		g.promote(sf) // back to the program
	}
}

// releaseToSockets lets the held packets reach the rebuilt sockets, in
// order, and turns the transition into a passthrough: from now on the
// flow's packets pass the queue unchanged. sndClient and sndServer are
// what the client's and the server's socket sent: held packets that
// acknowledge less get their ACK raised to it.
func (g *Gateway) releaseToSockets(tr *transition, sndClient, sndServer splice.Seq) int {
	// Nothing held (an unsplice asked for by splicectl, on an idle
	// flow): the phase changes, and the thread stays where it is
	// (see release).
	tr.mu.Lock()
	if len(tr.held) == 0 {
		tr.phase = phaseAborted
		tr.mu.Unlock()
		return 0
	}
	tr.mu.Unlock()
	// Packets held meanwhile join tr.held: the phase is still frozen.
	unpin := g.queues.Pin(int(tr.queue)) // in order with the queue's reader
	defer unpin()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.phase = phaseAborted
	var p splice.Packet
	n := 0
	for _, np := range tr.held {
		d := nfq.Drop
		if p.Parse(np.Data) == splice.OK {
			snd := sndServer
			if tr.dir(p.KeyOf()) == splice.C2S {
				snd = sndClient // the client's packets go to the socket that talks to it
			}
			// Unchanged packets go back as they came: a verdict with data
			// makes the kernel trust the checksum field, which a packet
			// from a local sender (CHECKSUM_PARTIAL) does not hold yet.
			d = nfq.Accept
			if raiseAck(&p, snd, !np.CsumNotReady) {
				np.Data = p.Bytes()
				d = nfq.AcceptModified
			}
		}
		np.Verdict(d)
		n++
	}
	tr.held = nil
	return n
}

// raiseAck raises a held packet's acknowledgment to snd when it is
// behind, and reports whether it did. A complete checksum (complete) is
// updated for the change only (RFC 1624): a packet corrupted on its way
// keeps a checksum its receiver refuses. Computed afresh, it would make
// the corruption valid, and the rebuilt socket would take the bytes and
// acknowledge them. A CHECKSUM_PARTIAL packet's field holds only the
// pseudo-header sum; after a verdict with data the kernel trusts the
// field, so it gets the full checksum.
func raiseAck(p *splice.Packet, snd splice.Seq, complete bool) bool {
	t := p.TCP()
	if t.Flags()&splice.FlagACK == 0 || !t.Ack().LessThan(snd) {
		return false
	}
	if complete {
		old := splice.Fold(splice.Sum(t[splice.TCPAckOffset:splice.TCPAckOffset+4], 0))
		t.SetAck(snd)
		t.SetChecksum(splice.UpdateChecksum(t.Checksum(), old, splice.Fold(splice.Sum(t[splice.TCPAckOffset:splice.TCPAckOffset+4], 0))))
		return true
	}
	t.SetAck(snd)
	t.SetChecksum(0)
	t.SetChecksum(splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()))
	return true
}

// rebuiltConns returns the states of the two sockets that continue a
// spliced flow: the client's leg (it talks to the client, from the address
// the client connected to) and the server's leg. Sequence numbers come
// from what the engine forwarded, moved into each leg's space; each
// socket's timestamp clock continues from the last TSval its peer saw
// (jump included), so the peer's PAWS check passes.
func rebuiltConns(p *splice.Params, f splice.Flow, since time.Duration) (client, server splice.Conn) {
	c2s, s2c := f.Info(splice.C2S), f.Info(splice.S2C)
	client, server = p.Client, p.Server
	client.RcvNxt = c2s.HighestSeq
	client.SndNxt = s2c.HighestSeq.Add(s2c.SeqOffset)
	server.RcvNxt = s2c.HighestSeq
	server.SndNxt = c2s.HighestSeq.Add(c2s.SeqOffset)
	// Windows: what each peer last advertised, and what the other end
	// advertised through the engine.
	client.SndWnd, client.RcvWnd = c2s.Window, s2c.Window
	server.SndWnd, server.RcvWnd = s2c.Window, c2s.Window
	ms := uint32(since.Milliseconds())
	client.TSval = lastSeenTS(s2c, p.Client.TSval+ms)
	server.TSval = lastSeenTS(c2s, p.Server.TSval+ms)
	return client, server
}

// lastSeenTS is the clock value a rebuilt socket continues from: one past
// the last TSval the engine sent on its behalf, or the captured socket's
// own clock advanced by the time spliced when none was sent.
func lastSeenTS(d splice.DirInfo, fallback uint32) uint32 {
	if !d.TSLearned {
		return fallback
	}
	return d.TSval + d.TSOffset + 1
}

// restoreBoth rebuilds the client's and the server's sockets, one after
// the other: each is some twenty system calls that wait on nothing, most
// of an idle unsplice's time. Rebuilt at once, the server's on another
// goroutine, they took longer: in six runs of the latency bench's idle
// unsplices each (60 a run, the same build otherwise) the rebuild's
// median was 162-220 µs (190 the middle run) at once and 164-189 µs
// (172) one after the other. A goroutine made ready goes first in its
// processor's queue, and another thread takes it from there only after
// a pause of 3 µs, which these VMs' timers make 50-100 µs; traced, the
// second rebuild often began as the first was ending. On error neither
// socket is left (a rebuilt one is closed in repair mode, silently).
func restoreBoth(client, server *splice.Conn) (cc, sc *net.TCPConn, err error) {
	cc, err = tcprepair.Restore(client)
	if err != nil {
		return nil, nil, fmt.Errorf("rebuild the client's connection: %w", err)
	}
	sc, err = tcprepair.Restore(server)
	if err != nil {
		cc.Close()
		return nil, nil, fmt.Errorf("rebuild the server's connection: %w", err)
	}
	return cc, sc, nil
}
