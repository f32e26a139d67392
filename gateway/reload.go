package gateway

import (
	"context"
	"fmt"
	"net"
	"reflect"
	"strings"

	"spliced/api"
	"spliced/config"
	"spliced/logging"
	"spliced/proxy"
	"spliced/rules"
)

// Reload applies a new configuration without interrupting flows: services
// that were added start listening, services that were removed stop
// accepting (their flows run on), changed services are replaced, and the
// table is reinstalled in one transaction that keeps every live spliced
// flow's divert entries. Settings that only a restart can change are
// refused with an error, and nothing changes then.
func (g *Gateway) Reload(ctx context.Context, cfg *config.Config) error {
	g.rulesMu.Lock()
	defer g.rulesMu.Unlock()
	if !g.running {
		return fmt.Errorf("reload %s: spliced is starting or stopping; try again once it runs (nothing was changed)", cfg.File)
	}
	old := g.config()
	if err := restartOnly(old, cfg); err != nil {
		return err
	}
	spec := rules.FromConfig(cfg)
	if g.splicing() {
		// Once splicing runs it stays on: spliced flows may outlive the
		// services that made them.
		spec.Divert.Enabled = true
	}

	// Open the listeners of new and changed services first: if one
	// cannot listen, nothing has changed yet.
	added, removed := diffServices(old, cfg)
	opened := map[string][]*net.TCPListener{}
	closeOpened := func() {
		for _, lns := range opened {
			for _, ln := range lns {
				ln.Close()
			}
		}
	}
	// A changed service keeps its sockets where its addresses stay (the
	// old ones hold them: a new socket could not bind), and so do the
	// connections waiting in their accept queues.
	var held []*net.TCPListener
	g.mu.Lock()
	for _, name := range removed {
		if s := g.services[name]; s != nil {
			held = append(held, s.listeners...)
		}
	}
	g.mu.Unlock()
	for _, s := range added {
		lns, err := proxy.ListenServiceReusing(ctx, s, held)
		if err != nil {
			closeOpened()
			return fmt.Errorf("reload %s: %w", cfg.File, err)
		}
		opened[s.Name] = lns
	}
	// The new rules (with the queue flavour probed before), installed
	// before they are published with the configuration.
	m := g.manager().WithSpec(spec)
	if spec.Divert.Enabled {
		if err := g.prepareSplicing(ctx, cfg, m); err != nil {
			closeOpened()
			return err
		}
		m = g.withSkipMark(m)
	}
	// Replace the services' rules and sets in place: the base chains,
	// and with them the hooks that queued packets resume at, stay (see
	// UpdateServices). Only if that cannot be done (the table is gone) is
	// the table reinstalled.
	updated, err := m.UpdateServices(g.manager().Spec())
	if err != nil {
		closeOpened()
		return fmt.Errorf("reload %s: update the table: %w", cfg.File, err)
	}
	if !updated {
		if err := g.installLive(m); err != nil {
			closeOpened()
			return fmt.Errorf("reload %s: install the table: %w", cfg.File, err)
		}
	}
	g.publish(cfg, m)

	// Switch services: stop the removed and changed ones (their flows
	// keep running), start the new ones.
	for _, name := range removed {
		g.mu.Lock()
		s := g.services[name]
		delete(g.services, name)
		g.mu.Unlock()
		if s != nil {
			s.stop()
			<-s.done
		}
	}
	for _, s := range added {
		g.serveService(s, opened[s.Name])
	}
	g.reloadProxies(added)
	g.flows.SetMax(cfg.Limits.MaxFlows)
	g.flows.SetMaxPerClient(cfg.Limits.MaxFlowsPerClient)
	g.reloads.Add(1)
	detail := fmt.Sprintf("services: %d; started %s; stopped %s", len(cfg.Services), names(added), strings.Join(removed, ", "))
	g.log.Info("configuration reloaded", logging.KeyFile, cfg.File, "detail", detail)
	g.events.publish(api.Event{Kind: api.EventReloaded, Detail: detail})
	// A service's upstream or splicing may have changed what the
	// ruleset checks find.
	g.checkFirewall()
	return nil
}

// publish puts cfg and its rules m in force (Reload: under rulesMu). The
// services cfg removes are kept in its snapshot's ended, for the flows
// they leave running.
func (g *Gateway) publish(cfg *config.Config, m *rules.Manager) {
	prev := g.snap.Load()
	var running map[string]bool
	if len(prev.ended) > 0 {
		running = map[string]bool{}
		for _, f := range g.flows.List() { // finished spliced flows too: they linger
			running[f.Service] = true
		}
	}
	g.snap.Store(&snapshot{cfg: cfg, rules: m, ended: endedServices(prev.cfg, prev.ended, cfg, func(name string) bool { return running[name] })})
}

// restartOnly refuses changes that cannot be applied to a running daemon.
func restartOnly(old, cfg *config.Config) error {
	var changed []string
	if !reflect.DeepEqual(old.Kernel, cfg.Kernel) {
		changed = append(changed, "kernel")
	}
	if old.Control != cfg.Control {
		changed = append(changed, "control")
	}
	if old.Metrics != cfg.Metrics {
		changed = append(changed, "metrics")
	}
	if old.Debug != cfg.Debug {
		changed = append(changed, "debug")
	}
	if old.Log != cfg.Log {
		changed = append(changed, "log")
	}
	if old.Limits.ClientIPv6Prefix != cfg.Limits.ClientIPv6Prefix {
		// The flow table keeps its per-client counts by it.
		changed = append(changed, "limits.client_ipv6_prefix")
	}
	if len(changed) > 0 {
		return fmt.Errorf("reload %s: %s changed; these take effect only at a restart (nothing was changed)", cfg.File, strings.Join(changed, ", "))
	}
	return nil
}

// diffServices returns the services to start (new or changed) and the
// names of those to stop (removed or changed).
func diffServices(old, cfg *config.Config) (start []*config.Service, stop []string) {
	for i := range cfg.Services {
		s := &cfg.Services[i]
		if o := old.Service(s.Name); o == nil || !reflect.DeepEqual(*o, *s) {
			start = append(start, s)
		}
	}
	for i := range old.Services {
		o := &old.Services[i]
		if s := cfg.Service(o.Name); s == nil || !reflect.DeepEqual(*o, *s) {
			stop = append(stop, o.Name)
		}
	}
	return start, stop
}

func names(ss []*config.Service) string {
	var n []string
	for _, s := range ss {
		n = append(n, s.Name)
	}
	return strings.Join(n, ", ")
}

// reloadProxies lets the proxies of services that kept running reread
// their own files (proxy.Reloader), such as a SOCKS5 users file. A proxy
// that cannot keeps what it had and says why.
func (g *Gateway) reloadProxies(started []*config.Service) {
	fresh := map[string]bool{}
	for _, s := range started {
		fresh[s.Name] = true
	}
	g.mu.Lock()
	var rs []proxy.Reloader
	var svcs []string
	for name, s := range g.services {
		if r, ok := s.proxy.(proxy.Reloader); ok && !fresh[name] {
			rs, svcs = append(rs, r), append(svcs, name)
		}
	}
	g.mu.Unlock()
	for i, r := range rs {
		if err := r.Reload(); err != nil {
			g.log.Error("reload failed; the service keeps its previous state", logging.KeyService, svcs[i], logging.Err(err))
		}
	}
}
