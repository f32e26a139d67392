// Package gateway is the daemon's core: it owns the configuration, the
// flow table and the kernel state, starts a proxy per service, moves flows
// from the proxies into the splice engine (package splice) fed by NFQUEUE
// (package nfq), serves the control API, repairs its table when someone
// changes it, and reloads its configuration.
//
// Startup order matters: first everything a flow may need (the splice
// machinery: queues, engine, diverter, raw socket), then the listeners and
// their proxies, then the nftables table and policy routing, so that no SYN
// is ever diverted to a port nobody listens on and no flow is accepted
// before it can be spliced (after a kill -9 the old table still hands
// SYNs to the listeners the moment they exist). Shutdown is the reverse:
// the table goes first, so new flows are routed untouched while the
// proxies close.
//
// Shared state: the configuration and the rules it installs are one
// immutable snapshot behind an atomic pointer, replaced whole by Reload.
// The splice machinery is built once (at the start, or by the reload that
// first enables splicing) and published through an atomic flag before
// any flow or goroutine can use it; it is never replaced. Lock order:
// rulesMu, then the diverter's lock (Exclusive), then splicedMu or
// transitions.mu; mu (services) is never held with another.
//
// What happens to flows when the daemon goes: proxied flows end with their
// sockets. Spliced flows on the Go engine live only in the daemon's
// memory; once it is gone their packets are dropped (the queues have no
// bypass: an unrewritten packet would corrupt the flow) and, after a clean
// shutdown removed the table, reach the ends unrewritten, which answer
// with resets. Flows on the bpf datapath live in pinned maps: after a kill
// -9 the kernel keeps rewriting them and the next daemon adopts them
// (adopt.go); a clean shutdown resets them and removes the pins.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/internal/workpool"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	_ "spliced/proxy/all" // every proxy kind
	"spliced/rules"
	"spliced/splice"
	"spliced/splice/bpf"
)

// Gateway runs the services of one configuration.
type Gateway struct {
	log     *slog.Logger
	flows   *proxy.FlowTable
	started time.Time

	// The configuration and kernel state in force; Reload replaces them.
	snap    atomic.Pointer[snapshot]
	rulesMu sync.Mutex // serializes the start, table installs (reload, repair) and starting the splice machinery
	running bool       // between a complete start and the shutdown (rulesMu)

	mu       sync.Mutex
	services map[string]*service

	// The splice machinery; nil until a service splices, then never
	// replaced. The fields below are set before splicing is published
	// and never written again: code that may run before (the reaper, the
	// control API, metrics) checks splicing() first; the packet path and
	// Splice run only after.
	spliceOn    atomic.Bool // publishes the fields below
	engine      *splice.Table
	diverter    *rules.Diverter
	queues      *nfq.Set
	inject      *injector
	conntrack   *conntrackCleaner
	transitions transitions
	counters    engineCounters
	nextQueue   atomic.Uint32
	// workers run the transitions (see transitionWorker).
	workers *workpool.Pool
	kpath   *kernelPath // the bpf datapath; nil with nfqueue
	// store: with nfqueue, the record of spliced flows that outlives the
	// daemon (see store.go); nil without. storeSynced: the reaper's
	// last refresh of it.
	store *bpf.Datapath
	// storeMu: closeStore holds it to write, the store's users (a
	// splice's worker records its flow after the splice returned,
	// unsplices and the reaper remove or refresh records) to read, and
	// they check storeClosed under it.
	storeMu     sync.RWMutex
	storeClosed atomic.Bool
	storeSynced time.Time
	// queueDrops: the reaper's watch of the kernel's drops before the
	// queues (see checkQueueDrops).
	queueDrops queueDropWatch
	// pendingStored: flows adopted from the record, not yet handed to
	// the engine (see activateStored).
	pendingStored []*splicedFlow

	splicedMu sync.Mutex
	spliced   map[uint64]*splicedFlow
	// jumped holds the 4-tuples of transparent upstream connections whose
	// server may still remember a jumped timestamp (see avoidPort).
	jumped map[[2]netip.AddrPort]time.Time
	// passthrough holds the transitions of unspliced flows, by flow ID.
	passthrough map[uint64]*transition
	// retiring: flows whose passthrough is ending (retirePassthrough),
	// closed when it has; a new splice of the flow waits for it.
	retiring map[uint64]chan struct{}

	restoreSysctls func()
	// removePins: stopping detaches the bpf datapath and removes its
	// pins (a shutdown); otherwise (a failed start) they stay.
	removePins bool
	// handingOver: HandOver was called.
	handingOver atomic.Bool
	// transitionsRunning counts splices and unsplices under way on the
	// workers (see runTransition), which leave waits for: a flow in one
	// is neither the engine's nor the program's for sure.
	transitionsRunning atomic.Int32
	events             events
	lastDrift          string // the drift last reported with kernel.repair off
	// driftLeft: the drift the last check left in place (kernel.repair
	// off, or its repair failed), for the status; nil when none.
	driftLeft atomic.Pointer[string]
	// firewallDrops: the forward chains checkFirewall last found
	// dropping spliced flows (written under rulesMu).
	firewallDrops  atomic.Pointer[[]rules.UntrackedDrop]
	firewallUnread bool // the last check could not read the ruleset (under rulesMu)
	// markRoute: what checkMarkRouting last found (nil: marks route
	// nothing); markRouteSaid: what its logs said (under rulesMu).
	markRoute         atomic.Pointer[markRouting]
	markRouteSaid     *markRouting
	markRoutingUnread bool // the last check could not read them (under rulesMu)
	// sourceNATs: the conflicts checkSourceNAT last found
	sourceNATs      atomic.Pointer[[]SourceNATConflict]
	sourceNATUnread bool // the last check could not read the ruleset (under rulesMu)
	// bridgeNF: what checkBridgeNetfilter last found
	bridgeNF     problemState
	firewallPoke chan struct{}   // another table changed (see watchFirewall)
	divertLost   lostTuples      // divert entries another process deleted (see restoreDivert)
	rebuiltECN   rebuiltECN      // rebuilt sockets whose connection negotiated ECN (see ecn.go)
	rpf          rpfFilter       // strict reverse path filtering (see rpfilter.go)
	fwd          forwardingState // forwarding turned off (see forwarding.go)
	families     spliceRefusal   // flows of two address families (see proxy.TwoFamilies)
	linkLocal    spliceRefusal   // flows with a link-local peer (linkLocalPeer)

	// acceptLocalNeeded: spliced NAT flows need accept_local, which
	// spliced set (or found set); acceptLocalOff: it is 0 again and
	// could not be set (see checkAcceptLocal).
	acceptLocalNeeded atomic.Bool
	acceptLocalOff    problemState

	spliceLatency            latencies
	phases                   [numSteps]latencies // see phase
	spliceCost, unspliceCost movingCost          // see TransitionCosts
	spliceAborts             atomic.Uint64
	// lateBytes counts captures undone because a socket received bytes
	// after its queues were found empty (see lateBytes).
	lateBytes                 atomic.Uint64
	unsplices, unspliceAborts atomic.Uint64
	// passthroughsRetired: unspliced flows whose divert entries went
	// (retirePassthrough).
	passthroughsRetired atomic.Uint64
	injectErrors        atomic.Uint64
	// Taken-over packets sent whole (gso.go), and segments sent
	// through the raw socket.
	injectedGSO, injectedSegments atomic.Uint64
	gsoWarned                     atomic.Bool // the sender's sockets failed to open; said once
	// Splices whose divert entries went in by command packets, and by
	// netlink; whether commands work here (see checkDivertCommands).
	divertCommands, divertNetlink atomic.Uint64
	divertMode                    atomic.Int32
	divertLog                     *logging.Limiter
	mapLog                        *logging.Limiter // flows the bpf flow maps refused (promote, storeFlow)
	syncLog                       *logging.Limiter // failed reads of the bpf datapath's flows
	offloadSynced                 atomic.Int64     // when the reaper last read them (monotime)
	stalledFlows                  atomic.Uint64
	// repromoting: a round of repromote runs. stopping: the daemon is
	// ending (shutdown or leave): no more of them.
	repromoting, stopping atomic.Bool
	// resetFlows: the spliced flows reset while stopping, whose
	// packets the packet path answers (see reset.go).
	resetFlows resetFlows
	// lost: the tuples an earlier daemon left diverted whose flows
	// nobody continues (see lost.go).
	lost                orphanTuples
	stallLog            *logging.Limiter
	reloads             atomic.Int64
	divertRefreshOK     atomic.Uint64
	divertRefreshErrors atomic.Uint64
	repairs             atomic.Int64
	// Bytes of flows that ended, by engine and direction, and the
	// splice engine's packets; bytes the engine moved for flows that
	// unsplices gave back to their proxies, in the flows' counters (see
	// totals.go).
	closedProxied, closedSpliced [2]atomic.Uint64
	closedSplicedPackets         [2]atomic.Uint64
	splicedFolded                [2]atomic.Uint64
	// totals is what Status reported of the engines' totals.
	totals totals
}

// serviceProxy is the proxy serving one service, of the kind its
// configuration names (see proxy.Register).
type serviceProxy = proxy.Service

type service struct {
	cfg       *config.Service
	listeners []*net.TCPListener
	proxy     serviceProxy
	stop      context.CancelFunc
	done      chan struct{}
}

// snapshot is a configuration and the rules it installs. It is never
// changed once published: Reload publishes a new one.
type snapshot struct {
	cfg   *config.Config
	rules *rules.Manager // its spec is rules.FromConfig(cfg), divert forced on once splicing runs
	// ended: the services of earlier configurations that cfg no longer
	// has, by name, as they were last configured: their flows run on
	// after a reload removed them, and keep their settings (see
	// serviceOf).
	ended map[string]*config.Service
}

// serviceOf is the configuration of the service a flow belongs to: the
// one in force, or, for a service a reload removed, the one it had then.
// Nil for a service neither knows (an adopted flow's, removed before the
// restart): its flows take the defaults.
func (g *Gateway) serviceOf(name string) *config.Service {
	snap := g.snap.Load()
	if s := snap.cfg.Service(name); s != nil {
		return s
	}
	return snap.ended[name]
}

// endedServices is what snapshot.ended becomes when cfg replaces old,
// whose own ended services were ended: old's services that cfg does not
// have join them, and those cfg has again leave, as do those that have
// no flow any more (running says which have): kept for good, every name
// a reload ever removed stayed for the daemon's life, and with it the
// configuration it came from. Old's are kept whatever their flows: their
// proxies, stopped after this, may still admit one.
func endedServices(old *config.Config, ended map[string]*config.Service, cfg *config.Config, running func(service string) bool) map[string]*config.Service {
	out := map[string]*config.Service{}
	for name, s := range ended {
		if cfg.Service(name) == nil && running(name) {
			out[name] = s
		}
	}
	for i := range old.Services {
		if s := old.Services[i]; cfg.Service(s.Name) == nil {
			out[s.Name] = &s // a copy: not the whole configuration kept for it
		}
	}
	return out
}

// New returns a gateway for cfg. It touches nothing until Run.
func New(cfg *config.Config, log *slog.Logger) *Gateway {
	g := &Gateway{
		log:          log,
		flows:        proxy.NewFlowTable(cfg.Limits.MaxFlows),
		services:     map[string]*service{},
		spliced:      map[uint64]*splicedFlow{},
		jumped:       map[[2]netip.AddrPort]time.Time{},
		passthrough:  map[uint64]*transition{},
		retiring:     map[uint64]chan struct{}{},
		stallLog:     logging.NewLimiter(time.Second),
		firewallPoke: make(chan struct{}, 1),
		divertLog:    logging.NewLimiter(time.Minute),
		syncLog:      logging.NewLimiter(time.Minute),
		mapLog:       logging.NewLimiter(time.Minute),
		workers:      workpool.New(transitionWorkerIdle, transitionWorkersIdleMax),
	}
	g.flows.SetClientIPv6Prefix(cfg.Limits.ClientIPv6Prefix)
	g.flows.SetMaxPerClient(cfg.Limits.MaxFlowsPerClient)
	g.snap.Store(&snapshot{cfg: cfg, rules: rules.NewManager(rules.FromConfig(cfg))})
	return g
}

// config is the configuration in force.
func (g *Gateway) config() *config.Config { return g.snap.Load().cfg }

// manager is the rules manager in force.
func (g *Gateway) manager() *rules.Manager { return g.snap.Load().rules }

// splicing reports whether the splice machinery runs. Code that may run
// before it was published must ask before touching it.
func (g *Gateway) splicing() bool { return g.spliceOn.Load() }

// Flows is the gateway's flow table.
func (g *Gateway) Flows() *proxy.FlowTable { return g.flows }

// Run starts every service, installs the kernel state, calls ready (may be
// nil), and runs until ctx is done; then it removes what it installed and
// ends every flow.
func (g *Gateway) Run(ctx context.Context, ready func()) error {
	g.started = time.Now()
	cfg := g.config()
	// Before anything is touched: a second daemon on this table would
	// replace the first one's table and end the flows it recorded.
	unlock, err := lockDaemon(cfg)
	if err != nil {
		return err
	}
	defer unlock()
	// A reload (SIGHUP) waits until the start is complete.
	g.rulesMu.Lock()
	g.primeMarkRouting()
	// Everything a flow may need exists before the first listener does:
	// after a kill -9 the old table is still installed and hands SYNs to
	// our ports as soon as something listens there.
	if err := g.prepareSplicing(ctx, cfg, g.manager()); err != nil {
		g.abortStart()
		g.rulesMu.Unlock()
		return err
	}
	if m := g.withSkipMark(g.manager()); m != g.manager() {
		g.snap.Store(&snapshot{cfg: cfg, rules: m, ended: g.snap.Load().ended})
	}
	warnOtherPins(cfg, g.log)
	// Before any flow gets an ID, and before the table is replaced: the
	// new one carries the adopted flows' divert entries.
	if g.kpath != nil {
		g.adoptPinned()
	} else if err := dropPinned(cfg, g.inject, g.log); err != nil {
		g.log.Error("end the flows pinned by an earlier daemon's bpf datapath", logging.Err(err))
	}
	if g.store != nil {
		g.adoptStored()
	} else if err := dropStored(cfg, g.inject, g.log); err != nil {
		g.log.Error("end the flows an earlier daemon recorded for the nfqueue datapath", logging.Err(err))
	}
	g.acceptLocalForAdopted(cfg)
	for i := range cfg.Services {
		if err := g.startService(&cfg.Services[i]); err != nil {
			g.abortStart()
			g.rulesMu.Unlock()
			return err
		}
	}
	// A flow may have been spliced already: the old table took its SYN
	// to a listener started above, and its divert entries went into the
	// old table's sets. The new table carries them (installLive: no
	// splice adds or removes an entry meanwhile).
	if err := g.installAtStart(g.manager()); err != nil {
		g.manager().Remove()
		g.shutdown()
		g.rulesMu.Unlock()
		return err
	}
	if g.lost.on.Load() {
		g.probeLost()
	}
	g.activateStored()
	g.checkFirewall()
	g.running = true
	g.rulesMu.Unlock()
	stop := func() error {
		g.rulesMu.Lock()
		g.running = false
		g.rulesMu.Unlock()
		return g.shutdown()
	}
	stopControl, err := g.serveControl(ctx, cfg.Control.Socket, cfg.Control.Group)
	if err != nil {
		stop()
		return err
	}
	defer stopControl()
	stopMetrics, err := g.serveMetrics(cfg.Metrics.Listen)
	if err != nil {
		stop()
		return err
	}
	defer stopMetrics()
	stopPprof, err := servePprof(cfg.Debug.Pprof)
	if err != nil {
		stop()
		return err
	}
	defer stopPprof()

	bg, stopBG := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		g.reaper(bg, 250*time.Millisecond)
	}()
	go func() {
		defer wg.Done()
		g.refresher(bg)
	}()
	go func() {
		defer wg.Done()
		g.watchRuleset(bg)
	}()
	g.logReady()
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	g.log.Info("shutting down")
	stopBG()
	wg.Wait()
	g.logStats()
	if g.handingOver.Load() && g.keepsFlows() {
		g.rulesMu.Lock()
		g.running = false
		g.rulesMu.Unlock()
		g.leave()
		return ErrHandedOver
	}
	return stop()
}

// ErrHandedOver is Run's result after HandOver: the daemon left its
// spliced flows to the kernel.
var ErrHandedOver = errors.New("spliced flows left in the kernel for the next daemon to adopt")

// HandOver makes Run, once its context is done, leave the spliced flows
// for a new daemon to adopt (spliced does this on SIGUSR2) instead of
// resetting them, as after a kill -9: on the bpf datapath they keep
// running (pins, links, table and divert entries stay); on nfqueue the
// record of them stays, with the table and its divert entries, which
// hold their packets until the next daemon reads the queues. Without
// either (no bpffs) the shutdown is the ordinary one: the flows' state
// lives in the daemon. Before, SIGUSR2 on nfqueue (the default) was the
// ordinary shutdown and exited with status 0: the systemd unit
// (Restart=on-failure) did not start spliced again, and the gateway was
// left without it, its flows reset.
func (g *Gateway) HandOver() { g.handingOver.Store(true) }

// keepsFlows reports whether spliced flows can outlive the daemon: they
// are pinned for the bpf datapath, or recorded for nfqueue.
func (g *Gateway) keepsFlows() bool {
	return g.kpath != nil && g.kpath.dp.PinDir() != "" || g.store != nil
}

// leave ends the daemon without ending the flows the next daemon can
// adopt (the program's, the record's): other spliced flows are reset,
// since nobody can continue them; proxied flows end with their sockets;
// the table, its divert entries and the sysctls stay (spliced NAT flows
// need accept_local).
func (g *Gateway) leave() {
	// No proxy splices or takes back a flow from here on; transitions
	// under way end (a splice still draining fails on its closed
	// sockets), promotions included: a flow in its handoff has no map
	// entry yet, and one written after the daemon closed its maps would
	// never come.
	g.stopping.Store(true)
	g.stopServices()
	if !awaitNone(&g.transitionsRunning, leaveTransitionWait) {
		g.log.Warn("leaving while transitions still run; their flows are reset", "transitions", g.transitionsRunning.Load())
	}
	goEngine, kept := g.partitionForLeave()
	if len(goEngine) > 0 {
		g.log.Info("resetting spliced flows on the Go engine", "flows", len(goEngine), "packets", g.resetSpliced(goEngine))
	}
	if g.kpath != nil {
		g.log.Info("leaving spliced flows to the bpf datapath", "flows", kept, "pins", g.kpath.dp.PinDir())
	} else {
		g.log.Info("leaving spliced flows in the nfqueue datapath's record", "flows", kept, "pins", g.store.PinDir())
	}
	// removePins is false: the pins and links stay, and so does the
	// record, with the last state of its flows.
	g.stopSplicing()
	// The table stays, orphaned, for the next daemon to adopt: it may
	// start as soon as Run returns.
	g.manager().Close()
}

// leaveTransitionWait bounds how long leave waits for transitions under
// way: once the proxies have stopped, a splice or an unsplice lasts at
// most a drain that fails at once, a capture or rebuild, a release and a
// promotion (promoteQuietWait and one queue barrier).
const leaveTransitionWait = 2 * time.Second

// awaitNone waits until n is zero, for at most d, and reports whether it
// is.
func awaitNone(n *atomic.Int32, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for n.Load() > 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// runTransition runs a splice's or an unsplice's work on a transition
// worker, counted in transitionsRunning until it returns.
func (g *Gateway) runTransition(fn func()) {
	g.transitionsRunning.Add(1)
	g.workers.Go(func() {
		defer g.transitionsRunning.Add(-1)
		fn()
	})
}

// partitionForLeave sorts the spliced flows for leave: the ones the
// program rewrites, and on nfqueue those in the record (counted: they
// stay), and the other unfinished ones on the Go engine (returned: nobody
// would continue them). A flow still in its handoff (a transition leave
// gave up waiting for) goes with the Go engine's, reset rather than left
// without a datapath.
func (g *Gateway) partitionForLeave() (goEngine []*splicedFlow, kept int) {
	g.syncOffloaded(monotime.Now())
	g.splicedMu.Lock()
	defer g.splicedMu.Unlock()
	for _, sf := range g.spliced {
		switch offloaded, handing := sf.entry.OffloadState(); {
		case offloaded && !handing, !handing && sf.stored.Load():
			kept++
		case handing || !sf.entry.Snapshot().Finished():
			goEngine = append(goEngine, sf)
		}
	}
	return goEngine, kept
}

func (g *Gateway) logReady() {
	spec := g.manager().Spec()
	cfg := g.config()
	queue := "none"
	if spec.Divert.Enabled {
		queue = fmt.Sprintf("%d-%d (%s, %s)", spec.Divert.Queue, spec.Divert.Queue+spec.Divert.Queues-1, queueKind(spec.Divert.NativeQueue), cfg.Kernel.NFQueue)
	}
	g.log.Info("ready", logging.KeyTable, "inet "+spec.Table, "services", len(cfg.Services), "datapath", g.datapathName(),
		"mark", fmt.Sprintf("0x%x", spec.Mark), "route_table", spec.RouteTable, logging.KeyQueue, queue,
		logging.KeyFile, cfg.File, "control", cfg.Control.Socket, "version", Version())
}

func queueKind(native bool) string {
	if native {
		return "nft queue"
	}
	return "xt NFQUEUE"
}

// prepareSplicing starts the splice machinery when cfg needs it (m
// installs its rules) and it is not running yet, and sets the sysctls it
// needs. Run and Reload call it, never at the same time.
func (g *Gateway) prepareSplicing(ctx context.Context, cfg *config.Config, m *rules.Manager) error {
	if d := m.Spec().Divert; d.Enabled && !g.splicing() {
		if err := g.startSplicing(ctx, cfg, m, d); err != nil {
			return err
		}
	}
	if needsAcceptLocal(cfg) && g.restoreSysctls == nil {
		restore, err := g.enableAcceptLocal(cfg.Kernel.Table)
		if err != nil {
			return err
		}
		g.restoreSysctls = restore
		g.acceptLocalNeeded.Store(true)
	}
	return nil
}

// acceptLocalForAdopted sets accept_local when an adopted flow needs it
// and cfg did not (prepareSplicing), and restores what a killed daemon
// recorded when nothing needs it: an IPv4 NAT flow spliced under an
// earlier configuration. A NAT service that no longer splices, or that a
// changed file removed, left its adopted flows' packets to the stack's
// martian check, which dropped every one until the flows idled out.
func (g *Gateway) acceptLocalForAdopted(cfg *config.Config) {
	if g.restoreSysctls != nil {
		return
	}
	if !g.adoptedNAT4() {
		// Nothing here needs it: the value a killed daemon recorded
		// before it set it goes back (it stayed 1 for good, the
		// record in /run/spliced with it).
		if err := restoreAcceptLocal(cfg.Kernel.Table); err != nil {
			g.log.Warn("restore net.ipv4.conf.all.accept_local, which a killed spliced set", logging.Err(err))
		}
		return
	}
	restore, err := g.enableAcceptLocal(cfg.Kernel.Table)
	if err != nil {
		g.log.Error("adopted IPv4 NAT flows need net.ipv4.conf.all.accept_local; their packets are dropped as martians until it is set", logging.Err(err))
		return
	}
	g.restoreSysctls = restore
	g.acceptLocalNeeded.Store(true)
}

// adoptedNAT4 reports whether a spliced flow (at the start: an adopted
// one) is an IPv4 NAT flow: its server leg leaves from another address
// than its client's.
func (g *Gateway) adoptedNAT4() bool {
	g.splicedMu.Lock()
	defer g.splicedMu.Unlock()
	for _, sf := range g.spliced {
		upstream, _ := sf.flow.ServerLeg()
		if sf.flow.Client.Addr().Is4() && upstream.Addr() != sf.flow.Client.Addr() {
			return true
		}
	}
	return false
}

// abortStart undoes a start that failed before the table was installed;
// whatever an earlier daemon left installed stays.
func (g *Gateway) abortStart() {
	g.stopServices()
	g.stopSplicing()
	g.manager().Close()
	if g.restoreSysctls != nil {
		g.restoreSysctls()
	}
}

func (g *Gateway) shutdown() error {
	g.stopping.Store(true)
	if g.splicing() {
		// Before the table goes: see Diverter.Stop. A splice that has
		// not diverted its flow yet fails, and its flow stays proxied
		// until the proxies stop.
		g.diverter.Stop()
	}
	g.removePins = true
	// Spliced flows cannot outlive the daemon (their rewrite state lives
	// in it): end them at both ends before the table goes, and once the
	// proxies have stopped, those whose splice completed meanwhile.
	reset := map[*splicedFlow]bool{}
	resetLive := func() {
		var live []*splicedFlow
		g.syncOffloaded(monotime.Now())
		g.splicedMu.Lock()
		for _, sf := range g.spliced {
			if !reset[sf] && !sf.entry.Snapshot().Finished() {
				reset[sf] = true
				live = append(live, sf)
			}
		}
		g.splicedMu.Unlock()
		if len(live) > 0 {
			g.log.Info("resetting spliced flows", "flows", len(live), "packets", g.resetToEnd(live))
		}
	}
	if g.splicing() {
		resetLive()
		if g.resetFlows.on.Load() {
			g.awaitResetAnswers()
			if n := g.resetFlows.answered.Load(); n > 0 {
				g.log.Info("reset again the ends whose first reset missed (a packet came from them after it)", "packets", n)
			}
		}
	}
	err := g.manager().Remove()
	if err != nil {
		g.log.Error("remove kernel state", logging.Err(err))
	}
	g.stopServices()
	if g.splicing() {
		// The proxies kept splicing until they stopped: a splice past its
		// capture completes (its sockets closed silently, in repair mode)
		// and its flow, spliced after the resets above, would be left to
		// no daemon, its ends waiting for ever. One still draining fails
		// on its closed sockets.
		if !awaitNone(&g.transitionsRunning, leaveTransitionWait) {
			g.log.Warn("stopping while transitions still run", "transitions", g.transitionsRunning.Load())
		}
		resetLive()
	}
	g.stopSplicing()
	g.workers.Close()
	// Last: a transition worker's late divert delete would open the
	// socket again.
	g.manager().Close()
	if g.restoreSysctls != nil {
		g.restoreSysctls()
	}
	return err
}

// LogState logs the engine's counters and, at debug level, the state of
// every spliced flow (spliced does this on SIGUSR1).
func (g *Gateway) LogState() {
	g.logStats()
	if !g.splicing() || !g.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	g.splicedMu.Lock()
	defer g.splicedMu.Unlock()
	for id, sf := range g.spliced {
		snap, st := sf.entry.Snapshot(), sf.entry.Stats()
		c2s, s2c := snap.Info(splice.C2S), snap.Info(splice.S2C)
		g.log.Debug("spliced flow", logging.KeyFlow, id, logging.KeyClient, sf.flow.Client, logging.KeyServer, sf.flow.Server,
			"finished", snap.Finished(), "idle_ms", monotime.Since(snap.LastSeen()).Milliseconds(),
			slog.Group("c2s", "packets", st[0].Packets, "bytes", st[0].Bytes, "dropped", st[0].Dropped, "last_drop", st[0].LastDrop.String(),
				"highest_seq", uint32(c2s.HighestSeq), "highest_ack", uint32(c2s.HighestAck), "window", c2s.Window, "fin", c2s.FIN),
			slog.Group("s2c", "packets", st[1].Packets, "bytes", st[1].Bytes, "dropped", st[1].Dropped, "last_drop", st[1].LastDrop.String(),
				"highest_seq", uint32(s2c.HighestSeq), "highest_ack", uint32(s2c.HighestAck), "window", s2c.Window, "fin", s2c.FIN))
	}
}

// logStats logs the daemon's memory and the splice engine's counters,
// for the record.
func (g *Gateway) logStats() {
	runtime.GC() // an operator asked: count live memory, not garbage
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	g.splicedMu.Lock()
	spliced := len(g.spliced)
	g.splicedMu.Unlock()
	g.log.Info("memory", "heap_inuse_bytes", ms.HeapInuse, "stack_inuse_bytes", ms.StackInuse,
		"goroutines", runtime.NumGoroutine(), "flows", g.flows.Len(), "spliced_flows", spliced)
	if !g.splicing() {
		return
	}
	attrs := []any{"splices", g.spliceLatency.count.Load(), "splice_aborts", g.spliceAborts.Load(), "captures_redone", g.lateBytes.Load(),
		"unsplices", g.unsplices.Load(), "unsplice_aborts", g.unspliceAborts.Load(), "passthroughs_retired", g.passthroughsRetired.Load(),
		"splice_p50_us", g.spliceLatency.percentile(0.5).Microseconds(), "splice_p99_us", g.spliceLatency.percentile(0.99).Microseconds(),
		"taken_over_packets", g.counters.stripped.Load(), "held_packets", g.counters.held.Load(), "held_dropped", g.counters.heldDropped.Load(), "inject_errors", g.injectErrors.Load(), "injected_gso", g.injectedGSO.Load(), "injected_segments", g.injectedSegments.Load(), "stalled_flows", g.stalledFlows.Load(),
		"divert_by_command", g.divertCommands.Load(), "divert_by_netlink", g.divertNetlink.Load(),
		"pmtu_translated", g.counters.pmtu[pmtuTranslated].Load(), "pmtu_no_flow", g.counters.pmtu[pmtuNoFlow].Load(), "pmtu_bad_checksum", g.counters.pmtu[pmtuBadChecksum].Load(), "pmtu_unparsed", g.counters.pmtu[pmtuUnparsed].Load()}
	if c := g.conntrack; c != nil {
		attrs = append(attrs, "conntrack_loosened", c.loosened.Load(), "conntrack_deleted", c.deleted.Load(), "conntrack_update_failed", c.failed.Load())
	}
	for v := range splice.NumVerdicts {
		if n := g.counters.verdicts[v].Load(); n > 0 {
			attrs = append(attrs, splice.Verdict(v).String(), n)
		}
	}
	if k := g.kpath; k != nil {
		attrs = append(attrs, "bpf_promotions", k.promotions.Load(), "bpf_promote_failures", k.promoteFailures.Load(),
			"bpf_promote_skipped", k.promoteSkipped.Load(),
			"bpf_demotions", k.demotions.Load(), "bpf_stragglers", k.stragglers.Load())
		for name, n := range g.bpfCounters() {
			if n > 0 {
				attrs = append(attrs, "bpf_"+name, n)
			}
		}
	}
	for _, q := range g.queues.Stats() {
		attrs = append(attrs, fmt.Sprintf("queue%d", q.Queue), fmt.Sprintf("received=%d modified=%d accepted=%d dropped=%d errors=%d overruns=%d reopens=%d truncated=%d kernel_queue_dropped=%d kernel_user_dropped=%d",
			q.Received, q.Modified, q.Accepted, q.Dropped, q.Errors, q.Overruns, q.Reopens, q.Truncated, q.Kernel.QueueDropped, q.Kernel.UserDropped))
	}
	g.log.Info("splice engine totals", attrs...)
}

// startSplicing builds the splice machinery: the engine, the raw socket,
// the conntrack cleaner, the diverter, and the queues (last: their readers
// use the rest at once), then publishes it.
func (g *Gateway) startSplicing(ctx context.Context, cfg *config.Config, m *rules.Manager, d rules.Divert) error {
	inj, err := newInjector(cfg.Kernel.Resend == config.ResendGSO)
	if err != nil {
		return err
	}
	div, err := m.NewDiverter()
	if err != nil {
		inj.Close()
		return err
	}
	g.inject, g.engine, g.diverter = inj, splice.NewTable(), div
	g.markRoutingToGSO()
	g.conntrack = newConntrackCleaner(g.log.With(logging.KeyComponent, "conntrack"))
	if err := g.startDatapath(cfg); err != nil {
		g.conntrack.Close()
		div.Close()
		inj.Close()
		g.inject, g.engine, g.diverter, g.conntrack = nil, nil, nil, nil
		return err
	}
	if g.kpath == nil {
		g.openStore(cfg)
	}
	qs, err := nfq.Open(context.WithoutCancel(ctx), nfq.Config{First: d.Queue, Count: d.Queues, MaxQueueLen: cfg.Kernel.QueueLen, Library: cfg.Kernel.NFQueue == "go-nfqueue"}, func(uint16) nfq.Handler {
		h := &packetHandler{g: g}
		return h.handle
	}, g.log.With(logging.KeyComponent, "nfq"))
	if err != nil {
		if g.kpath != nil {
			g.kpath.close(!g.kpath.dp.Reused())
			g.kpath = nil
		}
		g.closeStore(false)
		g.store = nil
		g.conntrack.Close()
		div.Close()
		inj.Close()
		g.inject, g.engine, g.diverter, g.conntrack = nil, nil, nil, nil
		return err
	}
	g.queues = qs
	g.spliceOn.Store(true)
	// Services that were started before splicing existed may now splice
	// on request.
	g.mu.Lock()
	for _, s := range g.services {
		s.proxy.SetSplicer(g)
	}
	g.mu.Unlock()
	return nil
}

func (g *Gateway) stopSplicing() {
	if !g.splicing() {
		return
	}
	g.queues.Close()
	if !g.removePins && g.handingOver.Load() {
		// No packet moves the recorded flows on now: their last state
		// is the one for the next daemon.
		g.storeLast()
	}
	if g.kpath != nil {
		// Detached and unpinned at a shutdown (the flows were reset);
		// after a failed start, pins stay for the flows of an earlier
		// daemon, and a later start.
		if err := g.kpath.close(g.removePins); err != nil {
			g.log.Error("detach the bpf datapath and remove its pins", logging.Err(err))
		}
	}
	g.closeStore(g.removePins)
	g.inject.Close()
	g.conntrack.Close()
	g.diverter.Close()
}

func (g *Gateway) startService(svc *config.Service) error {
	lns, err := proxy.ListenService(context.Background(), svc)
	if err != nil {
		return err
	}
	g.serveService(svc, lns)
	return nil
}

// serveService starts a service's proxy on its listeners.
func (g *Gateway) serveService(svc *config.Service, lns []*net.TCPListener) {
	ctx, cancel := context.WithCancel(context.Background())
	p, err := proxy.New(proxy.Setup{Service: svc, Flows: g.flows, Events: g.forwarderEvent, AvoidPort: g.avoidPort,
		Log: g.log.With(logging.KeyComponent, string(svc.Proxy), logging.KeyService, svc.Name)})
	if err != nil { // config accepts only registered kinds
		cancel()
		g.log.Error("service not started", logging.KeyService, svc.Name, logging.Err(err))
		for _, ln := range lns {
			ln.Close()
		}
		return
	}
	if g.splicing() {
		p.SetSplicer(g) // every service may splice on request once the engine runs
	}
	s := &service{cfg: svc, listeners: lns, proxy: p, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		if err := s.proxy.Serve(ctx, lns...); err != nil {
			g.log.Error("service stopped", logging.KeyService, svc.Name, logging.Err(err))
		}
	}()
	g.mu.Lock()
	g.services[svc.Name] = s
	g.mu.Unlock()
	g.log.Debug("service listening", logging.KeyService, svc.Name, "mode", string(svc.ListenMode), "port", svc.Listen, "ports", fmt.Sprint(svc.Ports), "listen_on", fmt.Sprint(svc.ListenOn))
}

// forwarderEvent turns a forwarder's flow events into API events and
// keeps the byte totals of ended flows.
func (g *Gateway) forwarderEvent(kind string, f *proxy.Flow, detail string) {
	if kind == proxy.EventClosed {
		g.closedProxied[0].Add(uint64(f.C2S.Load()))
		g.closedProxied[1].Add(uint64(f.S2C.Load()))
		g.endPassthrough(f)
	}
	g.flowEvent(kind, f, detail)
}

func (g *Gateway) stopServices() {
	g.mu.Lock()
	svcs := g.services
	g.services = map[string]*service{}
	g.mu.Unlock()
	for _, s := range svcs {
		s.stop()
	}
	for _, s := range svcs {
		<-s.done
		s.proxy.CloseFlows()
	}
}

// pinnedFlows counts the flows pinned in dir (the bpf datapath's pins or
// the nfqueue datapath's record); 0 when there are none or they cannot be
// read.
func pinnedFlows(dir string) int {
	if !bpf.HasPins(dir) {
		return 0
	}
	dp, err := bpf.OpenPinned(dir)
	if err != nil || dp == nil {
		return 0
	}
	defer dp.Close()
	flows, _, _ := dp.PinnedFlows()
	return len(flows)
}

// divertedTuples counts the tuples the table of cfg diverts; 0 when
// there is no table or it cannot tell.
func divertedTuples(cfg *config.Config) int {
	m := rules.NewManager(rules.FromConfig(cfg))
	defer m.Close()
	d, err := m.NewDiverter()
	if err != nil {
		return 0
	}
	keys, _ := d.Tuples()
	return len(keys)
}

// Cleanup removes the kernel state a configuration would install, for
// `spliced -cleanup` after the daemon was killed: the flows the bpf
// datapath still rewrites from its pins are reset at both ends and the
// pins removed (see dropPinned), then the table and policy routing go.
//
// With keepFlows the pins and the nfqueue datapath's record stay, for the
// restart that adopts their flows (the systemd unit's clean-up after a
// failure); while there are such flows, or divert entries of flows the
// next daemon is to reset, the table stays with its divert chains and
// sets only (rules.CleanupKeepDivert), so that their packets are dropped
// until then, never delivered unrewritten.
func Cleanup(cfg *config.Config, log *slog.Logger, keepFlows bool) error {
	unlock, err := lockDaemon(cfg)
	if err != nil {
		return fmt.Errorf("cleanup: %w (a running daemon removes its own state when it stops)", err)
	}
	defer unlock()
	var errs []error
	if !keepFlows {
		if err := dropPinned(cfg, nil, log); err != nil {
			errs = append(errs, err)
		}
		if err := dropStored(cfg, nil, log); err != nil {
			errs = append(errs, err)
		}
	}
	// Kept flows need the divert chain: without it their packets reach
	// the ends unrewritten until the next daemon installs its table. So
	// do the flows the next daemon cannot continue (see orphanTuples),
	// which it finds by their divert entries, to reset them.
	removeTable := rules.Cleanup
	if keepFlows && (pinnedFlows(pinDir(cfg)) > 0 || pinnedFlows(storeDir(cfg)) > 0 || divertedTuples(cfg) > 0) {
		removeTable = rules.CleanupKeepDivert
	}
	if err := removeTable(rules.FromConfig(cfg), 0); err != nil {
		errs = append(errs, err)
	}
	// With -keep-flows too: the unit runs it after every failure, also
	// the last one before its start limit stops it for good, and nothing
	// would put the setting back then. The next daemon sets it again as
	// it starts; until then a kept NAT flow forwarded by the stack
	// (kernel.bpf_forward: stack) loses packets, which TCP resends.
	if err := restoreAcceptLocal(cfg.Kernel.Table); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}
