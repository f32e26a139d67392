package httpproxy

import (
	"bufio"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
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

// TestRouteReadingsOfForwardedPath: the readings that must route alike
// are those of the path the backend gets, after its dot segments are
// resolved. /admin;/;/.. goes to the backend as /admin;/, which Tomcat
// reads as /admin/; read as sent, its parameters dropped, it was / and
// passed the deny route for /admin/ to the catch-all route. So with
// %2F (nginx: /admin%2F/ is /admin//, merged /admin/) and %5C.
func TestRouteReadingsOfForwardedPath(t *testing.T) {
	p := testProxy(
		Route{Path: "/admin/", Action: config.Deny},
		Route{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
	)
	for _, target := range []string{"/admin;/;/..", "/admin;x/;y/..", "/admin%2F/%2F/..", "/admin%5C/%5c/..", "/x/../admin;/;/../"} {
		rq, err := readRequest(bufio.NewReader(strings.NewReader("GET " + target + " HTTP/1.1\r\nHost: t\r\n\r\n")))
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		pl, err := p.routeRequest(rq)
		var re *requestError
		if !errors.As(err, &re) || re.status != http.StatusBadRequest {
			route := ""
			if pl != nil {
				route = pl.route.Path
			}
			t.Errorf("%s: sent to the backend as %s, routed to %q (%v); want 400", target, rq.URL.Opaque, route, err)
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
	pl.backends[1].downUntil.Store(monotime.Of(now.Add(time.Second)))
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
		b.downUntil.Store(monotime.Of(now.Add(time.Second)))
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

// TestRouteIPv6Host: a route for an IPv6 literal matches the request's
// Host with and without a port, in any of its spellings: a deny route
// for [2001:db8::1] must hold for "Host: [2001:db8::1]:80" too.
func TestRouteIPv6Host(t *testing.T) {
	for _, routeHost := range []string{"[2001:db8::1]", "2001:db8::1", "[2001:DB8:0::1]"} {
		p := testProxy(
			Route{Host: routeHost, Path: "/", Action: config.Deny},
			Route{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
		)
		for _, host := range []string{"[2001:db8::1]", "[2001:db8::1]:80", "[2001:db8:0:0::1]", "[2001:db8:0:0::1]:8080"} {
			if got := p.route(host, "/x"); got != p.pools[0] {
				t.Errorf("route host %q, Host %q: not the deny route", routeHost, host)
			}
		}
		if got := p.route("[2001:db8::2]", "/x"); got != p.pools[1] {
			t.Errorf("route host %q: another address took the deny route", routeHost)
		}
	}
}

// TestRouteIgnoreCase: with http.paths_ignore_case a route matches a path
// in any case, so a deny route for /admin/ holds for a backend that
// serves /ADMIN/ as /admin/ (IIS); without it paths compare exactly.
func TestRouteIgnoreCase(t *testing.T) {
	routes := []Route{
		{Path: "/admin/", Action: config.Deny},
		{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
	}
	for _, fold := range []bool{false, true} {
		p := testProxy(routes...)
		p.conf().PathsIgnoreCase = fold
		for _, c := range []struct {
			path     string
			denyFold bool // denied with fold; without, only the exact /admin
		}{
			{"/admin/x", true},
			{"/admin", true},
			{"/ADMIN/x", true},
			{"/Admin", true},
			{"/aDmIn/%2E", true},
			{"/administrator", false},
			{"/ADMINS/x", false},
			{"/x/admin/", false},
		} {
			want := c.denyFold && (fold || strings.HasPrefix(c.path, "/admin"))
			got := p.route("h", c.path) == p.pools[0]
			if got != want {
				t.Errorf("paths_ignore_case %v: %s denied %v, want %v", fold, c.path, got, want)
			}
		}
	}
}

// TestPathsIgnoreCaseConfig: http.paths_ignore_case from the file makes
// the deny route for /admin/ refuse /ADMIN/x and /Admin (403), which a
// backend that ignores case would serve as /admin/; without it they
// match no route (404), and /A/x reaches the /a/ route only with it.
func TestPathsIgnoreCaseConfig(t *testing.T) {
	for _, c := range []struct {
		keys string
		want int
	}{
		{"", http.StatusNotFound},
		{"      paths_ignore_case: true\n", http.StatusForbidden},
	} {
		b := startBackend(t)
		_, addr := testServiceWith(t, b, c.keys)
		for _, path := range []string{"/ADMIN/x", "/Admin"} {
			codes, _ := exchangeRaw(t, addr, "GET "+path+" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 1)
			if len(codes) == 0 || codes[0] != c.want {
				t.Errorf("%q, GET %s: %v, want %d", c.keys, path, codes, c.want)
			}
		}
		codes, _ := exchangeRaw(t, addr, "GET /A/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 1)
		if want := map[bool]int{false: http.StatusNotFound, true: http.StatusOK}[c.keys != ""]; len(codes) == 0 || codes[0] != want {
			t.Errorf("%q, GET /A/x: %v, want %d", c.keys, codes, want)
		}
	}
}

// TestOptionsAsterisk: "OPTIONS *" asks about the server in general (RFC
// 9110 9.3.7; HAProxy's documented health check), not about a path: it
// goes where the host's root goes, and is denied where the root is.
// Before, no route matched "*" and every such request got 404, so a
// load balancer in front that checks so took the gateway for down.
func TestOptionsAsterisk(t *testing.T) {
	p := testProxy(
		Route{Host: "secret.example", Path: "/", Action: config.Deny},
		Route{Path: "/admin/", Action: config.Deny},
		Route{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
	)
	for host, want := range map[string]*pool{"t": p.pools[2], "secret.example": p.pools[0]} {
		rq, err := readRequest(bufio.NewReader(strings.NewReader("OPTIONS * HTTP/1.1\r\nHost: " + host + "\r\n\r\n")))
		if err != nil {
			t.Fatal(err)
		}
		if pl, err := p.routeRequest(rq); err != nil || pl != want {
			t.Errorf("OPTIONS * to %s: routed to %v (%v), want the route for %s/", host, pl, err, want.route.Host)
		}
		if rq.URL.Opaque != "*" {
			t.Errorf("OPTIONS * to %s goes out as %q", host, rq.URL.Opaque)
		}
	}
	// An absolute-form OPTIONS without a path asks the same, and the
	// last proxy sends it on as "*" (RFC 9112 3.2.4), not as "/".
	for _, target := range []string{"http://t", "http://t:80"} {
		rq, err := readRequest(bufio.NewReader(strings.NewReader("OPTIONS " + target + " HTTP/1.1\r\nHost: x\r\n\r\n")))
		if err != nil {
			t.Fatal(err)
		}
		if pl, err := p.routeRequest(rq); err != nil || pl != p.pools[2] || rq.URL.Opaque != "*" || rq.URL.RawQuery != "" {
			t.Errorf("OPTIONS %s: routed to %v (%v), goes out as %q", target, pl, err, rq.URL.String())
		}
	}
	for _, target := range []string{"http://t/", "http://t?x"} {
		rq, err := readRequest(bufio.NewReader(strings.NewReader("OPTIONS " + target + " HTTP/1.1\r\nHost: x\r\n\r\n")))
		if err != nil {
			t.Fatal(err)
		}
		if rq.URL.Opaque != "/" {
			t.Errorf("OPTIONS %s goes out as %q, want /", target, rq.URL.String())
		}
	}
	// Without a route for the root there is none for the server either.
	p = testProxy(Route{Path: "/a/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"})
	rq, _ := readRequest(bufio.NewReader(strings.NewReader("OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")))
	if pl, err := p.routeRequest(rq); pl != nil || err != nil {
		t.Errorf("OPTIONS * without a root route: %v, %v", pl, err)
	}
}

// TestRouteWindowsReadings: with http.paths_ignore_case (the backends
// are Windows servers) the readings Windows file names give a path must
// route alike: Windows drops a name's trailing dots and spaces
// (/admin./x, /admin%20/x are the directory admin) and reads
// "name:stream" as a stream of the file name (/admin::$INDEX_ALLOCATION/x
// is the directory admin too). Before, each went past the deny route for
// /admin/ to the backend. Without the option paths read as RFC 3986 says.
func TestRouteWindowsReadings(t *testing.T) {
	refused := []string{
		"/admin./x", "/ADMIN%20/x", "/admin.%20.%20/x", "/admin::$INDEX_ALLOCATION/x", "/Admin:$i30:$INDEX_ALLOCATION/x",
		"/admin%3A%3A$DATA", "/admin.", "/a/..%5Cadmin.%5Cx",
	}
	passed := []string{"/a/x.txt", "/a.b/c", "/a/x.", "/admins./x", "/administrator%20/x", "/a:b/c", "/v1.2/admin./x"}
	for _, fold := range []bool{false, true} {
		p := testProxy(
			Route{Path: "/admin/", Action: config.Deny},
			Route{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"},
		)
		p.conf().PathsIgnoreCase = fold
		for _, target := range append(refused, passed...) {
			rq, err := readRequest(bufio.NewReader(strings.NewReader("GET " + target + " HTTP/1.1\r\nHost: t\r\n\r\n")))
			if err != nil {
				t.Fatalf("%s: %v", target, err)
			}
			pl, err := p.routeRequest(rq)
			var re *requestError
			got400 := errors.As(err, &re) && re.status == http.StatusBadRequest
			want400 := fold && slices.Contains(refused, target)
			switch {
			case got400 != want400:
				t.Errorf("paths_ignore_case %v: %s refused %v (%v), want %v", fold, target, got400, err, want400)
			case !got400 && pl != p.pools[1]:
				t.Errorf("paths_ignore_case %v: %s not routed to /", fold, target)
			}
		}
	}
}
