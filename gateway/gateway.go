// Package gateway is the daemon's core: it owns the configuration, the
// flow table and the kernel state, starts a proxy per service, and moves
// flows from the proxies into the splice engine (package splice) fed by
// NFQUEUE (package nfq).
//
// Startup order matters: listeners first, then the nftables table and
// policy routing, so that no SYN is ever diverted to a port nobody listens
// on; the queues are bound before any flow is diverted to them. Shutdown is
// the reverse: the table goes first, so new flows are routed untouched
// while the proxies close.
//
// What happens to flows when the daemon goes: proxied flows end with their
// sockets. Spliced flows live only in the daemon's memory; once it is gone
// their packets are dropped (the queues have no bypass: an unrewritten
// packet would corrupt the flow) and, after a clean shutdown removed the
// table, reach the ends unrewritten, which answer with resets.
package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"spliced/config"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/rules"
	"spliced/splice"
)

// Gateway runs the services of one configuration.
type Gateway struct {
	cfg   *config.Config
	log   *slog.Logger
	rules *rules.Manager
	flows *proxy.FlowTable

	mu       sync.Mutex
	services map[string]*service

	// Splicing; nil when no service splices.
	engine      *splice.Table
	diverter    *rules.Diverter
	queues      *nfq.Set
	inject      *injector
	transitions transitions
	counters    engineCounters
	nextQueue   atomic.Uint32

	splicedMu sync.Mutex
	spliced   map[uint64]*splicedFlow

	restoreSysctls func()

	spliceLatency latencies
	spliceAborts  atomic.Uint64
	injectErrors  atomic.Uint64
}

type service struct {
	cfg       *config.Service
	listeners []*net.TCPListener
	fwd       *proxy.Forwarder
	stop      context.CancelFunc
	done      chan struct{}
}

// New returns a gateway for cfg. It touches nothing until Run.
func New(cfg *config.Config, log *slog.Logger) *Gateway {
	return &Gateway{
		cfg:      cfg,
		log:      log,
		rules:    rules.NewManager(rules.FromConfig(cfg)),
		flows:    proxy.NewFlowTable(cfg.Limits.MaxFlows),
		services: map[string]*service{},
		spliced:  map[uint64]*splicedFlow{},
	}
}

// Flows is the gateway's flow table.
func (g *Gateway) Flows() *proxy.FlowTable { return g.flows }

// Run starts every service, installs the kernel state, calls ready (may be
// nil), and runs until ctx is done; then it removes what it installed and
// ends every flow.
func (g *Gateway) Run(ctx context.Context, ready func()) error {
	for i := range g.cfg.Services {
		if err := g.startService(&g.cfg.Services[i]); err != nil {
			g.stopServices()
			return err
		}
	}
	spec := g.rules.Spec()
	if spec.Divert.Enabled {
		if err := g.startSplicing(ctx, spec.Divert); err != nil {
			g.stopServices()
			return err
		}
	}
	if needsAcceptLocal(g.cfg) {
		restore, err := g.enableAcceptLocal()
		if err != nil {
			g.stopSplicing()
			g.stopServices()
			return err
		}
		g.restoreSysctls = restore
	}
	if err := g.rules.Install(); err != nil {
		g.rules.Remove()
		g.shutdown()
		return err
	}
	spec = g.rules.Spec()
	if spec.Divert.Enabled {
		d, err := g.rules.NewDiverter()
		if err != nil {
			g.shutdown()
			return err
		}
		g.diverter = d
	}
	stopReaper := make(chan struct{})
	var reaperDone sync.WaitGroup
	if g.engine != nil {
		reaperDone.Add(1)
		go func() {
			defer reaperDone.Done()
			g.reaper(stopReaper, 250*time.Millisecond)
		}()
	}
	queue := "none"
	if spec.Divert.Enabled {
		queue = fmt.Sprintf("%d-%d (%s)", spec.Divert.Queue, spec.Divert.Queue+spec.Divert.Queues-1, queueKind(spec.Divert.NativeQueue))
	}
	g.log.Info("ready", logging.KeyTable, "inet "+spec.Table, "services", len(g.cfg.Services),
		"mark", fmt.Sprintf("0x%x", spec.Mark), "route_table", spec.RouteTable, logging.KeyQueue, queue, logging.KeyFile, g.cfg.File)
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	g.log.Info("shutting down")
	close(stopReaper)
	reaperDone.Wait()
	g.logStats()
	return g.shutdown()
}

// LogState logs the engine's counters and, at debug level, the state of
// every spliced flow (spliced does this on SIGUSR1).
func (g *Gateway) LogState() {
	g.logStats()
	if g.engine == nil || !g.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	g.splicedMu.Lock()
	defer g.splicedMu.Unlock()
	for id, sf := range g.spliced {
		snap, st := sf.entry.Snapshot(), sf.entry.Stats()
		c2s, s2c := snap.Info(splice.C2S), snap.Info(splice.S2C)
		g.log.Debug("spliced flow", logging.KeyFlow, id, logging.KeyClient, sf.flow.Client, logging.KeyServer, sf.flow.Server,
			"finished", snap.Finished(), "idle_ms", (time.Now().UnixNano()-snap.LastSeen())/1e6,
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
	if g.engine == nil {
		return
	}
	attrs := []any{"splices", g.spliceLatency.count.Load(), "splice_aborts", g.spliceAborts.Load(),
		"splice_p50_us", g.spliceLatency.percentile(0.5).Microseconds(), "splice_p99_us", g.spliceLatency.percentile(0.99).Microseconds(),
		"taken_over_packets", g.counters.stripped.Load(), "held_packets", g.counters.held.Load(), "inject_errors", g.injectErrors.Load()}
	for v := range splice.NumVerdicts {
		if n := g.counters.verdicts[v].Load(); n > 0 {
			attrs = append(attrs, splice.Verdict(v).String(), n)
		}
	}
	for _, q := range g.queues.Stats() {
		attrs = append(attrs, fmt.Sprintf("queue%d", q.Queue), fmt.Sprintf("received=%d modified=%d accepted=%d dropped=%d errors=%d overruns=%d kernel_queue_dropped=%d kernel_user_dropped=%d",
			q.Received, q.Modified, q.Accepted, q.Dropped, q.Errors, q.Overruns, q.Kernel.QueueDropped, q.Kernel.UserDropped))
	}
	g.log.Info("splice engine totals", attrs...)
}

func queueKind(native bool) string {
	if native {
		return "nft queue"
	}
	return "xt NFQUEUE"
}

func (g *Gateway) shutdown() error {
	err := g.rules.Remove()
	if err != nil {
		g.log.Error("remove kernel state", logging.Err(err))
	}
	g.stopServices()
	g.stopSplicing()
	if g.restoreSysctls != nil {
		g.restoreSysctls()
	}
	return err
}

// startSplicing binds the queues and opens the raw sockets.
func (g *Gateway) startSplicing(ctx context.Context, d rules.Divert) error {
	inj, err := newInjector()
	if err != nil {
		return err
	}
	g.inject = inj
	g.engine = splice.NewTable()
	qs, err := nfq.Open(context.WithoutCancel(ctx), nfq.Config{First: d.Queue, Count: d.Queues, Library: g.cfg.Kernel.NFQueue == "go-nfqueue"}, func(uint16) nfq.Handler {
		h := &packetHandler{g: g}
		return h.handle
	}, g.log.With(logging.KeyComponent, "nfq"))
	if err != nil {
		inj.Close()
		g.inject, g.engine = nil, nil
		return err
	}
	g.queues = qs
	return nil
}

func (g *Gateway) stopSplicing() {
	if g.queues != nil {
		g.queues.Close()
	}
	if g.inject != nil {
		g.inject.Close()
	}
	if g.diverter != nil {
		g.diverter.Close()
	}
}

func (g *Gateway) startService(svc *config.Service) error {
	lns, err := proxy.ListenService(context.Background(), svc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	fwd := &proxy.Forwarder{
		Service: svc,
		Flows:   g.flows,
		Log:     g.log.With(logging.KeyComponent, "forward", logging.KeyService, svc.Name),
	}
	if svc.Splice.Mode != config.SpliceNever {
		fwd.Splicer = g
	}
	s := &service{cfg: svc, listeners: lns, fwd: fwd, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		if err := s.fwd.Serve(ctx, lns...); err != nil {
			g.log.Error("service stopped", logging.KeyService, svc.Name, logging.Err(err))
		}
	}()
	g.mu.Lock()
	g.services[svc.Name] = s
	g.mu.Unlock()
	g.log.Debug("service listening", logging.KeyService, svc.Name, "port", svc.Listen, "ports", fmt.Sprint(svc.Ports))
	return nil
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
		s.fwd.CloseFlows()
	}
}

// Cleanup removes the kernel state a configuration would install, for
// `spliced -cleanup` after the daemon was killed.
func Cleanup(cfg *config.Config) error {
	if err := rules.Cleanup(rules.FromConfig(cfg), 0); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}
