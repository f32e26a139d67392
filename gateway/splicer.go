package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"spliced/api"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/rules"
	"spliced/splice"
	"spliced/tcprepair"
)

// SpliceError says why a splice was abandoned; the flow stays proxied and
// its connections are intact.
type SpliceError struct {
	Reason string
	Err    error
}

func (e *SpliceError) Error() string {
	if e.Err != nil {
		return "splice abandoned: " + e.Reason + ": " + e.Err.Error()
	}
	return "splice abandoned: " + e.Reason
}

func (e *SpliceError) Unwrap() error { return e.Err }

// Splice moves a proxied flow into the engine (paper 3.3). The caller has
// stopped reading and writing both connections. Steps:
//
//  1. divert the flow's tuples to the queues; from now on payload that
//     arrives is taken over (kept for later) and only its ACK information
//     reaches the sockets, so they can only drain;
//  2. move what the sockets already received (and acknowledged) across,
//     and wait until both peers acknowledged everything the sockets sent:
//     then no byte the gateway acknowledged is anywhere but at its
//     destination;
//  3. freeze (hold every packet), capture both sockets with TCP_REPAIR and
//     close them silently;
//  4. build the engine's flow, send the payload taken over through it, and
//     release the held packets through it.
//
// On success the connections are closed and the gateway owns the flow. On
// error (a *SpliceError) nothing was lost: the connections are intact and
// still the caller's.
//
// The splice runs on one of the gateway's transition workers (see
// transitionWorkerIdle); its time counts from the call.
func (g *Gateway) Splice(ctx context.Context, f *proxy.Flow, client, upstream *net.TCPConn) error {
	if !g.splicing() {
		return &SpliceError{Reason: "splicing is not enabled (no service has a splice mode)"}
	}
	if g.stopping.Load() {
		// Its flow would only be reset at the stop (see shutdown).
		return &SpliceError{Reason: "spliced is stopping", Err: proxy.ErrSpliceRuledOut}
	}
	if cause, reason := g.reversePathRefusal(legsOfConns(client, upstream)); reason != "" {
		g.rpf.refusals.refuse(g, f, cause, reason)
		return &SpliceError{Reason: reason, Err: proxy.ErrSpliceRuledOut}
	}
	if reason := g.markRoutingRefusal(); reason != "" {
		// Said once when found (checkMarkRouting), and in the status.
		g.log.Debug("splice refused: "+reason, logging.KeyFlow, f.ID)
		return &SpliceError{Reason: reason, Err: proxy.ErrSpliceRuledOut}
	}
	if cause, reason := g.forwardingRefusal(legsOfConns(client, upstream)); reason != "" {
		g.fwd.refusals.refuse(g, f, cause, reason)
		return &SpliceError{Reason: reason, Err: proxy.ErrSpliceRuledOut}
	}
	if proxy.TwoFamilies(client, upstream) {
		// Refused before the flow is diverted and its sockets captured,
		// which splice.NewFlow would refuse only then (an HTTP proxy's
		// backend of the other family: at every response).
		reason := fmt.Sprintf("the client (%v) and the server (%v) are of two address families; the engine does not translate IPv4 to IPv6", client.RemoteAddr(), upstream.RemoteAddr())
		g.families.refuse(g, f, refusalCause{}, reason)
		return &SpliceError{Reason: reason, Err: errors.Join(proxy.ErrTwoFamilies, proxy.ErrSpliceRuledOut)}
	}
	if a, ok := linkLocalPeer(addrPort(client.RemoteAddr()), addrPort(client.LocalAddr()), addrPort(upstream.LocalAddr()), addrPort(upstream.RemoteAddr())); ok {
		reason := fmt.Sprintf("%v is a link-local address, which is not forwarded to another link: once spliced, this flow's packets from or to it would be dropped or sent back to the link they came from; the flow stays proxied (give the host a global or unique local address to have its flows spliced)", a)
		g.linkLocal.refuse(g, f, refusalCause{}, reason)
		return &SpliceError{Reason: reason, Err: proxy.ErrSpliceRuledOut}
	}
	start := time.Now()
	done := make(chan error, 1)
	g.runTransition(func() {
		record, err := g.splice(ctx, start, f, client, upstream)
		done <- err
		if record != nil {
			// Once the caller went on: the flow is the engine's, and
			// its record for a restart (see store.go) delays no packet
			// of it. A flow that left the engine meanwhile loses the
			// record again.
			g.storeFlow(record)
		}
	})
	return <-done
}

// transitionWorkerIdle is how long a goroutine that ran a splice or an
// unsplice waits for the next before it ends. Transitions run on reused
// goroutines because a fresh one costs them dearly: its stack grows by
// copying on the way to the deep calls, and the kernel's first access to
// each new stack page (the arguments of a system call) is slow on these
// VMs. Measured on the idle splices of the latency bench, the same
// build: the record phase's BPF map update took 40-180 µs on the
// proxy's goroutine and 4 µs on a reused one.
const transitionWorkerIdle = 10 * time.Second

// transitionWorkersIdleMax is how many transition workers wait for work
// at most. A burst of splices (a thousand flows spliced at once) starts
// a worker per splice; kept for transitionWorkerIdle, each with its
// grown stack, they held more memory than the flows they spliced (5.8 KB
// per flow on the bpf datapath in the memory bench, 1,314 idle workers
// and handlers after 3,000 splices).
const transitionWorkersIdleMax = 64

// splice is Splice on a worker. It returns the spliced flow to record
// for a restart, if any.
func (g *Gateway) splice(ctx context.Context, start time.Time, f *proxy.Flow, client, upstream *net.TCPConn) (record *splicedFlow, err error) {
	// Spread flows over the queues (cores); both directions of a flow go
	// to the same queue, so its packets stay in order. A flow spliced
	// before and unspliced keeps its queue and its divert entries.
	queue := uint16(g.nextQueue.Add(1) % uint32(g.manager().Spec().Divert.Queues))
	if pt := g.takePassthrough(f.ID); pt != nil {
		queue = pt.queue
	}
	tr := newTransition([2]splice.Key{
		splice.KeyFrom(addrPort(client.RemoteAddr()), addrPort(client.LocalAddr())),
		splice.KeyFrom(addrPort(upstream.RemoteAddr()), addrPort(upstream.LocalAddr())),
	}, queue, phaseDraining, nil)
	tr.watchClient = f.UnspliceOnClientData.Load()
	// Before anything is diverted, so before anything is taken over:
	// see ackFloor.
	for d, c := range []*net.TCPConn{client, upstream} {
		n, err := tcprepair.OutQ(c)
		if err != nil {
			return nil, &SpliceError{Reason: "read socket queues", Err: err}
		}
		tr.outq0[d] = n
	}
	f.SetState(proxy.StateSplicing)
	g.transitions.add(tr)
	sw := newStopwatch(start)
	if err := g.divert(tr); err != nil {
		// Part of it may have gone in with other splices' entries.
		g.diverter.Delete(tr.queue, tr.keys[0], tr.keys[1])
		g.transitions.remove(tr)
		f.SetState(proxy.StateProxied)
		return nil, &SpliceError{Reason: "divert the flow", Err: err}
	}
	sw.lap(stepDivert)
	drain := g.drainTimeout(f.Service)
	caps, err := g.quiesceAndCapture(ctx, tr, f, client, upstream, start.Add(drain), sw)
	if err != nil {
		g.abort(tr, f)
		return nil, err
	}
	params := splice.Params{Client: caps[0], Server: caps[1]}
	if g.log.Enabled(ctx, slog.LevelDebug) { // legAttrs allocates
		g.log.Debug("captured", logging.KeyFlow, f.ID, legAttrs("client_leg", &params.Client), legAttrs("server_leg", &params.Server))
	}
	if reason := segmentsTooBig(&params); reason != "" {
		tcprepair.Leave(client)
		tcprepair.Leave(upstream)
		g.abort(tr, f)
		return nil, &SpliceError{Reason: reason}
	}
	entry, err := g.engine.Add(f.ID, &params, monotime.Now())
	if err != nil {
		tcprepair.Leave(client)
		tcprepair.Leave(upstream)
		g.abort(tr, f)
		return nil, &SpliceError{Reason: "build the engine flow", Err: err}
	}
	sw.lap(stepInstall)
	// Point of no return: in repair mode, Close sends nothing. The
	// sockets go before any packet goes through the engine: a packet
	// it forwards goes on through the prerouting rules after its
	// verdict, and a socket lookup there (TPROXY) would still find them
	// and take it (closing them after the release stalled busy flows
	// for a retransmission timeout, 200 ms).
	client.Close()
	upstream.Close()
	sent, released, injectErr := g.release(tr, entry, &params)
	sw.lap(stepRelease)
	if injectErr != nil {
		// Not fatal: the sender never had those bytes acknowledged and
		// retransmits them through the engine.
		g.log.Warn("inject taken-over payload", logging.KeyFlow, f.ID, logging.Err(injectErr))
	}
	g.addSpliced(f, entry, tr.queue, &params)
	g.conntrack.loosen(tr.keys)
	back := g.handOver(tr, f, entry)
	if back && g.kpath != nil {
		g.kpath.promoteSkipped.Add(1) // going straight back to its proxy
	}
	if !back {
		g.splicedMu.Lock()
		sf := g.spliced[f.ID]
		g.splicedMu.Unlock()
		if sf != nil && g.kpath != nil {
			sw.lap(stepRecord)
			g.promote(sf)
			sw.lap(stepPromote)
		} else if sf != nil {
			record = sf
			sw.lap(stepRecord)
		}
	}
	took := time.Since(start)
	g.spliceLatency.observe(took)
	g.spliceCost.observe(took)
	sw.commit(g)
	if !back {
		f.SplicedAt.Store(monotime.Now())
		// Unless the flow moved on meanwhile: the client's next request
		// may have unspliced it while it was recorded or promoted (the
		// unsplice set Splicing, then Proxied), or it may be closing.
		f.ChangeState(proxy.StateSplicing, proxy.StateSpliced)
	}
	g.log.Info("flow spliced", logging.KeyFlow, f.ID, logging.KeyService, f.Service,
		logging.KeyClient, f.Client, logging.KeyServer, f.Server,
		logging.KeyBytesC2S, f.C2S.Load(), logging.KeyBytesS2C, f.S2C.Load(),
		"took_us", took.Microseconds(), "taken_over_bytes", tr.takenLen[0]+tr.takenLen[1],
		"injected_packets", sent, "held_packets", released, "datapath", datapathOf(entry), sw.attrs())
	g.flowEvent(api.EventSpliced, f, fmt.Sprintf("took %d µs", took.Microseconds()))
	return record, nil
}

// segmentsTooBig says why a captured flow must stay proxied when one
// end's segments are larger than any window the other end ever offered,
// or returns "". Each end sends segments of up to the MSS the gateway's
// socket announced to it (tcp_info's advmss: the kernel lowers it by the
// timestamp option's 12 bytes when timestamps were negotiated, so it is
// a full segment's payload), and a Linux sender does not send part of a
// segment while it waits for window: when the window never holds a whole
// segment it sends only on its persist timer, about 1 KB every 200 ms in
// the lab. Connected to such a receiver itself, it would have sent
// segments of at most half the largest window the receiver offered
// (tcp_bound_to_half_wnd), as the gateway's socket does now; spliced, the
// flow crawls (8 MiB to a server offering at most 1,152 bytes: about
// 600 KB in 2 minutes, where the proxy relays it in 4 s). Such a receiver
// (a tiny embedded TCP stack, a minimal SO_RCVBUF) is rare, and its flow
// slow anyway: proxying it costs little.
//
// A window between one and two segments is left alone: the sender then
// sends a segment each time the window opens, which does not stall, and
// a flow spliced as it connects knows only the handshake's windows,
// which a receiver often widens later.
func segmentsTooBig(p *splice.Params) string {
	for _, d := range []struct {
		from, to         *splice.Conn
		sender, receiver string
	}{{&p.Client, &p.Server, "client", "server"}, {&p.Server, &p.Client, "server", "client"}} {
		if seg := uint32(d.from.AdvMSS); d.to.MaxWnd > 0 && seg > d.to.MaxWnd {
			return fmt.Sprintf("the %s's largest receive window (%d bytes) is smaller than the %s's segments (%d bytes), "+
				"so spliced the %s would send only on its persist timer", d.receiver, d.to.MaxWnd, d.sender, seg, d.sender)
		}
	}
	return ""
}

// divert adds the divert entries of a splice's tuples: from the packet
// path, by a command packet per tuple (see rules.Divert), or through a
// netlink transaction when commands are off (see checkDivertCommands) or
// one was not taken, which also reports why nothing can be added.
func (g *Gateway) divert(tr *transition) error {
	if g.divertMode.Load() == divertByCommand {
		err := g.diverter.Commands(func() error { return g.inject.sendDivertCommands(tr.queue, tr.keys[:]) })
		if err == nil {
			g.divertCommands.Add(1)
			return nil
		}
		if errors.Is(err, rules.ErrDiverterStopped) {
			return err
		}
		if ok, suppressed := g.divertLog.Allow("command"); ok {
			g.log.Warn("divert command failed; adding the flow's divert entries through netlink", logging.Err(err), "suppressed", suppressed)
		}
	}
	g.divertNetlink.Add(1)
	return g.diverter.Add(tr.queue, tr.keys[0], tr.keys[1])
}

// legAttrs describes a captured connection for the log.
func legAttrs(name string, c *splice.Conn) slog.Attr {
	return slog.Group(name, "local", c.Local, "remote", c.Remote, "snd_nxt", uint32(c.SndNxt), "rcv_nxt", uint32(c.RcvNxt),
		"snd_wnd", c.SndWnd, "rcv_wnd", c.RcvWnd, "snd_wscale", c.SndWscale, "rcv_wscale", c.RcvWscale,
		"mss", c.MSS, "adv_mss", c.AdvMSS, "max_wnd", c.MaxWnd, "sack", c.SACK, "timestamps", c.Timestamps, "ecn", c.ECN, "tsval", c.TSval)
}

func (g *Gateway) drainTimeout(service string) time.Duration {
	if s := g.serviceOf(service); s != nil {
		return s.Splice.DrainTimeout.D()
	}
	return 5 * time.Second
}

// quiesceAndCapture runs steps 2 and 3 and returns the captured
// connections (client side first). On error both sockets are usable and the
// transition is not frozen.
func (g *Gateway) quiesceAndCapture(ctx context.Context, tr *transition, f *proxy.Flow, client, upstream *net.TCPConn, deadline time.Time, sw *stopwatch) ([2]splice.Conn, error) {
	var caps [2]splice.Conn
	// The drain's buffer is taken only when there is something to move:
	// taken for every splice, a burst of them (the memory bench's 9,900
	// flows spliced at once) held one per splice under way, 256 KiB
	// each, and their pool kept them until the second garbage collection.
	var buf *[]byte
	defer func() {
		if buf != nil {
			drainBufs.Put(buf)
		}
	}()
	wait := 20 * time.Microsecond
	// An idle flow, the common case, has nothing queued: the first round
	// freezes at once and reads the queues only after the barrier, which
	// it must anyway (four ioctls less). If they hold something, the
	// freeze is undone and the drain runs as usual.
	for optimistic := true; ; optimistic = false {
		var empty bool
		var err error
		if optimistic {
			empty, err = true, tr.interrupted(client, upstream)
		} else {
			if buf == nil {
				buf = drainBufs.Get().(*[]byte)
			}
			empty, err = g.drainStep(tr, f, client, upstream, *buf, deadline)
		}
		if err != nil {
			return caps, err
		}
		if empty {
			tr.mu.Lock()
			tr.phase = phaseFrozen
			tr.mu.Unlock()
			sw.lap(stepDrain)
			// Nothing reaches the sockets now; make sure nothing did
			// between the check and the freeze, including packets the
			// queue's reader let through before the freeze but whose
			// verdicts were still in its batch: one arriving after the
			// capture would meet no socket and draw a reset.
			g.queues.Barrier(int(tr.queue))
			sw.lap(stepBarrier)
			if empty, err = queuesEmpty(client, upstream); err == nil && empty {
				caps, err = captureBoth(client, upstream)
				if err != nil {
					g.unfreeze(tr)
					return caps, err
				}
				caps[0].ECN = caps[0].ECN || g.rebuiltECN.negotiated(client)
				caps[1].ECN = caps[1].ECN || g.rebuiltECN.negotiated(upstream)
				late, err := lateBytes(client, upstream)
				if err == nil && !late {
					sw.lap(stepCapture)
					return caps, nil
				}
				tcprepair.Leave(client)
				tcprepair.Leave(upstream)
				g.lateBytes.Add(1)
				g.log.Debug("bytes reached a socket during the capture; draining again", logging.KeyFlow, f.ID, logging.Err(err))
			}
			g.unfreeze(tr)
			if optimistic {
				continue // to the drain, at once
			}
		}
		if time.Now().After(deadline) {
			return caps, &SpliceError{Reason: "the peers did not acknowledge the gateway's data in time (drain timeout)"}
		}
		if err := ctx.Err(); err != nil {
			return caps, &SpliceError{Reason: "cancelled", Err: err}
		}
		// Check again soon, less often the longer it lasts, and at
		// least every millisecond: a check is a few ioctls, and a
		// thousand flows may drain at once (a cap of 250 µs was tried;
		// CI then saw 1000 concurrent splices take 10-30 s, and 16 of
		// them hit their drain timeout).
		time.Sleep(wait)
		wait = min(wait*2, time.Millisecond)
	}
}

// ackFloor is the lowest acknowledgment that the socket connected to
// the sender of direction d, captured as c, could have accepted from
// any segment taken over since the splice began: its snd_una then, less
// the largest window its peer offered (RFC 5961 5.2, as Linux bounds
// it). A segment below it was refused by the socket, which got its ACK
// information, and is forged or corrupted. Its payload must not go on
// with the sender's latest acknowledgment (freshen) either: a blind
// attacker would need only a sequence number in the window, and the
// first segment through the engine teaches it the sender's timestamp
// clock. The socket sent nothing but what the drain wrote since (the
// proxy stopped writing), so its snd_una then was its write_seq at
// capture less what was unacknowledged then and what the drain wrote.
func (tr *transition) ackFloor(d splice.Dir, c *splice.Conn) splice.Seq {
	return c.SndNxt.Sub(uint32(tr.outq0[d] + tr.written[d])).Sub(max(c.MaxWnd, c.SndWnd))
}

// takesWhole reports whether any of a direction's taken-over packets
// would go whole, as a GSO packet (gso.go): the injector sends them so,
// and one is longer than a segment of wire bytes.
func (g *Gateway) takesWhole(taken [][]byte, wire int) bool {
	if g.inject.gso == nil {
		return false
	}
	var p splice.Packet
	for _, b := range taken {
		if p.Parse(b) == splice.OK && gsoCandidate(&p, wire-p.TCP().HeaderLen()) {
			return true
		}
	}
	return false
}

// captureBoth captures the client's connection, then the upstream one.
// On error both are usable (out of repair mode).
func captureBoth(client, upstream *net.TCPConn) ([2]splice.Conn, error) {
	var caps [2]splice.Conn
	var err error
	if caps[0], err = tcprepair.Capture(client); err != nil {
		return caps, &SpliceError{Reason: "capture the client connection", Err: err}
	}
	if caps[1], err = tcprepair.Capture(upstream); err != nil {
		tcprepair.Leave(client)
		return caps, &SpliceError{Reason: "capture the upstream connection", Err: err}
	}
	return caps, nil
}

// lateBytes reports whether a captured socket received bytes after the
// check that found its queues empty (or it cannot tell). A segment that
// passed the divert rule before the flow's entries existed goes on to
// the socket, not to the queue, and the barrier does not wait for it;
// if it came while the check held the socket's lock, the kernel queued
// it as the lock was released, after the check looked. Its bytes,
// acknowledged to their sender, would go with the socket and the flow
// would lack them for ever (CI: a flow spliced as it connected lost its
// client's first 8 bytes and waited for them). The capture's own system
// calls release the lock several times, so such a segment is in the
// receive queue now; the drain then moves it, as it moves any other.
func lateBytes(conns ...*net.TCPConn) (bool, error) {
	for _, c := range conns {
		n, err := tcprepair.Unread(c)
		if err != nil || n > 0 {
			return true, err
		}
	}
	return false, nil
}

// drainBufs hold the buffers that move queued bytes during a drain.
var drainBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// drainStep moves bytes the sockets received (and acknowledged) to the
// other side, as the proxy would have. It reports whether both sockets
// were empty when it looked (nothing received unread, nothing sent
// unacknowledged, nothing moved): the queue sizes it reads for the move
// answer that too, so a splice asks each socket once per round.
func (g *Gateway) drainStep(tr *transition, f *proxy.Flow, client, upstream *net.TCPConn, buf []byte, deadline time.Time) (empty bool, err error) {
	if err := tr.interrupted(client, upstream); err != nil {
		return false, err
	}
	empty = true
	if tr.watchClient {
		inq, outq, err := tcprepair.Queues(client)
		if err != nil {
			return false, &SpliceError{Reason: "read socket queues", Err: err}
		}
		if inq > 0 {
			return false, &SpliceError{Reason: "the client sent its next request; the proxy reads it first"}
		}
		empty = outq == 0
	}
	for _, m := range []struct {
		src, dst *net.TCPConn
		n        *atomic.Int64
		acks     splice.Dir // the direction whose packets acknowledge what dst sends
	}{{client, upstream, &f.C2S, splice.S2C}, {upstream, client, &f.S2C, splice.C2S}} {
		if tr.watchClient && m.src == client {
			continue // the proxy reads the client's requests itself (checked above)
		}
		for {
			inq, outq, err := tcprepair.Queues(m.src)
			if err != nil {
				return false, &SpliceError{Reason: "read socket queues", Err: err}
			}
			if outq > 0 {
				empty = false
			}
			if inq == 0 {
				break
			}
			// Bytes moved: the destination's send queue is not empty.
			empty = false
			m.src.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			n, err := m.src.Read(buf[:min(inq, len(buf))])
			m.src.SetReadDeadline(time.Time{})
			if n > 0 {
				w, werr := writeQueued(m.dst, buf[:n], deadline, g.idleTimeout(f.Service))
				m.n.Add(int64(w))
				tr.written[m.acks] += w
				if werr != nil {
					return false, &SpliceError{Reason: "move queued bytes", Err: werr}
				}
			}
			if errors.Is(err, io.EOF) {
				return false, &SpliceError{Reason: "the flow is half-closed"}
			}
			if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return false, &SpliceError{Reason: "read queued bytes", Err: err}
			}
		}
	}
	return empty, nil
}

// interrupted says why a splice must give up, seen by the packet path
// while it drained: the client of a watched flow sent its next request,
// or a RST reset one of the sockets. (A reset socket's SIOCOUTQ still
// counts what it had not had acknowledged: the drain would wait for it
// until its timeout.)
func (tr *transition) interrupted(conns ...*net.TCPConn) error {
	tr.mu.Lock()
	clientData, rstSeen := tr.clientData, tr.rstSeen
	tr.mu.Unlock()
	if rstSeen {
		for _, c := range conns {
			if ok, err := tcprepair.Established(c); !ok {
				return &SpliceError{Reason: "the flow was reset", Err: err}
			}
		}
	}
	if clientData {
		return &SpliceError{Reason: "the client sent its next request; the proxy reads it first"}
	}
	return nil
}

// writeQueued writes bytes a drain read from one socket to the other. By
// the drain's deadline it gives up the splice (errSlowReceiver), but
// only after the bytes are written, for as long as the flow may be idle:
// they were read from the sender's socket and acknowledged to it, so a
// byte not written would be a byte lost, and the proxy, which counts on
// the flow's byte count to relay the rest, would leave the receiver
// waiting for it for ever. It returns how many bytes it wrote.
func writeQueued(dst *net.TCPConn, b []byte, deadline time.Time, idle time.Duration) (int, error) {
	dst.SetWriteDeadline(deadline)
	w, err := dst.Write(b)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		if idle <= 0 {
			idle = 5 * time.Minute
		}
		dst.SetWriteDeadline(time.Now().Add(idle))
		var w2 int
		w2, err = dst.Write(b[w:])
		w += w2
		if err == nil {
			err = errSlowReceiver
		}
	}
	dst.SetWriteDeadline(time.Time{})
	return w, err
}

// errSlowReceiver: a drain wrote what it read only after its deadline.
var errSlowReceiver = errors.New("the receiver took the bytes queued for it only after the drain timeout")

func queuesEmpty(conns ...*net.TCPConn) (bool, error) {
	for _, c := range conns {
		inq, outq, err := tcprepair.Queues(c)
		if err != nil {
			return false, err
		}
		if inq != 0 || outq != 0 {
			return false, nil
		}
	}
	return true, nil
}

// unfreeze returns a frozen transition to draining, handling the packets
// it held as draining handles them.
func (g *Gateway) unfreeze(tr *transition) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.phase = phaseDraining
	var p splice.Packet
	for _, np := range tr.held {
		d := nfq.Accept
		if p.Parse(np.Data) == splice.OK {
			d = tr.drain(g, &p, np, p.KeyOf())
		}
		np.Verdict(d)
	}
	tr.held = nil
}

// abort abandons a splice before the capture: held packets go to the
// sockets unchanged, the payload taken over is forgotten (its senders
// were never acknowledged and will send it again), and the divert entries
// are removed.
func (g *Gateway) abort(tr *transition, f *proxy.Flow) {
	tr.mu.Lock()
	tr.phase = phaseAborted
	held := tr.held
	tr.held, tr.taken = nil, [2][][]byte{}
	tr.mu.Unlock()
	unpin := g.queues.Pin(int(tr.queue))
	for _, np := range held {
		np.Verdict(nfq.Accept)
	}
	unpin()
	if err := g.diverter.Delete(tr.queue, tr.keys[0], tr.keys[1]); err != nil {
		g.log.Error("remove divert entries of an abandoned splice", logging.KeyFlow, f.ID, logging.Err(err))
	}
	g.transitions.remove(tr)
	g.spliceAborts.Add(1)
	f.SetState(proxy.StateProxied)
}

// handOver ends a splice's transition: from now on the engine's table
// leads packets to the flow. For a flow watched for client data, a
// request that came during the splice (kept in tr.pending) sends the flow
// straight back to its proxy, in the same transition. It reports whether
// it did.
func (g *Gateway) handOver(tr *transition, f *proxy.Flow, e *splice.Entry) bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.pending) == 0 {
		// Watch and leave the table under tr.mu: a packet that found the
		// transition before it left waits, then goes the table's way.
		e.Watch.Store(tr.watchClient)
		g.transitions.remove(tr)
		tr.done = true
		return false
	}
	g.splicedMu.Lock()
	sf := g.spliced[f.ID]
	g.splicedMu.Unlock()
	var p splice.Packet
	for _, np := range tr.pending {
		if p.Parse(np.Data) == splice.OK {
			e.LearnAck(&p, splice.C2S)
		}
	}
	tr.unsplicePending()
	f.SplicedAt.Store(monotime.Now())
	f.SetState(proxy.StateSplicing)
	start := time.Now()
	g.runTransition(func() {
		if err := g.completeUnsplice(context.Background(), sf, tr, start); err != nil {
			g.log.Warn("unsplice abandoned", logging.KeyFlow, f.ID, logging.Err(err))
		}
	})
	return true
}

// release finishes a splice (step 4): the payload taken over goes out
// first, segmented for the receiving leg and rewritten by the engine, then
// the held packets go through the engine in the order they came, from the
// queue's CPU (in order with its reader). A flow that had nothing taken
// over nor held, an idle one, just changes phase: moving the thread to
// another CPU and back costs more than the rest of such a splice.
func (g *Gateway) release(tr *transition, e *splice.Entry, params *splice.Params) (sent, released int, injectErr error) {
	// The receiving leg's segment budget by direction of travel: its MSS
	// (mss_cache, which leaves room for timestamps only when they were
	// negotiated) plus the bare TCP header and those timestamps.
	var wire [2]int
	for d, r := range []*splice.Conn{&params.Server, &params.Client} {
		wire[d] = max(int(r.MSS), 536) + splice.TCPMinHeaderLen
		if r.Timestamps {
			wire[d] += 12
		}
	}
	tr.mu.Lock()
	if len(tr.held) == 0 && len(tr.taken[splice.C2S]) == 0 && len(tr.taken[splice.S2C]) == 0 {
		tr.entry = e
		tr.phase = phaseSpliced
		tr.mu.Unlock()
		return 0, 0, nil
	}
	// The phase is frozen: nothing is taken over any more.
	whole := [2]bool{g.takesWhole(tr.taken[0], wire[0]), g.takesWhole(tr.taken[1], wire[1])}
	tr.mu.Unlock()
	// Where packets sent whole leave, looked up before the flow's packets
	// wait on tr.mu (netlink round trips). By direction of travel, the
	// receiving leg's peer.
	var via [2]egress
	for d, r := range []*splice.Conn{&params.Server, &params.Client} {
		if whole[d] {
			var err error
			if via[d], err = g.inject.gso.resolve(r.Remote.Addr()); err != nil {
				whole[d] = false
				if errors.Is(err, errGSOSetup) && g.gsoWarned.CompareAndSwap(false, true) {
					g.log.Warn("taken-over payload goes in segments (kernel.resend: gso)", logging.Err(err))
				} else {
					g.log.Debug("taken-over payload goes in segments", "to", r.Remote.Addr(), logging.Err(err))
				}
			}
		}
	}
	// Packets held meanwhile join tr.held: the phase is still frozen.
	unpin := g.queues.Pin(int(tr.queue))
	defer unpin()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.entry = e
	tr.phase = phaseSpliced
	now := monotime.Now()
	// What each sender last told the gateway's socket: a segment taken
	// over during the drain carries an older ack and window, and a stale
	// window would shrink the receiver's view below data already sent.
	senders := [2]*splice.Conn{&params.Client, &params.Server}
	var p splice.Packet
	var out [][]byte
	// In order, batched; one the kernel refuses is skipped: its sender
	// still has it unacknowledged and sends it again.
	flush := func() {
		n, err := g.inject.sendAll(out)
		sent += n
		g.injectedSegments.Add(uint64(n))
		if n < len(out) {
			g.injectErrors.Add(uint64(len(out) - n))
			if injectErr == nil {
				injectErr = err
			}
		}
		out = out[:0]
	}
	for d := range 2 {
		c := senders[d]
		win := uint16(min(c.SndWnd>>c.SndWscale, 0xffff))
		gso := whole[d]
		floor := tr.ackFloor(splice.Dir(d), c)
		for _, b := range tr.taken[d] {
			if p.Parse(b) == splice.OK && p.TCP().Flags()&splice.FlagACK != 0 && p.TCP().Ack().LessThan(floor) {
				// Its socket refused its acknowledgment (see ackFloor).
				g.counters.verdicts[splice.DropAck].Add(1)
				continue
			}
			// A packet longer than a segment goes whole, as a GSO packet
			// (gso.go), when its way out resolved.
			if gso && p.Parse(b) == splice.OK && gsoCandidate(&p, wire[d]-p.TCP().HeaderLen()) {
				mss := wire[d] - p.TCP().HeaderLen()
				freshen(&p, c.SndNxt, win)
				v := e.Process(&p, splice.Dir(d), now, false)
				if v == splice.Forward {
					g.counters.verdicts[v].Add(1)
					flush() // what went before it, first
					err := g.inject.gso.send(via[d], &p, mss)
					if err == nil {
						sent++
						g.injectedGSO.Add(1)
						continue
					}
					gso = false
					g.log.Debug("send taken-over payload as a GSO packet; sending it in segments", logging.Err(err))
					// Rewritten already: only cut and checksummed.
					for _, seg := range segments(p.Bytes(), wire[d]) {
						var q splice.Packet
						if q.Parse(seg) == splice.OK {
							q.TCP().SetChecksum(0)
							q.TCP().SetChecksum(splice.TCPChecksum(q.Src(), q.Dst(), q.Segment()))
							out = append(out, seg)
						}
					}
					continue
				}
				// Refused whole (beyond the receiver's window, say): its
				// segments are weighed one by one, as any other's.
			}
			for _, seg := range segments(b, wire[d]) {
				if p.Parse(seg) != splice.OK {
					continue
				}
				freshen(&p, c.SndNxt, win)
				v := e.Process(&p, splice.Dir(d), now, false)
				g.counters.verdicts[v].Add(1)
				if v == splice.Forward {
					out = append(out, p.Bytes())
				}
			}
		}
		flush()
	}
	tr.taken = [2][][]byte{}
	for _, np := range tr.held {
		d := nfq.Drop
		if p.Parse(np.Data) == splice.OK {
			if tr.early(&p) {
				tr.pending = append(tr.pending, np)
				continue
			}
			d = forward(g, e, tr.dir(p.KeyOf()), &p, np)
		}
		np.Verdict(d)
		released++
	}
	tr.held = nil
	return sent, released, injectErr
}
