package gateway

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/proxy"
	"spliced/splice"
)

// TestRestartOnly: a reload applies the flow caps, but not
// limits.client_ipv6_prefix, by which the flow table keeps its
// per-client counts: a reload that changes it is refused, naming it.
func TestRestartOnly(t *testing.T) {
	parse := func(limits string) *config.Config {
		t.Helper()
		cfg, err := config.Parse("spliced.yaml", []byte("limits:\n"+limits+"services:\n  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	old := parse("  max_flows_per_client: 10\n")
	if err := restartOnly(old, parse("  max_flows_per_client: 20\n  max_flows: 500\n")); err != nil {
		t.Errorf("the caps changed: %v", err)
	}
	err := restartOnly(old, parse("  max_flows_per_client: 10\n  client_ipv6_prefix: 64\n"))
	if err == nil || !strings.Contains(err.Error(), "limits.client_ipv6_prefix") || !strings.Contains(err.Error(), "restart") {
		t.Errorf("client_ipv6_prefix changed: %v, want a refusal naming it", err)
	}
}

// TestRemovedServiceKeepsSettings: a reload that removes a service leaves
// its spliced flows running, and they keep the service's idle_timeout,
// splice.linger and splice.stall_after, as its proxied flows keep theirs.
// Before, the reaper looked the service up in the new configuration, found
// nothing and took the defaults: an idle spliced SSH session of a service
// with idle_timeout: 2h was reset after 5 minutes. A service added again
// takes its new settings; removed again, its last ones.
func TestRemovedServiceKeepsSettings(t *testing.T) {
	parse := func(services string) *config.Config {
		t.Helper()
		cfg, err := config.Parse("spliced.yaml", []byte("services:\n  - name: web\n    listen: 15001\n    ports: [\"80\"]\n"+services))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	ssh := func(idle string) string {
		return "  - name: ssh\n    listen: 15002\n    ports: [\"22\"]\n    idle_timeout: " + idle + "\n    splice:\n      linger: 7s\n      stall_after: 40s\n"
	}
	g := quietGateway(t)
	g.snap.Store(&snapshot{cfg: parse(ssh("2h")), rules: g.manager()})
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	client := netip.MustParseAddrPort("10.1.0.2:40000")
	server := netip.MustParseAddrPort("10.2.0.2:22")
	f := proxy.NewFlow("ssh", "forward", client, server)
	if g.flows.Admit(f) != nil {
		t.Fatal("flow table full")
	}
	f.SetServerLeg(client, server)
	p := splice.Params{
		Client: splice.Conn{Local: server, Remote: client, SndNxt: 1, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000, MSS: 1448},
		Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000, MSS: 1448},
	}
	splicedAt := time.Now()
	e, err := g.engine.Add(f.ID, &p, monotime.Of(splicedAt))
	if err != nil {
		t.Fatal(err)
	}
	g.addSpliced(f, e, 0, &p)

	g.publish(parse(""), g.manager()) // the reload that removes ssh
	if d := g.idleTimeout("ssh"); d != 2*time.Hour {
		t.Fatalf("idle timeout of the removed service's flows: %v, want its 2h", d)
	}
	if d := g.linger("ssh"); d != 7*time.Second {
		t.Errorf("linger of the removed service's flows: %v, want its 7s", d)
	}
	if d := g.stallAfter("ssh"); d != 40*time.Second {
		t.Errorf("stall_after of the removed service's flows: %v, want its 40s", d)
	}
	g.reap(splicedAt.Add(6 * time.Minute)) // idle for 6 minutes
	if g.spliced[f.ID] == nil {
		t.Fatal("the removed service's spliced flow was retired as idle after 6 minutes; its idle_timeout is 2h")
	}

	g.publish(parse(ssh("30s")), g.manager()) // added again
	if d := g.idleTimeout("ssh"); d != 30*time.Second {
		t.Errorf("idle timeout of a service added again: %v, want its new 30s", d)
	}
	g.publish(parse(""), g.manager()) // and removed again
	if d := g.idleTimeout("ssh"); d != 30*time.Second {
		t.Errorf("idle timeout of a service removed again: %v, want its last 30s", d)
	}
	if d := g.idleTimeout("never"); d != config.DefaultIdleTimeout {
		t.Errorf("idle timeout of a service no configuration had: %v, want the default", d)
	}
}

// TestEndedServicesForgotten: the settings a reload keeps for a removed
// service's flows go once it has none, at a later reload; kept for good,
// every service name a reload ever removed stayed in memory for the
// daemon's life (with the configuration it came from: a generated file
// that names its services anew at each reload grew it without bound).
// One that still has a flow keeps them; one removed by this reload keeps
// them too (its proxy may still be admitting a flow).
func TestEndedServicesForgotten(t *testing.T) {
	parse := func(services string) *config.Config {
		t.Helper()
		cfg, err := config.Parse("spliced.yaml", []byte("services:\n  - name: web\n    listen: 15001\n    ports: [\"80\"]\n"+services))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	svc := func(name string, port int) string {
		return fmt.Sprintf("  - name: %s\n    listen: %d\n    ports: [\"%d\"]\n    idle_timeout: 2h\n", name, 15100+port, port)
	}
	g := quietGateway(t)
	g.snap.Store(&snapshot{cfg: parse(svc("gone", 22) + svc("busy", 23)), rules: g.manager()})
	f := proxy.NewFlow("busy", "forward", netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:23"))
	if g.flows.Admit(f) != nil {
		t.Fatal("flow table full")
	}
	g.publish(parse(""), g.manager()) // removes both
	for _, name := range []string{"gone", "busy"} {
		if g.serviceOf(name) == nil {
			t.Errorf("service %s, just removed: its settings are gone", name)
		}
	}
	g.publish(parse(""), g.manager()) // a later reload
	if g.serviceOf("busy") == nil {
		t.Error("a removed service with a running flow lost its settings at a later reload")
	}
	if s := g.snap.Load().ended["gone"]; s != nil {
		t.Errorf("a removed service without flows is still kept after a later reload: %+v", s.Name)
	}
	g.flows.Remove(f)
	g.publish(parse(""), g.manager())
	if n := len(g.snap.Load().ended); n != 0 {
		t.Errorf("%d ended services kept with no flow of theirs", n)
	}
}
