package httpproxy

import (
	"net/netip"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

func testProxy(routes ...Route) *Proxy {
	p := &Proxy{Base: proxy.Base{Service: &config.Service{Proxy: Kind, Sections: map[string]any{"http": &Config{Routes: routes}}}}}
	p.initPools()
	return p
}

func backends(s ...string) []config.AddrPort {
	var out []config.AddrPort
	for _, a := range s {
		out = append(out, config.AddrPort{AddrPort: netip.MustParseAddrPort(a)})
	}
	return out
}

// TestRoute: the first route whose host (port ignored, case folded) and
// path prefix match decides; nothing matching is nil (404).
func TestRoute(t *testing.T) {
	p := testProxy(
		Route{Host: "www.example", Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
		Route{Path: "/a/", Action: config.Allow, Backends: backends("10.0.0.2:80"), Balance: "round_robin"},
		Route{Path: "/private/", Action: config.Deny},
	)
	for _, c := range []struct {
		host, path string
		want       int // route index, -1 for none
	}{
		{"WWW.example:8080", "/a/x", 0},
		{"other", "/a/x", 1},
		{"other", "/private/x", 2},
		{"other", "/b", -1},
	} {
		got := p.route(c.host, c.path)
		switch {
		case c.want < 0 && got != nil:
			t.Errorf("%s%s: route %q, want none", c.host, c.path, got.route.Path)
		case c.want >= 0 && got != p.pools[c.want]:
			t.Errorf("%s%s: wrong route", c.host, c.path)
		}
	}
}

// TestPick: round robin rotates, least_conn prefers the idlest, and a
// backend marked down is skipped until its time is over (unless all are
// down).
func TestPick(t *testing.T) {
	p := testProxy(Route{Path: "/", Backends: backends("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"), Balance: "round_robin"})
	pl := p.pools[0]
	now := time.Now()
	first := map[netip.AddrPort]int{}
	for range 30 {
		first[pl.pick(now)[0].addr]++
	}
	if len(first) != 3 || first[pl.backends[0].addr] != 10 {
		t.Errorf("round robin firsts: %v", first)
	}
	pl.backends[1].downUntil.Store(now.Add(time.Second).UnixNano())
	for range 10 {
		for _, b := range pl.pick(now) {
			if b == pl.backends[1] {
				t.Fatalf("a backend marked down was offered")
			}
		}
	}
	if got := pl.pick(now.Add(2 * time.Second)); len(got) != 3 {
		t.Errorf("after its time the backend is back: %d offered", len(got))
	}
	for _, b := range pl.backends {
		b.downUntil.Store(now.Add(time.Second).UnixNano())
	}
	if got := pl.pick(now); len(got) != 3 {
		t.Errorf("all down: %d offered, want all 3 tried", len(got))
	}
	lc := testProxy(Route{Path: "/", Backends: backends("10.0.0.1:80", "10.0.0.2:80"), Balance: "least_conn"}).pools[0]
	lc.backends[0].active.Store(5)
	if got := lc.pick(now)[0]; got != lc.backends[1] {
		t.Errorf("least_conn picked %v", got.addr)
	}
}
