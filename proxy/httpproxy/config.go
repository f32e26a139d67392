package httpproxy

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// Config is the http: section of an http service, an HTTP/1.1 proxy: each request is read in control mode
// and routed by Host and path to a backend pool; the connection is spliced
// while a large response flows and unspliced when the client sends its
// next request. Its upstream is always nat.
type Config struct {
	// Routes are tried in order; the first whose host and path prefix
	// match a request decides. A request no route matches gets 404.
	Routes []Route `yaml:"routes"`
	// SpliceMin: responses with a Content-Length of at least this many
	// bytes are spliced (default 64KiB; 1 splices every response with a
	// body). Chunked responses are relayed. The service's splice.mode
	// decides whether the proxy splices at all: never relays everything,
	// any other mode splices responses.
	SpliceMin config.ByteSize `yaml:"splice_min"`
	// SplicePolicy decides which responses of at least SpliceMin are
	// spliced: measured (default) splices one only when the estimates
	// measured on this machine predict it is delivered sooner spliced
	// than relayed (policy.go); always splices every one (the
	// behaviour before the policy existed).
	SplicePolicy string `yaml:"splice_policy"`
	// SpliceExplore: with the measured policy, now and then an eligible
	// response goes the way the estimates did not choose, so that both
	// estimates stay fresh; exploring costs at most 1/SpliceExplore of
	// the responses' predicted time (Explorer; default 50, so 2%; 0
	// never, leaving the estimates as they are once the choice settles).
	SpliceExplore *int `yaml:"splice_explore"`
	// SpliceIdleMin: with the measured policy on the nfqueue datapath,
	// responses are relayed while the machine's share of idle CPU is
	// below this many percent (cpuLoad; default 10; 0 never looks).
	SpliceIdleMin *int `yaml:"splice_idle_min"`
	// PathsIgnoreCase: the backends read paths without regard to case
	// (IIS and other Windows servers do): routes then match a path in
	// any case, so a deny route for /admin/ holds for /ADMIN/ too.
	// Default false: paths compare as RFC 3986 says, case-sensitively.
	PathsIgnoreCase bool `yaml:"paths_ignore_case"`
	// Forwarded is the header that tells backends who the client is:
	// x-forwarded-for (default), via, or none.
	Forwarded string `yaml:"forwarded"`
	// BackendDownFor is how long a backend that failed a connect is
	// skipped (default 10s).
	BackendDownFor config.Duration `yaml:"backend_down_for"`
	// UpstreamKeepalive is how many idle connections to each backend
	// the proxy keeps for later requests from any client (default 64;
	// 0 closes each with its client connection). See idlePool.
	UpstreamKeepalive *int `yaml:"upstream_keepalive"`
	// UpstreamIdleTimeout is how long an idle upstream connection is
	// kept (default 30s). Keep it below the backends' own keep-alive
	// timeout (nginx 75s, Apache 5s): a connection the backend closed
	// is noticed before it is used, but a close racing a request costs
	// that request a new connection (an idempotent request without a
	// body) or a 502 (any other).
	UpstreamIdleTimeout config.Duration `yaml:"upstream_idle_timeout"`
	// UpstreamTimeout is how long the proxy waits for a backend to send
	// the next bytes of its response or to take the next bytes of a
	// request (default 60s, nginx's proxy_read_timeout and
	// proxy_send_timeout; 0 waits for ever). A backend that takes
	// longer before its response's head gets the client a 504; one that
	// stops in the middle of a body ends the client's connection.
	UpstreamTimeout *config.Duration `yaml:"upstream_timeout"`
}

// Route sends requests for a host and path prefix to a backend pool.
type Route struct {
	// Host matches the request's Host without port; empty matches any.
	Host string `yaml:"host"`
	// Path is a path prefix (default "/").
	Path string `yaml:"path"`
	// Action is allow (default) or deny (403).
	Action config.Action `yaml:"action"`
	// Backends are "address:port" of the pool's servers.
	Backends []config.AddrPort `yaml:"backends"`
	// Balance is round_robin (default) or least_conn.
	Balance string `yaml:"balance"`
}

// Splice policies (Config.SplicePolicy).
const (
	PolicyMeasured = "measured"
	PolicyAlways   = "always"
)

// Defaults of the http section.
const (
	DefaultSpliceMin           = 64 << 10
	DefaultSpliceExplore       = 50
	DefaultSpliceIdleMin       = 10
	DefaultBackendDownFor      = 10 * time.Second
	DefaultUpstreamKeepalive   = 64
	DefaultUpstreamIdleTimeout = 30 * time.Second
	DefaultUpstreamTimeout     = 60 * time.Second
)

// Registration is the http proxy's kind.
var Registration = proxy.Kind{
	Name: Kind,
	Config: &config.ProxyDef{
		Kind:       Kind,
		Section:    "http",
		NewSection: func() any { return new(Config) },
		Defaults:   defaults,
		Validate:   validate,
	},
	New: func(s proxy.Setup) proxy.Service { return &Proxy{Base: s.Base()} },
}

func init() { proxy.Register(Registration) }

// conf is the http section of the proxy's service.
func (p *Proxy) conf() *Config { return p.Service.Section().(*Config) }

func defaults(s *config.Service) {
	config.SetDefault(&s.Upstream, config.NAT)
	c := s.Section().(*Config)
	config.SetDefault(&c.SpliceMin, config.ByteSize(DefaultSpliceMin))
	config.SetDefault(&c.SplicePolicy, PolicyMeasured)
	if c.SpliceExplore == nil {
		n := DefaultSpliceExplore
		c.SpliceExplore = &n
	}
	if c.SpliceIdleMin == nil {
		n := DefaultSpliceIdleMin
		c.SpliceIdleMin = &n
	}
	config.SetDefault(&c.Forwarded, "x-forwarded-for")
	config.SetDefault(&c.BackendDownFor, config.Duration(DefaultBackendDownFor))
	if c.UpstreamKeepalive == nil {
		n := DefaultUpstreamKeepalive
		c.UpstreamKeepalive = &n
	}
	config.SetDefault(&c.UpstreamIdleTimeout, config.Duration(DefaultUpstreamIdleTimeout))
	if c.UpstreamTimeout == nil {
		d := config.Duration(DefaultUpstreamTimeout)
		c.UpstreamTimeout = &d
	}
	for j := range c.Routes {
		r := &c.Routes[j]
		config.SetDefault(&r.Path, "/")
		config.SetDefault(&r.Action, config.Allow)
		config.SetDefault(&r.Balance, "round_robin")
	}
}

func validate(s *config.Service, bad func(key, value, msg string)) {
	c := s.Section().(*Config)
	if s.Upstream != config.NAT {
		bad("upstream", string(s.Upstream), "cannot be used by an http proxy: it connects to its backends from the gateway; remove the key or set upstream: nat")
	}
	switch c.SplicePolicy {
	case PolicyMeasured, PolicyAlways:
	default:
		bad("http.splice_policy", c.SplicePolicy, "is not a splice policy; use measured or always")
	}
	if c.SpliceExplore != nil && *c.SpliceExplore < 0 {
		bad("http.splice_explore", fmt.Sprint(*c.SpliceExplore), "is negative; use 0 (never) or N (exploring costs at most 1/N of the predicted time)")
	}
	if c.SpliceIdleMin != nil && (*c.SpliceIdleMin < 0 || *c.SpliceIdleMin > 100) {
		bad("http.splice_idle_min", fmt.Sprint(*c.SpliceIdleMin), "is not a percentage; use 0 (never look at the CPU) to 100")
	}
	if c.UpstreamKeepalive != nil && *c.UpstreamKeepalive < 0 {
		bad("http.upstream_keepalive", fmt.Sprint(*c.UpstreamKeepalive), "is negative; use 0 (no idle upstream connections kept) or N (idle connections kept per backend)")
	}
	switch c.Forwarded {
	case "x-forwarded-for", "via", "none":
	default:
		bad("http.forwarded", c.Forwarded, "is not a header choice; use x-forwarded-for, via or none")
	}
	if len(c.Routes) == 0 {
		bad("http", s.Name, "has no routes; add routes with a path and backends")
	}
	for j, r := range c.Routes {
		rp := fmt.Sprintf("http.routes[%d]", j)
		if r.Path == "" || r.Path[0] != '/' {
			bad(rp+".path", r.Path, "is not a path prefix; start it with /")
		}
		if r.Action == config.Allow && len(r.Backends) == 0 {
			bad(rp, r.Path, "has no backends; list them as address:port, or set action: deny")
		}
		if msg := routeHostProblem(r.Host); msg != "" {
			bad(rp+".host", r.Host, msg)
		}
		if r.Balance != "round_robin" && r.Balance != "least_conn" {
			bad(rp+".balance", r.Balance, "is not a balancing method; use round_robin or least_conn")
		}
	}
}

// routeHostProblem says what is wrong with a route's host, or is empty:
// a route must name a host a request can have (setHost takes the same
// spellings), or it would never match, and a deny route would deny
// nothing.
func routeHostProblem(h string) string {
	if h == "" {
		return ""
	}
	if a, err := netip.ParseAddr(strings.Trim(h, "[]")); err == nil && a.Zone() == "" {
		return ""
	}
	name := strings.TrimSuffix(strings.ToLower(h), ".")
	switch {
	case strings.Contains(name, ":"):
		return "is not a host name or an IP address; a route matches the host without its port"
	case !validHost(name) || name == "" || strings.HasPrefix(name, ".") || strings.Contains(name, ".."):
		return "is not a host name or an IP address"
	case config.EndsInNumber(name):
		return "is neither a host name nor an IPv4 address in the form requests must use (four decimal numbers without leading zeros: 10.0.0.5)"
	}
	return ""
}
