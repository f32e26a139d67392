package gateway

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/rules"
	"spliced/splice"
	"spliced/splice/bpf"
)

// The kernel datapath (kernel.datapath bpf or auto): the program of
// package splice/bpf at tcx ingress rewrites established spliced flows.
// The Go engine stays the reference and the path of every transition:
// a flow is spliced by the engine as always, then promoted (its state
// copied into the program's maps); it is demoted (the state read back)
// before an unsplice, and whenever the program passes one of its packets
// to the queue (the next request on a watched flow, a layout the program
// does not handle). The reaper reads the program's state of promoted
// flows to retire them.

// kernelPath is the loaded and attached program.
type kernelPath struct {
	dp *bpf.Datapath
	at *bpf.Attachment
	// Counted by the gateway: promotions, promotions that failed (the
	// flow stays on the Go engine), demotions, and packets of promoted
	// flows that passed ingress before the flow was promoted and were
	// dropped (stragglers, see promote).
	promotions, promoteFailures, demotions, stragglers atomic.Uint64
	// promoteSkipped: splices whose flow was being unspliced before the
	// promotion could take it (the next request came first).
	promoteSkipped atomic.Uint64
	// stopFollowing ends followInterfaces, stopQdiscs
	// followIngressQdiscs (nil when they do not run).
	stopFollowing, stopQdiscs func()
	// stack: the interfaces, by index, where the program leaves what it
	// rewrote to the stack despite its redirect (applyStackInterfaces).
	stack atomic.Pointer[[]int]
	// stackMu serializes applyStackInterfaces; qdiscs: the interfaces
	// with a classic tc ingress qdisc, as followIngressQdiscs last listed.
	stackMu sync.Mutex
	qdiscs  []int
}

// stackInterfaces are the interfaces where the program leaves what it
// rewrote to the stack despite its redirect (see tcingress.go).
func (k *kernelPath) stackInterfaces() []int {
	if p := k.stack.Load(); p != nil {
		return *p
	}
	return nil
}

// close releases the program. Pinned, it stays attached with its maps
// (the flows keep being rewritten; the next daemon adopts them) unless
// remove: then the links are detached and the pins removed.
func (k *kernelPath) close(remove bool) error {
	for _, stop := range []*func(){&k.stopFollowing, &k.stopQdiscs} {
		if *stop != nil {
			(*stop)()
			*stop = nil
		}
	}
	var errs []error
	if k.at != nil {
		if remove {
			errs = append(errs, k.at.Detach())
		} else {
			errs = append(errs, k.at.Close())
		}
	}
	dir := k.dp.PinDir()
	errs = append(errs, k.dp.Close())
	if remove && dir != "" {
		errs = append(errs, bpf.RemovePins(dir))
	}
	return errors.Join(errs...)
}

// Interfaces returns the interfaces the bpf datapath attaches to under
// cfg: kernel.interfaces, or every interface now present but loopback,
// the slaves of bonds and teams, and the ports of bridges that do not
// run br_netfilter (see defaultInterfaces).
func Interfaces(cfg *config.Config) ([]string, error) {
	if len(cfg.Kernel.Interfaces) > 0 {
		return cfg.Kernel.Interfaces, nil
	}
	links, err := listLinks()
	if err != nil {
		// Without masters and kinds every interface is attached to:
		// slower, not wrong (the program passes what it rewrote at
		// another interface).
		ifs, ierr := net.Interfaces()
		if ierr != nil {
			return nil, fmt.Errorf("list interfaces: %w", errors.Join(err, ierr))
		}
		var out []string
		for _, ifi := range ifs {
			if ifi.Flags&net.FlagLoopback == 0 {
				out = append(out, ifi.Name)
			}
		}
		return out, nil
	}
	return defaultInterfaces(links, readBrnf(brnfDir)), nil
}

// defaultInterfaces picks the interfaces of links the program attaches
// to by default, with br_netfilter in state st. Left out, besides
// loopback:
//
//   - a bridge's port: the program sits at the bridge, where a client's
//     packet arrives too (passed up by the bridge), and whose routes its
//     redirect checks the packet's source against. At a port that check
//     fails (the source is routed through the bridge), so the program
//     rewrote there and passed the packet to the stack instead
//     (TestLabBridgedLAN). Not so where br_netfilter runs the IP hooks
//     for the bridge (the sysctls or the bridge's own options): they run
//     inside the bridge, before the bridge's ingress, and the divert
//     chain among them would queue every packet of a promoted flow to
//     the Go engine (passed back, its stragglers dropped, promoted
//     again, until the flow stays there). The program must meet the
//     packet at the port then, where it rewrites and marks it for the
//     divert chain to skip;
//   - a bond's or a team's slave: the bond's ingress sees every packet
//     the slave passes up, before anything else, and the same redirect
//     check fails at the slave.
//
// Other masters keep their slaves: a VRF's slave receives its packets
// at its own ingress, never the VRF's.
func defaultInterfaces(links []linkFacts, st brnfState) []string {
	byIndex := make(map[uint32]*linkFacts, len(links))
	for i := range links {
		byIndex[links[i].index] = &links[i]
	}
	var out []string
	for _, l := range links {
		if l.loopback {
			continue
		}
		if m := byIndex[l.master]; l.master != 0 && m != nil {
			switch m.kind {
			case "bond", "team":
				continue
			case "bridge":
				if !st.runsFor(m) {
					continue
				}
			}
		}
		out = append(out, l.name)
	}
	return out
}

// runsFor reports whether br_netfilter runs the IP hooks for bridge br,
// in either family.
func (st brnfState) runsFor(br *linkFacts) bool {
	return st.loaded && (st.call4 || st.call6 || br.nfCall4 || br.nfCall6)
}

// startDatapath loads and attaches the program when cfg asks for it. With
// auto, a failure is logged and the flows stay on NFQUEUE.
func (g *Gateway) startDatapath(cfg *config.Config) error {
	mode := cfg.Kernel.Datapath
	if mode == config.DatapathNFQueue || mode == "" {
		g.log.Info("datapath", "datapath", "nfqueue", logging.KeyReason, "kernel.datapath: nfqueue")
		return nil
	}
	k, ifaces, err := g.loadKernelPath(cfg)
	if err != nil {
		if mode == config.DatapathBPF {
			return fmt.Errorf("kernel.datapath bpf: %w", err)
		}
		g.log.Warn("datapath", "datapath", "nfqueue", logging.KeyReason, "bpf: "+err.Error()+"; using nfqueue")
		return nil
	}
	g.kpath = k
	if len(cfg.Kernel.Interfaces) == 0 {
		k.stopFollowing = g.followInterfaces(k, cfg)
	}
	if cfg.Kernel.BPFForward == config.BPFForwardRedirect {
		k.stopQdiscs = g.followIngressQdiscs(k)
	}
	g.log.Info("datapath", "datapath", "bpf", "interfaces", strings.Join(ifaces, ","),
		logging.KeyReason, "kernel.datapath: "+mode+"; the program is attached at tcx ingress",
		"mark", fmt.Sprintf("0x%x", uint32(config.BPFMark)), "pins", k.dp.PinDir(), "reused_pins", k.dp.Reused(),
		"links_updated", strings.Join(k.at.Updated, ","), "links_dropped", strings.Join(k.at.Dropped, ","))
	return nil
}

// followInterfaces keeps the program attached at the default interfaces
// (kernel.interfaces unset, see defaultInterfaces) as interfaces come
// and go: on each link notification of rtnetlink it attaches to new ones
// and lets go of the links of those gone, and so when br_netfilter's
// state changes (the module loaded, a sysctl set: no link notification
// says so), which decides whether bridges' ports are attached to. It
// returns the function that stops it. A failure to listen is logged:
// the interfaces of the start stay attached, and spliced packets that
// enter elsewhere go through the queue.
func (g *Gateway) followInterfaces(k *kernelPath, cfg *config.Config) (stop func()) {
	// First for what appeared between the start's listing and the
	// subscription, then on any link message (or an overrun, ENOBUFS) or
	// change of br_netfilter.
	var st brnfState
	stop, err := followRtnetlink(unix.RTMGRP_LINK, brnfRecheck, func() bool { return readBrnf(brnfDir) != st }, func() {
		st = readBrnf(brnfDir)
		if want, err := Interfaces(cfg); err == nil {
			added, removed, err := k.at.Sync(want)
			if len(added) > 0 || len(removed) > 0 {
				g.log.Info("datapath: interfaces changed", "attached", strings.Join(added, ","), "released", strings.Join(removed, ","),
					"interfaces", strings.Join(k.at.Interfaces(), ","))
				if g.redirects() {
					g.applyStackInterfaces(k) // one without a link-layer header; while marks route, every one
				}
			}
			if err != nil {
				g.log.Warn("datapath: could not attach to an interface; its spliced packets go through the queue", logging.Err(err))
			}
		}
	})
	if err != nil {
		g.log.Warn("datapath: interfaces that appear later will not be attached to", logging.Err(err))
	}
	return stop
}

// followRtnetlink subscribes to rtnetlink's multicast groups, runs work
// (before it returns), and then, on one goroutine, again on every message
// of the groups (or an overrun), or when changed, asked every period,
// says so. It returns the function that stops it; when it cannot
// subscribe, work has run once and stop is nil.
func followRtnetlink(groups uint32, every time.Duration, changed func() bool, work func()) (stop func(), err error) {
	conn, err := netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{Groups: groups})
	work()
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if err := waitLinks(conn, every, changed); err != nil {
				return // closed
			}
			work()
		}
	}()
	return func() {
		conn.Close()
		<-done
	}, nil
}

// brnfRecheck is how often followInterfaces reads br_netfilter's state
// between link notifications.
const brnfRecheck = 10 * time.Second

// waitLinks returns when conn receives a message (or overran: ENOBUFS),
// or when changed, asked every period, says so; an error when conn is
// closed or broken.
func waitLinks(conn *netlink.Conn, every time.Duration, changed func() bool) error {
	for {
		if err := conn.SetReadDeadline(time.Now().Add(every)); err != nil {
			return err
		}
		_, err := conn.Receive()
		var te interface{ Timeout() bool }
		switch {
		case err == nil || errors.Is(err, unix.ENOBUFS):
			return nil
		case errors.As(err, &te) && te.Timeout():
			if changed() {
				return nil
			}
		default:
			return err
		}
	}
}

// loadKernelPath loads the program with its maps pinned under cfg's pin
// directory (reusing pins an earlier daemon left) and attaches it. Pins
// it cannot reuse are removed first, unless they belong to another
// network namespace (an error: another daemon may be using them).
func (g *Gateway) loadKernelPath(cfg *config.Config) (*kernelPath, []string, error) {
	ifaces, err := Interfaces(cfg)
	if err != nil {
		return nil, nil, err
	}
	if len(ifaces) == 0 {
		return nil, nil, errors.New("no interface to attach to")
	}
	if err := bpf.MountBPFFS(cfg.Kernel.BPFFS); err != nil {
		return nil, nil, err
	}
	dir := pinDir(cfg)
	opts := bpf.Options{Mark: config.BPFMark, PinDir: dir, Redirect: cfg.Kernel.BPFForward == config.BPFForwardRedirect}
	dp, err := bpf.Load(opts)
	var ie *bpf.IncompatibleError
	if errors.As(err, &ie) && !ie.OtherNetNS {
		g.log.Error("pins of the bpf datapath removed: "+ie.Reason+"; their flows cannot be read, so they are not adopted (those the earlier table still diverts are reset as lost flows)", "pins", dir)
		if err := bpf.RemovePins(dir); err != nil {
			return nil, nil, fmt.Errorf("remove the bpf datapath's pins: %w", err)
		}
		dp, err = bpf.Load(opts)
	}
	if errors.As(err, &ie) && ie.OtherNetNS {
		return nil, nil, fmt.Errorf("%w: another spliced uses %s; give this one another kernel.table or kernel.bpffs", err, dir)
	}
	if err != nil {
		return nil, nil, err
	}
	if opts.Redirect {
		// Before the program meets a packet (an earlier daemon's link is
		// moved to it in place, its flows adopted): followIngressQdiscs
		// and the mark routing check (primed by Run) keep it so.
		qdiscs, err := IngressQdiscs()
		if ifs := g.stackSet(qdiscs, ifaces); err == nil || len(ifs) > 0 {
			dp.SetStackInterfaces(ifs)
		}
	}
	at, err := dp.Attach(ifaces)
	if err != nil {
		if !dp.Reused() {
			dp.Close()
			bpf.RemovePins(dir)
		} else {
			dp.Close() // the pins stay: an earlier daemon's flows run on them
		}
		return nil, nil, err
	}
	return &kernelPath{dp: dp, at: at}, ifaces, nil
}

// withSkipMark returns m, or a manager whose divert chain skips what the
// program rewrote when the program runs.
func (g *Gateway) withSkipMark(m *rules.Manager) *rules.Manager {
	spec := m.Spec()
	if g.kpath == nil || !spec.Divert.Enabled || spec.Divert.SkipMark == g.kpath.dp.Mark() {
		return m
	}
	spec.Divert.SkipMark = g.kpath.dp.Mark()
	return m.WithSpec(spec)
}

// datapathName says which datapath rewrites new spliced flows.
func (g *Gateway) datapathName() string {
	if g.kpath != nil {
		return "bpf"
	}
	return "nfqueue"
}

// promote hands a spliced flow, just released by the Go engine, to the
// program.
//
// The order, and why no update is lost or applied twice: the entry's
// lock serializes the handoff with the Go engine's processing. From
// BeginOffload on the engine refuses the flow's packets (TryProcess), so
// every packet it processed is in the state handed over; the queue's
// barrier then waits until the verdicts it decided for them are sent
// (a batch's verdicts go out together, and one the engine decided
// before the program's entry existed must not reach the receiver after
// packets the program forwarded later: at a flow's end an old ACK after
// the server's socket closed drew a reset); then the program's entry is
// written (PutFlowWatch: state, then both tuples) under the lock
// (CompleteOffload). A packet that reaches ingress after the tuples
// exist is rewritten by the program from that state.
//
// A packet that passed ingress before (on its way to the queue, or in
// it: a straggler) is never processed by the engine, nor forwarded: it
// is dropped (forwardOffloaded). Forwarded, even rewritten by the program
// against the live maps, it would come out a queue's depth after packets
// that arrived later and took the kernel path: under load hundreds of
// packets, past a receiver's reordering window (the sender retransmits
// anyway) and near the end of a flow after a socket closed (a reset).
// Dropped, it is a packet lost before the gateway: the state never saw
// it, and the sender's retransmission goes through the program like any
// new packet (in an unsplice's drain too: it is not data the ends must
// acknowledge before the sockets are rebuilt).
//
// Which queued packets are stragglers is exact: after the tuples exist,
// WaitPrograms waits out every receive path that ran the program before,
// which queues its packet in the same path; then the queue's last packet
// ID bounds the stragglers. Later packets of the flow in the queue are
// ones the program passed on (the next request of a watched flow, a
// layout it does not handle): the flow goes back to the Go engine for
// them (reclaim). Until the bound is known, every queued packet of the
// flow counts as a straggler.
//
// A watched flow (the HTTP proxy's) is written with its watch on, so the
// client's next request is never rewritten by the program. On failure
// the flow stays on the Go engine, which is always correct.
func (g *Gateway) promote(sf *splicedFlow) {
	k := g.kpath
	if k == nil {
		return
	}
	e := sf.entry
	if !sf.promoting.CompareAndSwap(false, true) {
		// An earlier promotion still runs (an unsplice took the flow back
		// and gave up meanwhile): it decides where the flow goes.
		k.promoteSkipped.Add(1)
		return
	}
	defer sf.promoting.Store(false)
	queue := g.manager().Spec().Divert.Queue + sf.queue
	awaitEmptyQueue(queue, promoteQuietWait, 50*time.Microsecond)
	g.recordMeta(sf)
	err := e.BeginOffload()
	if err == nil {
		// From here every queued packet of the flow is a straggler (the
		// reader drops a flow's packets during its handoff anyway).
		sf.stragglersTo.Store(0)
		// Every packet the engine decided to forward leaves before the
		// program forwards any of the flow's: see BeginOffload.
		g.queues.Barrier(int(sf.queue))
		err = e.CompleteOffload(func(st splice.State) error {
			return k.dp.PutFlowWatch(e.ID, e.Keys, st, e.Watch.Load())
		})
	}
	if errors.Is(err, splice.ErrOffloaded) {
		// The program has it already: nothing to change.
		k.promoteSkipped.Add(1)
		return
	}
	if errors.Is(err, splice.ErrPinned) || errors.Is(err, splice.ErrGone) {
		// An unsplice began while the promotion waited (the flow is
		// going back to its proxy and stays with the Go engine), or the
		// flow ended and was retired: nothing to hand over.
		k.promoteSkipped.Add(1)
		k.dp.DeleteMeta(e.ID)
		g.log.Debug("promote: the flow is being unspliced or has ended; it stays on the Go engine", logging.KeyFlow, e.ID, logging.Err(err))
		return
	}
	if err != nil {
		k.promoteFailures.Add(1)
		k.dp.DeleteFlow(e.ID, e.Keys)
		if ok, suppressed := g.mapLog.Allow("promote"); ok {
			g.log.Warn("promote to the bpf datapath failed; the flow stays on the Go engine", logging.KeyFlow, e.ID, logging.Err(err), "suppressed", suppressed)
		}
		return
	}
	k.promotions.Add(1)
	if err := bpf.WaitPrograms(); err != nil {
		g.log.Warn("promote: the flow's queued packets are all taken for stragglers", logging.KeyFlow, e.ID, logging.Err(err))
	} else if ks, err := nfq.ReadKernelStats(); err != nil {
		g.log.Warn("promote: the flow's queued packets are all taken for stragglers", logging.KeyFlow, e.ID, logging.Err(err))
	} else {
		sf.stragglersTo.Store(1<<32 | uint64(ks[queue].IDSequence))
	}
	g.log.Debug("flow promoted to the bpf datapath", logging.KeyFlow, e.ID)
}

// promoteQuietWait bounds how long a promotion waits for its queue to
// hold no packet: a straggler costs its sender a loss episode (a
// retransmission timeout, for the last packets of a response), a wait
// only this much time on the splice.
const promoteQuietWait = 5 * time.Millisecond

// awaitEmptyQueue waits until the kernel queue holds no packet (none
// waiting for a verdict), for at most max. The flow's packets keep going
// through the Go engine meanwhile. A promotion at that moment leaves
// stragglers only among the packets that passed ingress while the entry
// was written (microseconds), instead of the whole queue's backlog of the
// flow; most often none. Under sustained load the queue may never empty:
// the promotion then goes ahead and its stragglers are dropped.
// It reports whether the queue was empty.
func awaitEmptyQueue(queue uint16, max, every time.Duration) bool {
	deadline := time.Now().Add(max)
	for {
		ks, err := nfq.ReadKernelStats()
		if err != nil {
			return false
		}
		if ks[queue].Waiting == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(every)
	}
}

// straggler reports whether a queued packet with this ID passed ingress
// before the flow's program entry existed (see promote).
func (sf *splicedFlow) straggler(id uint32) bool {
	to := sf.stragglersTo.Load()
	return to == 0 || int32(id-uint32(to)) <= 0
}

// reclaim takes a promoted flow back from the program (demotion): its
// tuples go, the program runs that may still hold them end, and its
// state goes back to the engine. The flow's packets meanwhile wait for
// the entry's lock. It does nothing for a flow on the Go engine, nor for
// a pinned one being handed over (the pin turns the handoff back); an
// unpinned one being handed over is splice.ErrHandoff.
func (g *Gateway) reclaim(e *splice.Entry) error {
	k := g.kpath
	if k == nil || !e.Offloaded() {
		return nil
	}
	demoted, err := e.Reclaim(func() (splice.State, error) {
		st, err := k.dp.Demote(e.ID, e.Keys)
		notAhead(&st, monotime.Now(), nil)
		return st, err
	}, monotime.Now())
	if errors.Is(err, splice.ErrHandoff) {
		return err
	}
	if err != nil {
		k.dp.DeleteFlow(e.ID, e.Keys)
		return fmt.Errorf("demote flow %d from the bpf datapath: %w", e.ID, err)
	}
	if !demoted {
		return nil
	}
	k.demotions.Add(1)
	g.log.Debug("flow demoted from the bpf datapath", logging.KeyFlow, e.ID)
	return nil
}

// syncOffloaded refreshes the engine's view of every promoted flow from
// the program's state, for the reaper and the API. The caller must not
// hold splicedMu. The map is read a batch of flows per system call, and
// splicedMu is held only to find each batch's flows. Before, the reaper
// held it while it read every flow, one system call each, four times a
// second: in the memory bench (9,900 flows spliced at once, bpf
// datapath) a sync took 667-758 ms while the flows were being spliced,
// and every splice and every packet the program passed back
// (forwardOffloaded) waited for the lock meanwhile (11,579 goroutines at
// once, about 3,000 of them waiting for it); 52-67 ms once all were
// spliced, 10-33 ms now. A flow demoted meanwhile is left alone
// (SetSnapshot changes only an offloaded flow's view).
func (g *Gateway) syncOffloaded(now int64) {
	k := g.kpath
	if k == nil {
		return
	}
	var flows [bpf.FlowBatch]*splicedFlow
	err := k.dp.EachFlow(func(ids []uint64, states []splice.State) {
		g.splicedMu.Lock()
		for i, id := range ids {
			flows[i] = g.spliced[id]
		}
		g.splicedMu.Unlock()
		for i, sf := range flows[:len(ids)] {
			if sf == nil || sf.entry.ID != ids[i] {
				continue // not spliced any more, or not yet
			}
			st := states[i]
			// Read after the map: no time the program wrote before is later.
			notAhead(&st, monotime.Now(), sf.entry.Snapshot)
			sf.entry.SetSnapshot(st, now)
		}
	})
	if err != nil {
		if ok, suppressed := g.syncLog.Allow("sync"); ok {
			g.log.Warn("read the bpf datapath's flows; idle and finished flows on it are not seen until this works", logging.Err(err), "suppressed", suppressed)
		}
	}
}

// notAhead keeps the times of a state read from the program's maps or
// the nfqueue datapath's record (its last packet, its FINs') from lying
// after now. Every time this version writes there is on the monotonic
// clock, but an earlier version's may be left: its program counted
// CLOCK_BOOTTIME, ahead by the time the host slept, and its daemon wrote
// unix times converted with an offset taken when it started, so ahead by
// any forward step of the wall clock since (hours or months after NTP
// set a stale clock). Read as they are, such a flow looked neither idle
// nor lingered for that long, a dead one kept that long, and the FINs'
// repeats were dropped as duplicates. A time after now is taken as the
// engine's view had it (before, nil: now); the adopted flow's view was
// set so when it was adopted, and the program's next packet writes a
// time of this clock.
func notAhead(st *splice.State, now int64, before func() splice.Flow) {
	if st.LastSeen <= now && st.Dirs[0].FINAt <= now && st.Dirs[1].FINAt <= now {
		return
	}
	var was splice.State
	if before != nil {
		snap := before()
		was = snap.State()
	}
	keep := func(t *int64, prev int64) {
		if *t > now {
			*t = now
			if prev != 0 && prev <= now {
				*t = prev
			}
		}
	}
	keep(&st.LastSeen, was.LastSeen)
	for d := range st.Dirs {
		keep(&st.Dirs[d].FINAt, was.Dirs[d].FINAt)
	}
}

// retireOffloaded removes a retired flow's program entry.
func (g *Gateway) retireOffloaded(sf *splicedFlow) {
	if k := g.kpath; k != nil && sf.entry.Offloaded() {
		if err := k.dp.DeleteFlow(sf.entry.ID, sf.entry.Keys); err != nil {
			g.log.Error("remove the bpf datapath's entry", logging.KeyFlow, sf.entry.ID, logging.Err(err))
		}
	}
}

// forwardOffloaded handles a queued packet of a promoted flow: a
// straggler is dropped (see promote); a packet the program passed on is
// the Go engine's: the flow is taken back (reclaim) and done is false,
// for the caller to process the packet with the engine.
func (g *Gateway) forwardOffloaded(e *splice.Entry, np *nfq.Packet) (dec nfq.Decision, done bool) {
	k := g.kpath
	g.splicedMu.Lock()
	sf := g.spliced[e.ID]
	g.splicedMu.Unlock()
	// During a handoff every packet of the flow is a straggler,
	// whatever the bound from an earlier promotion says.
	if sf == nil || e.HandingOff() || sf.straggler(np.ID) {
		k.stragglers.Add(1)
		return nfq.Drop, true
	}
	if err := g.reclaim(e); errors.Is(err, splice.ErrHandoff) {
		k.stragglers.Add(1) // a handoff began since the check above
		return nfq.Drop, true
	} else if err != nil {
		g.log.Warn("packet passed on by the bpf datapath", logging.KeyFlow, e.ID, logging.Err(err))
		return nfq.Drop, true
	}
	sf.passedBack(monotime.Now())
	return 0, false
}

// passedBack records that the program passed one of the flow's packets
// on and the flow came back to the Go engine at now (monotime).
func (sf *splicedFlow) passedBack(now int64) {
	if at := sf.repromotedAt.Load(); at != 0 && now-at < int64(repromoteQuick) {
		sf.quickReturns.Add(1)
	} else {
		sf.quickReturns.Store(0)
	}
	sf.passOns.Add(1)
	sf.passedOn.Store(now)
}

// repromoteDue reports whether a flow the program passed back to the Go
// engine (a packet it does not handle, see forwardOffloaded) should go
// back to the program at now (splicedMu held). One odd packet, which
// anyone who knows the tuple can forge, would otherwise keep a flow on
// the slower path for the rest of its life; a flow whose packets keep
// coming back waits longer each time: a second after its first return,
// doubling up to repromoteMax.
func (sf *splicedFlow) repromoteDue(now int64) bool {
	at := sf.passedOn.Load()
	if at == 0 || sf.finished != 0 || sf.entry.Offloaded() || sf.flow.State() != proxy.StateSpliced ||
		sf.quickReturns.Load() >= repromoteGiveUp {
		return false
	}
	wait := repromoteMax
	if n := max(sf.passOns.Load(), 1); n <= 7 {
		wait = min(time.Second<<(n-1), repromoteMax)
	}
	return time.Duration(now-at) >= wait
}

// repromoteMax is the longest a flow the program passed back waits before
// it is promoted again.
const repromoteMax = time.Minute

// A flow that comes back within repromoteQuick of being promoted again,
// repromoteGiveUp times in a row, is not promoted again: its packets are
// ones the program cannot handle (each promotion would cost it the
// packets queued meanwhile, dropped as stragglers, for nothing).
const (
	repromoteQuick  = time.Second
	repromoteGiveUp = 3
)

// repromote promotes flows again (repromoteDue), one after the other on
// a transition worker: a promotion waits for the queue and its barrier,
// which the reaper must not, and the daemon's end waits for it as for
// any transition (a flow in its handoff has no map entry yet). A round
// still running leaves the next round's flows to the reaper's next tick.
func (g *Gateway) repromote(flows []*splicedFlow) {
	if len(flows) == 0 || g.kpath == nil || g.stopping.Load() || !g.repromoting.CompareAndSwap(false, true) {
		return
	}
	g.runTransition(func() {
		defer g.repromoting.Store(false)
		for _, sf := range flows {
			if g.stopping.Load() {
				return
			}
			sf.passedOn.Store(0)
			sf.repromotedAt.Store(monotime.Now())
			g.log.Debug("promoting again a flow the bpf datapath passed back", logging.KeyFlow, sf.entry.ID, "returns", sf.passOns.Load())
			g.promote(sf)
		}
	})
}

// bpfVerdictName names the program's counter i.
func bpfVerdictName(i int) string {
	switch i {
	case bpf.CounterPass:
		return "pass"
	case bpf.CounterError:
		return "error"
	case bpf.CounterRedirect:
		return "redirected"
	}
	return splice.Verdict(i).String()
}

// bpfCounters returns the program's per-verdict packet counts by name, or
// nil without the program.
func (g *Gateway) bpfCounters() map[string]uint64 {
	k := g.kpath
	if k == nil {
		return nil
	}
	c, err := k.dp.Counters()
	if err != nil {
		return nil
	}
	out := map[string]uint64{}
	for i, n := range c {
		out[bpfVerdictName(i)] = n
	}
	return out
}

// datapathOf names the datapath a spliced flow is on.
func datapathOf(e *splice.Entry) string {
	if e.Offloaded() {
		return "bpf"
	}
	return "nfqueue"
}
