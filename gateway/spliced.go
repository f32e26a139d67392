package gateway

import (
	"context"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"spliced/api"
	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/proxy"
	"spliced/splice"
)

// splicedFlow is the gateway's record of a flow the engine forwards (or,
// promoted, the bpf datapath). It is kept small: a gateway holds one per
// spliced flow, and on the bpf datapath it is most of what a flow costs
// in the daemon. What can be rebuilt is not kept: the tuples are the
// engine entry's, the captured connections are rebuilt for an unsplice
// from the tuples, the engine's state and legs (see params).
type splicedFlow struct {
	flow  *proxy.Flow
	entry *splice.Entry
	// splicedAt is when the flow was spliced, finished when the reaper
	// first saw it finished (monotime; 0: not yet).
	splicedAt, finished int64
	// stragglersTo: on the bpf datapath, 1<<32 | the ID of the last
	// packet its queue took before the program's entry was written (see
	// promote); 0 until known.
	stragglersTo atomic.Uint64
	// promoting: a promotion of the flow runs (one at a time: a second
	// one would reset the first's straggler bound, see promote).
	promoting atomic.Bool
	// passedOn: when the program last passed one of the flow's packets
	// to the queue and the flow came back to the Go engine (monotime;
	// 0: not since its last promotion). passOns counts
	// those returns, for the back-off before the reaper promotes the
	// flow again (repromote).
	passedOn atomic.Int64
	passOns  atomic.Uint32
	// repromotedAt: when the reaper last promoted the flow again
	// (monotime); quickReturns: how many times in a row it came back
	// within repromoteQuick of that. A flow whose every packet is passed
	// on (an interface the program does not parse, say) stays on the Go
	// engine once that happened repromoteGiveUp times.
	repromotedAt atomic.Int64
	quickReturns atomic.Uint32
	stall        stallWatch
	// legs: what an unsplice needs of the connections captured at the
	// splice (client's leg, server's leg) beyond the tuples and the
	// engine's state. Zero for an adopted flow, which is never unspliced.
	legs  [2]capturedLeg
	queue uint16
	// adopted: spliced by an earlier daemon, found in the bpf datapath's
	// pinned maps (see adoptPinned) or the nfqueue datapath's record
	// (adoptStored) at the start; no proxy owns it.
	adopted bool
	// stored: the flow is in the nfqueue datapath's record (see store.go).
	// storedSeen: the last packet time of the state syncStored wrote
	// there last.
	stored     atomic.Bool
	storedSeen atomic.Int64
}

// capturedLeg is the part of a captured connection (splice.Conn) that
// neither the flow's tuples nor the engine's state hold.
type capturedLeg struct {
	tsval                uint32
	mss                  uint16
	sndWscale, rcvWscale uint8
	sack, timestamps     bool
	ecn                  bool
}

func legOf(c *splice.Conn) capturedLeg {
	return capturedLeg{tsval: c.TSval, mss: c.MSS, sndWscale: c.SndWscale, rcvWscale: c.RcvWscale, sack: c.SACK, timestamps: c.Timestamps, ecn: c.ECN}
}

// keys are the flow's input tuples (client's, server's).
func (sf *splicedFlow) keys() [2]splice.Key { return sf.entry.Keys }

// params rebuilds the connections captured at the splice, as far as an
// unsplice uses them (rebuiltConns): addresses from the tuples, options
// and clocks from legs; sequence numbers and windows are left zero (the
// unsplice takes them from the engine's state).
func (sf *splicedFlow) params() splice.Params {
	k := sf.entry.Keys
	conn := func(in splice.Key, l capturedLeg) splice.Conn {
		return splice.Conn{Local: in.DstAddrPort(), Remote: in.SrcAddrPort(), SndWscale: l.sndWscale, RcvWscale: l.rcvWscale,
			MSS: l.mss, SACK: l.sack, Timestamps: l.timestamps, ECN: l.ecn, TSval: l.tsval}
	}
	return splice.Params{Client: conn(k[splice.C2S], sf.legs[0]), Server: conn(k[splice.S2C], sf.legs[1])}
}

// timeWaitMargin is how long after a spliced flow ended its server may
// still hold it in TIME_WAIT: Linux's TCP_TIMEWAIT_LEN (60 s) and some.
const timeWaitMargin = 65 * time.Second

// addSpliced records a flow just spliced. Its server leg needs no entry
// in jumped while it lives: avoidPort finds it in the engine's table.
func (g *Gateway) addSpliced(f *proxy.Flow, e *splice.Entry, queue uint16, params *splice.Params) {
	sf := &splicedFlow{flow: f, entry: e, queue: queue, splicedAt: monotime.Now(),
		legs: [2]capturedLeg{legOf(&params.Client), legOf(&params.Server)}}
	g.splicedMu.Lock()
	g.spliced[f.ID] = sf
	g.splicedMu.Unlock()
}

// avoidPort tells whether an upstream connection from local to server
// should take another local port (proxy.AvoidFunc). Two reasons:
//
//   - A spliced flow holds the 4-tuple. Its gateway socket is gone, so
//     the kernel sees the port as free and gives it to a new connection
//     to the same server (NAT mode: after some thousand connections to
//     it the kernel's port choice comes round again), whose SYN meets
//     the flow's established server: a challenge ACK, diverted into the
//     flow, never a SYN-ACK, and the connect times out (AvoidLive).
//   - The engine moved the timestamps the server sees on a spliced flow
//     about 2^30 ticks ahead (splice.pawsJump); while the server keeps
//     that flow in TIME_WAIT, a new SYN on the same 4-tuple carries the
//     gateway's own, older clock, fails PAWS, and gets the old
//     connection's ACK, which the gateway's socket answers with a RST
//     before it retries (AvoidEnded).
//   - A flow a killed daemon left has the 4-tuple diverted still (see
//     orphanTuples): the server's SYN-ACK would be taken for one of that
//     flow's packets and answered with a reset, every retry alike, until
//     the connect timed out (AvoidLive).
//
// jumped holds the server legs of flows that ended or were unspliced; a
// flow spliced now is in the engine's table, under its server's tuple
// (server to upstream), which is checked too.
func (g *Gateway) avoidPort(local, server netip.AddrPort) proxy.Avoid {
	if g.splicing() {
		if _, d, live := g.engine.Lookup(splice.KeyFrom(server, local)); live && d == splice.S2C {
			return proxy.AvoidLive
		}
	}
	if g.lost.on.Load() && g.isLost(splice.KeyFrom(server, local)) {
		return proxy.AvoidLive
	}
	g.splicedMu.Lock()
	until, ok := g.jumped[[2]netip.AddrPort{local, server}]
	g.splicedMu.Unlock()
	if ok && (until.IsZero() || time.Now().Before(until)) {
		return proxy.AvoidEnded
	}
	return proxy.AvoidNot
}

// offloadSyncEvery is how often the reaper reads the state of the flows
// on the bpf datapath (syncOffloaded), a quarter of its rounds: what it
// looks for there (a finished flow's linger, an idle timeout, a stall)
// takes seconds or minutes. Read at every round, 9,900 idle flows cost
// the daemon about 6% of a CPU.
const offloadSyncEvery = time.Second

// reap removes spliced flows that ended (FIN both ways and acknowledged,
// or a RST) and flows idle for longer than their service's idle timeout.
func (g *Gateway) reap(now time.Time) {
	if !g.splicing() {
		return
	}
	g.syncStored(now)
	g.checkQueueDrops(now)
	g.reapLost(now)
	mono := monotime.Of(now)
	var done, idle []*splicedFlow
	var reasons []string
	var stalls []stallReport
	var again []*splicedFlow
	if mono-g.offloadSynced.Load() >= int64(offloadSyncEvery) {
		g.offloadSynced.Store(mono)
		g.syncOffloaded(mono)
	}
	g.splicedMu.Lock()
	for id, sf := range g.spliced {
		snap := sf.entry.Snapshot()
		reason := ""
		switch {
		case snap.Finished():
			if g.lingered(sf, mono) {
				reason = "finished"
			}
		case snap.Idle(mono, int64(g.idleTimeout(sf.flow.Service))):
			reason = "idle"
		default:
			for _, d := range checkStall(sf, &snap, mono, g.stallAfter(sf.flow.Service)) {
				stalls = append(stalls, stallReport{sf, d})
			}
			if sf.repromoteDue(mono) {
				again = append(again, sf)
			}
		}
		if reason != "" {
			delete(g.spliced, id)
			sf.finished = mono
			done = append(done, sf)
			reasons = append(reasons, reason)
			if reason == "idle" {
				idle = append(idle, sf)
			}
			sf.flow.SetState(proxy.StateClosing)
			g.jumped[serverLeg(sf.flow)] = now.Add(timeWaitMargin)
		}
	}
	for t, until := range g.jumped {
		if !until.IsZero() && now.After(until) {
			delete(g.jumped, t)
		}
	}
	g.splicedMu.Unlock()
	g.reportStalls(stalls)
	g.repromote(again)
	if len(done) == 0 {
		return
	}
	// Events describe the flow, which takes splicedMu: publish them
	// after it is released.
	for i, sf := range done {
		g.logClosed(sf, reasons[i])
		af := describeFlow(sf.flow, sf)
		g.events.publish(api.Event{Kind: proxy.EventClosed, Flow: &af, Detail: reasons[i]})
	}
	// Like a proxy closing an idle connection, tell both ends.
	if n := g.resetSpliced(idle); n > 0 {
		g.log.Debug("reset idle spliced flows", "flows", len(idle), "packets", n)
	}
	byQueue := map[uint16][]splice.Key{}
	for _, sf := range done {
		// Out of the engine's table first: from then on no promotion
		// under way can hand the flow to the program (splice.ErrGone),
		// and what one handed over already is removed below.
		g.engine.Delete(sf.entry)
		g.countClosed(sf) // out of the table: its counts move to the ended flows'
		g.retireOffloaded(sf)
		g.unstore(sf)
		k := sf.keys()
		g.conntrack.forget(k)
		byQueue[sf.queue] = append(byQueue[sf.queue], k[0], k[1])
		g.flows.Remove(sf.flow)
	}
	if err := g.diverter.DeleteMany(byQueue); err != nil {
		g.log.Error("remove divert entries", "flows", len(done), logging.Err(err))
	}
}

// lingered tells whether a finished flow, first seen finished by this
// reaper now or earlier, has stayed diverted for its service's
// splice.linger.
func (g *Gateway) lingered(sf *splicedFlow, now int64) bool {
	if sf.finished == 0 {
		sf.finished = now
		g.flows.Ended(sf.flow) // no longer a session of its service
	}
	return time.Duration(now-sf.finished) >= g.linger(sf.flow.Service)
}

func (g *Gateway) logClosed(sf *splicedFlow, reason string) {
	st := sf.entry.Stats()
	f := sf.flow
	g.log.Info("flow closed", logging.KeyFlow, f.ID, logging.KeyService, f.Service,
		logging.KeyClient, f.Client, logging.KeyServer, f.Server,
		logging.KeyBytesC2S, f.C2S.Load()+int64(st[splice.C2S].Bytes), logging.KeyBytesS2C, f.S2C.Load()+int64(st[splice.S2C].Bytes),
		"spliced_bytes_c2s", st[splice.C2S].Bytes, "spliced_bytes_s2c", st[splice.S2C].Bytes,
		logging.KeyDuration, time.Since(f.Started).Round(time.Millisecond), logging.KeyReason, reason, logging.KeyMode, "spliced")
}

// idleTimeout is a service's idle_timeout; a removed service's flows
// keep the one it had (serviceOf): a spliced SSH session of a service
// with idle_timeout: 2h, removed by a reload, was reset after 5 minutes
// idle, while a proxied one ran on with its 2 hours.
func (g *Gateway) idleTimeout(service string) time.Duration {
	if s := g.serviceOf(service); s != nil {
		return s.IdleTimeout.D()
	}
	return config.DefaultIdleTimeout
}

// reaper runs reap every interval until ctx is done.
func (g *Gateway) reaper(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			g.reap(now)
		}
	}
}

// latencies keeps recent splice durations for percentiles, and the
// counts of every duration since the start for the Prometheus histogram.
type latencies struct {
	mu      sync.Mutex
	samples []time.Duration
	count   atomic.Uint64
	// The histogram's counters: its buckets (of latencyBounds, each
	// holding the samples up to its bound and none of the ones below),
	// count and sum. A histogram's buckets, count and sum are counters,
	// which only grow: made from the recent samples, the count stopped
	// at 4096 and the buckets and the sum fell whenever slower samples
	// left the window, so rate() over them read resets and nonsense.
	buckets [len(latencyBounds)]uint64
	total   uint64
	sum     float64
}

// latencyBounds are the upper bounds of the histogram's buckets, in
// seconds.
var latencyBounds = [...]float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1, 5}

func (l *latencies) observe(d time.Duration) {
	l.count.Add(1)
	l.mu.Lock()
	if len(l.samples) >= 4096 {
		copy(l.samples, l.samples[1:])
		l.samples = l.samples[:len(l.samples)-1]
	}
	l.samples = append(l.samples, d)
	s := d.Seconds()
	if i := sort.SearchFloat64s(latencyBounds[:], s); i < len(latencyBounds) {
		l.buckets[i]++
	}
	l.total++
	l.sum += s
	l.mu.Unlock()
}

// percentile returns the q-quantile (0..1) of the recent samples.
func (l *latencies) percentile(q float64) time.Duration {
	l.mu.Lock()
	s := append([]time.Duration(nil), l.samples...)
	l.mu.Unlock()
	if len(s) == 0 {
		return 0
	}
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(q*float64(len(s)-1)+0.5)]
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// addPassthrough keeps an unspliced flow's transition: its divert entries
// stay, and the queue passes its packets unchanged while it is proxied.
func (g *Gateway) addPassthrough(id uint64, tr *transition) {
	g.splicedMu.Lock()
	g.passthrough[id] = tr
	g.splicedMu.Unlock()
}

// takePassthrough removes an unspliced flow's passthrough, if it has one,
// and returns it. Its divert entries stay.
func (g *Gateway) takePassthrough(id uint64) *transition {
	g.splicedMu.Lock()
	tr := g.passthrough[id]
	delete(g.passthrough, id)
	ending := g.retiring[id]
	g.splicedMu.Unlock()
	if ending != nil {
		<-ending // its divert entries are going: let them go first
	}
	if tr != nil {
		g.transitions.remove(tr)
	}
	return tr
}

// passthroughQuiet bounds how long an unspliced flow's passthrough waits
// for its queue to empty before it ends (retirePassthrough), and
// passthroughDrain how long it then waits for the packets already queued.
const (
	passthroughQuiet = 2 * time.Second
	passthroughDrain = 100 * time.Millisecond
)

// retirePassthrough ends an unspliced flow's passthrough once its queue
// holds no packet: its divert entries go, so its packets reach the
// sockets by the kernel's path again instead of crossing the queue for
// the rest of the flow's life (every packet through user space, a
// lasting cost of each splice). The transition stays until the packets
// queued before the entries went are through (it accepts them
// unchanged); one that was on its way may arrive after a later one that
// took the kernel's path, a reordering TCP absorbs. When the queue does
// not empty in time (other flows keep it busy), the passthrough stays,
// as it did before: correct, only slower. A splice of the flow meanwhile
// waits (takePassthrough) and then adds its entries again.
func (g *Gateway) retirePassthrough(id uint64, tr *transition) {
	queue := g.manager().Spec().Divert.Queue + tr.queue
	if !awaitEmptyQueue(queue, passthroughQuiet, time.Millisecond) {
		return
	}
	g.splicedMu.Lock()
	if g.passthrough[id] != tr {
		g.splicedMu.Unlock()
		return // spliced again, or ended
	}
	ending := make(chan struct{})
	g.retiring[id] = ending
	g.splicedMu.Unlock()
	err := g.diverter.Delete(tr.queue, tr.keys[0], tr.keys[1])
	if err != nil {
		g.log.Warn("remove divert entries of an unspliced flow; its packets keep crossing the queue", logging.KeyFlow, id, logging.Err(err))
	} else {
		awaitEmptyQueue(queue, passthroughDrain, 100*time.Microsecond)
	}
	g.splicedMu.Lock()
	retired := err == nil && g.passthrough[id] == tr
	if retired {
		delete(g.passthrough, id)
	}
	delete(g.retiring, id)
	g.splicedMu.Unlock()
	if retired {
		g.transitions.remove(tr)
		g.passthroughsRetired.Add(1)
	}
	close(ending)
}

// endPassthrough is called when a flow ends in its proxy: if it was
// unspliced, its divert entries go, and its server leg, kept in jumped
// for as long as the rebuilt socket lived (see completeUnsplice), now
// leaves it once the server's TIME_WAIT is over (otherwise every flow
// unspliced and then closed by its proxy stayed in jumped for ever).
func (g *Gateway) endPassthrough(f *proxy.Flow) {
	leg := serverLeg(f)
	g.splicedMu.Lock()
	if until, ok := g.jumped[leg]; ok && until.IsZero() && g.spliced[f.ID] == nil {
		g.jumped[leg] = time.Now().Add(timeWaitMargin)
	}
	g.splicedMu.Unlock()
	tr := g.takePassthrough(f.ID)
	if tr == nil {
		return
	}
	if err := g.diverter.Delete(tr.queue, tr.keys[0], tr.keys[1]); err != nil {
		g.log.Error("remove divert entries of an unspliced flow", logging.KeyFlow, f.ID, logging.Err(err))
	}
}

// serverLeg is a flow's server leg as a key of jumped.
func serverLeg(f *proxy.Flow) [2]netip.AddrPort {
	upstream, backend := f.ServerLeg()
	return [2]netip.AddrPort{upstream, backend}
}
