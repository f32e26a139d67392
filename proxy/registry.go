package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"spliced/config"
)

// Service is a running proxy of one service, as the gateway drives it.
type Service interface {
	// Serve accepts flows on the listeners until ctx is done. Flows
	// already accepted keep running; CloseFlows ends them.
	Serve(ctx context.Context, listeners ...*net.TCPListener) error
	CloseFlows()
	SetSplicer(Splicer)
}

// Setup is what the gateway gives the proxy of one service.
type Setup struct {
	Service *config.Service
	Flows   *FlowTable
	Log     *slog.Logger
	Events  func(kind string, f *Flow, detail string)
	// AvoidPort tells an upstream connection from a local address and
	// port to a server to take another port (see AvoidFunc).
	AvoidPort AvoidFunc
}

// Base returns the Base of a proxy made with s.
func (s Setup) Base() Base {
	return Base{Service: s.Service, Flows: s.Flows, Log: s.Log, Events: s.Events, AvoidPort: s.AvoidPort}
}

// Kind is a kind of proxy: its configuration (section, defaults,
// validation) and its constructor. Each proxy's package registers its
// kind from an init function; package proxy/all imports them all.
type Kind struct {
	// Config is registered with config.RegisterProxy; nil for a kind the
	// configuration knows already (the forwarder, its default).
	Config *config.ProxyDef
	Name   config.ProxyKind
	// New returns the proxy of one service.
	New func(Setup) Service
}

// Metric is one sample a proxy reports at scrape time. The gateway adds a
// "service" label before Labels.
type Metric struct {
	Name, Help string
	Counter    bool // a counter; a gauge otherwise
	Labels     []string
	Values     []string // one per label
	Value      float64
}

// MetricsSource is implemented by proxies that have metrics of their own.
type MetricsSource interface {
	Metrics() []Metric
}

// Reloader is implemented by proxies that reread files of their own
// (such as a users file) when the daemon reloads, even when their
// service's configuration is unchanged.
type Reloader interface {
	Reload() error
}

var kinds = struct {
	mu sync.RWMutex
	m  map[config.ProxyKind]Kind
}{m: map[config.ProxyKind]Kind{}}

// Register makes a kind of proxy known to the configuration and the
// gateway. It panics on a duplicate: that is a programming error.
func Register(k Kind) {
	if k.Config != nil {
		if k.Config.Kind != k.Name {
			panic(fmt.Sprintf("proxy: kind %q registers config for %q", k.Name, k.Config.Kind))
		}
		config.RegisterProxy(*k.Config)
	}
	kinds.mu.Lock()
	defer kinds.mu.Unlock()
	if _, dup := kinds.m[k.Name]; dup {
		panic(fmt.Sprintf("proxy: kind %q registered twice", k.Name))
	}
	kinds.m[k.Name] = k
}

// New returns the proxy for a service, by its kind.
func New(s Setup) (Service, error) {
	kinds.mu.RLock()
	k, ok := kinds.m[s.Service.Proxy]
	kinds.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("service %s: proxy %q is not built into this spliced", s.Service.Name, s.Service.Proxy)
	}
	return k.New(s), nil
}

func init() {
	Register(Kind{Name: config.ProxyForward, New: func(s Setup) Service {
		return &Forwarder{Base: s.Base()}
	}})
}
