// Package gateway is the daemon's core: it owns the configuration, the
// flow table and the kernel state, starts a proxy per service, and (with
// package splice and nfq) moves flows between the proxies and the splice
// engine.
//
// Startup order matters: listeners first, then the nftables table and
// policy routing, so that no SYN is ever diverted to a port nobody listens
// on. Shutdown is the reverse: the table goes first, so new flows are
// routed untouched while the proxies close.
package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"spliced/config"
	"spliced/logging"
	"spliced/proxy"
	"spliced/rules"
)

// Gateway runs the services of one configuration.
type Gateway struct {
	cfg   *config.Config
	log   *slog.Logger
	rules *rules.Manager
	flows *proxy.FlowTable

	mu       sync.Mutex
	services map[string]*service
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
	if err := g.rules.Install(); err != nil {
		g.stopServices()
		g.rules.Remove()
		return err
	}
	spec := g.rules.Spec()
	g.log.Info("ready", logging.KeyTable, "inet "+spec.Table, "services", len(g.cfg.Services),
		"mark", fmt.Sprintf("0x%x", spec.Mark), "route_table", spec.RouteTable, logging.KeyFile, g.cfg.File)
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	g.log.Info("shutting down")
	err := g.rules.Remove()
	if err != nil {
		g.log.Error("remove kernel state", logging.Err(err))
	}
	g.stopServices()
	return err
}

func (g *Gateway) startService(svc *config.Service) error {
	lns, err := proxy.ListenService(context.Background(), svc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{
		cfg:       svc,
		listeners: lns,
		fwd: &proxy.Forwarder{
			Service: svc,
			Flows:   g.flows,
			Log:     g.log.With(logging.KeyComponent, "forward", logging.KeyService, svc.Name),
		},
		stop: cancel,
		done: make(chan struct{}),
	}
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
