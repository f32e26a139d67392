package gateway

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/proxy"
	"spliced/splice"
)

// TestAvoidPort: a transparent upstream connection avoids the client's
// port while a spliced flow holds that server leg (found in the engine's
// table, not in jumped), and after it ended for the TIME_WAIT margin.
func TestAvoidPort(t *testing.T) {
	g := quietGateway(t)
	client, server := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	if g.avoidPort(client, server) != proxy.AvoidNot {
		t.Fatal("avoided before splicing runs")
	}
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	f := proxy.NewFlow("svc", "forward", client, server)
	f.SetServerLeg(client, server) // transparent, the client's port
	p := splice.Params{
		Client: splice.Conn{Local: server, Remote: client, SndWscale: 7, RcvWscale: 7},
		Server: splice.Conn{Local: client, Remote: server, SndWscale: 7, RcvWscale: 7},
	}
	e, err := g.engine.Add(1, &p, monotime.Now())
	if err != nil {
		t.Fatal(err)
	}
	g.addSpliced(f, e, 0, &p)
	if len(g.jumped) != 0 {
		t.Errorf("jumped holds %d legs for a live flow", len(g.jumped))
	}
	if a := g.avoidPort(client, server); a != proxy.AvoidLive {
		t.Errorf("the server leg of a live spliced flow: %v, want AvoidLive", a)
	}
	// The reverse tuple is the flow's client leg, not a server leg.
	if g.avoidPort(server, client) != proxy.AvoidNot {
		t.Error("a client leg is avoided")
	}
	if g.avoidPort(netip.AddrPortFrom(client.Addr(), 40001), server) != proxy.AvoidNot {
		t.Error("another port is avoided")
	}
	// Ended: the reaper's margin.
	g.jumped[serverLeg(f)] = time.Now().Add(timeWaitMargin)
	g.engine.Delete(e)
	if a := g.avoidPort(client, server); a != proxy.AvoidEnded {
		t.Errorf("the server leg of an ended flow within the margin: %v, want AvoidEnded", a)
	}
	g.jumped[serverLeg(f)] = time.Now().Add(-time.Second)
	if g.avoidPort(client, server) != proxy.AvoidNot {
		t.Error("avoided after the margin")
	}
}

// TestJumpedLegExpiresAfterProxyClose: an unspliced flow's server leg
// stays in jumped (no expiry) while its rebuilt socket lives; when the
// flow then ends in its proxy the leg gets the TIME_WAIT margin, so the
// reaper drops it later instead of keeping it for ever.
func TestJumpedLegExpiresAfterProxyClose(t *testing.T) {
	g := quietGateway(t)
	client, server := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	f := proxy.NewFlow("svc", "http", client, server)
	f.SetServerLeg(client, server)
	g.jumped[serverLeg(f)] = time.Time{} // as completeUnsplice leaves it
	g.forwarderEvent(proxy.EventClosed, f, "")
	until, ok := g.jumped[serverLeg(f)]
	if !ok || until.IsZero() {
		t.Fatalf("after the proxy closed the flow: in jumped %v, until %v; want an expiry", ok, until)
	}
	if a := g.avoidPort(client, server); a != proxy.AvoidEnded {
		t.Errorf("within the margin after the close: %v, want AvoidEnded", a)
	}
	g.reap(until.Add(time.Second))
	if _, ok := g.jumped[serverLeg(f)]; ok {
		t.Error("the reaper kept the leg after its margin")
	}
}

// TestLingerFollowsConfig: a finished flow is retired once it stayed
// diverted for its service's splice.linger, counted from the reap that
// first saw it finished; a flow whose service is gone keeps the default.
func TestLingerFollowsConfig(t *testing.T) {
	cfg, err := config.Parse("linger.yaml", []byte("services:\n  - name: short\n    listen: 15001\n    ports: [\"80\"]\n    splice:\n      mode: immediate\n      linger: 2s\n"))
	if err != nil {
		t.Fatal(err)
	}
	g := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(g.workers.Close)
	client, server := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	t0 := int64(1000 * time.Second)
	for _, c := range []struct {
		service string
		linger  time.Duration
	}{{"short", 2 * time.Second}, {"gone", config.DefaultLinger}} {
		sf := &splicedFlow{flow: proxy.NewFlow(c.service, "forward", client, server)}
		if g.lingered(sf, t0) {
			t.Errorf("%s: retired when first seen finished", c.service)
		}
		if g.lingered(sf, t0+int64(c.linger-time.Millisecond)) {
			t.Errorf("%s: retired before its linger of %v", c.service, c.linger)
		}
		if !g.lingered(sf, t0+int64(c.linger)) {
			t.Errorf("%s: not retired after its linger of %v", c.service, c.linger)
		}
	}
}
