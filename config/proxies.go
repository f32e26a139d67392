package config

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"go.yaml.in/yaml/v3"
)

// ProxyDef is what the configuration knows of a kind of proxy: the key of
// its section in a service, how to decode, default and validate it. Each
// proxy's own package defines it and registers it with RegisterProxy
// (usually through proxy.Register), so that adding a proxy touches only
// its package and the line that imports it (package proxy/all).
type ProxyDef struct {
	Kind ProxyKind
	// Section is the key of the proxy's own section in a service, such as
	// "ftp"; empty if it has none.
	Section string
	// NewSection returns a pointer to a zero section, which the section's
	// YAML decodes into (unknown keys are reported like everywhere else).
	NewSection func() any
	// Modes are the listen modes the proxy supports; the first is the
	// default. Empty means transparent only.
	Modes []ListenMode
	// Defaults fills in zero fields of the service (before the common
	// defaults apply) and of its section, which is never nil here.
	Defaults func(s *Service)
	// Validate reports each problem of the service with report: key is
	// relative to the service ("upstream", "ftp.max_line"; "" for the
	// service itself), value the bad value, msg what is wrong and what
	// would be valid.
	Validate func(s *Service, report func(key, value, msg string))
}

type proxyRegistry struct {
	mu   sync.RWMutex
	defs map[ProxyKind]*ProxyDef
}

// proxies is the registry of proxy kinds. It is filled by init functions
// only, before any configuration is parsed, and read-only afterwards.
var proxies = proxyRegistry{defs: map[ProxyKind]*ProxyDef{}}

// RegisterProxy makes a proxy kind known to the configuration. It panics
// when the kind or its section key is registered already: that is a
// programming error.
func RegisterProxy(def ProxyDef) {
	proxies.mu.Lock()
	defer proxies.mu.Unlock()
	if def.Kind == "" {
		panic("config: RegisterProxy without a kind")
	}
	if _, dup := proxies.defs[def.Kind]; dup {
		panic(fmt.Sprintf("config: proxy %q registered twice", def.Kind))
	}
	if def.Section != "" {
		if def.NewSection == nil {
			panic(fmt.Sprintf("config: proxy %q has a section but no NewSection", def.Kind))
		}
		if _, clash := structFields(reflect.TypeFor[Service]())[def.Section]; clash {
			panic(fmt.Sprintf("config: proxy %q: section %q is a service key", def.Kind, def.Section))
		}
		for _, d := range proxies.defs {
			if d.Section == def.Section {
				panic(fmt.Sprintf("config: proxy %q: section %q belongs to proxy %q", def.Kind, def.Section, d.Kind))
			}
		}
	}
	if len(def.Modes) == 0 {
		def.Modes = []ListenMode{ListenTransparent}
	}
	proxies.defs[def.Kind] = &def
}

// LookupProxy returns the definition of a proxy kind, or nil.
func LookupProxy(kind ProxyKind) *ProxyDef {
	proxies.mu.RLock()
	defer proxies.mu.RUnlock()
	return proxies.defs[kind]
}

// ProxyKinds returns the registered proxy kinds, sorted.
func ProxyKinds() []ProxyKind {
	proxies.mu.RLock()
	defer proxies.mu.RUnlock()
	kinds := make([]ProxyKind, 0, len(proxies.defs))
	for k := range proxies.defs {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	return kinds
}

// sectionTypes maps the section keys of every registered proxy to the
// type they decode into.
func sectionTypes() map[string]reflect.Type {
	proxies.mu.RLock()
	defer proxies.mu.RUnlock()
	m := map[string]reflect.Type{}
	for _, d := range proxies.defs {
		if d.Section != "" {
			m[d.Section] = reflect.TypeOf(d.NewSection())
		}
	}
	return m
}

func sectionDef(key string) *ProxyDef {
	proxies.mu.RLock()
	defer proxies.mu.RUnlock()
	for _, d := range proxies.defs {
		if d.Section == key {
			return d
		}
	}
	return nil
}

// orList writes kinds as "a, b or c".
func orList[T ~string](items []T) string {
	s := make([]string, len(items))
	for i, it := range items {
		s[i] = string(it)
	}
	if len(s) <= 1 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

// Section returns the service's section of its proxy (such as its ftp
// section), decoded and defaulted, or nil when the proxy has none. The
// proxy's package type-asserts it to its own section type.
func (s *Service) Section() any {
	def := LookupProxy(s.Proxy)
	if def == nil || def.Section == "" {
		return nil
	}
	return s.Sections[def.Section]
}

// decodeSections decodes the proxy sections of every service from the
// document's services list into Service.Sections.
func decodeSections(cfg *Config, doc *yaml.Node) error {
	services := mappingValue(doc, "services")
	if services == nil || services.Kind != yaml.SequenceNode {
		return nil
	}
	for i, item := range services.Content {
		if item.Kind == yaml.AliasNode {
			item = item.Alias
		}
		if item.Kind != yaml.MappingNode || i >= len(cfg.Services) {
			continue
		}
		for j := 0; j+1 < len(item.Content); j += 2 {
			def := sectionDef(item.Content[j].Value)
			if def == nil {
				continue
			}
			sec := def.NewSection()
			if err := item.Content[j+1].Decode(sec); err != nil {
				return err
			}
			s := &cfg.Services[i]
			if s.Sections == nil {
				s.Sections = map[string]any{}
			}
			s.Sections[def.Section] = sec
		}
	}
	return nil
}

func mappingValue(n *yaml.Node, key string) *yaml.Node {
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			v := n.Content[i+1]
			if v.Kind == yaml.AliasNode {
				v = v.Alias
			}
			return v
		}
	}
	return nil
}

// Forward is the forward: section of a forwarder. It matters only in
// direct mode, where the forwarder is a plain TCP load balancer (HAProxy's
// mode tcp): clients connect to listen_on and each flow goes to a backend
// of the pool. A transparent forwarder connects to the original
// destination and needs none.
type Forward struct {
	// Backends are "address:port" of the pool (required in direct mode).
	Backends []AddrPort `yaml:"backends"`
	// Balance is round_robin (default) or least_conn (fewest flows the
	// proxy relays now; spliced flows no longer count).
	Balance string `yaml:"balance"`
	// BackendDownFor is how long a backend that failed a connect is
	// skipped (default 10s); the next backend is tried then. When all
	// are down, a flow tries the one down longest alone.
	BackendDownFor Duration `yaml:"backend_down_for"`
}

// DefaultBackendDownFor is the default of forward.backend_down_for.
const DefaultBackendDownFor = 10 * time.Second

// The forwarder is the default kind, so the configuration knows it
// without any proxy package (package proxy registers its constructor).
func init() {
	RegisterProxy(ProxyDef{
		Kind:       ProxyForward,
		Section:    "forward",
		NewSection: func() any { return new(Forward) },
		Modes:      []ListenMode{ListenTransparent, ListenDirect},
		Defaults: func(s *Service) {
			f := s.Section().(*Forward)
			if s.ListenMode == ListenDirect {
				SetDefault(&s.Upstream, NAT)
			}
			SetDefault(&f.Balance, "round_robin")
			SetDefault(&f.BackendDownFor, Duration(DefaultBackendDownFor))
		},
		Validate: func(s *Service, bad func(key, value, msg string)) {
			f := s.Section().(*Forward)
			if f.Balance != "round_robin" && f.Balance != "least_conn" {
				bad("forward.balance", f.Balance, "is not a balancing method; use round_robin or least_conn")
			}
			if s.ListenMode != ListenDirect {
				if len(f.Backends) > 0 {
					bad("forward.backends", f.Backends[0].String(), "is only for listen_mode: direct; a transparent forwarder connects to each flow's original destination")
				}
				return
			}
			if len(f.Backends) == 0 {
				bad("forward", s.Name, "has no backends; a direct forwarder needs forward.backends, such as [\"10.2.0.2:8080\"]")
			}
			for j, b := range f.Backends {
				key := fmt.Sprintf("forward.backends[%d]", j)
				if b.Addr().Unmap().IsUnspecified() {
					bad(key, b.String(), "is not an address to connect to (connect(2) takes it for the gateway's loopback); use the address of a server behind the gateway")
					continue
				}
				if l, ok := OwnListener(s.ListenOn, b.AddrPort, false); ok {
					bad(key, b.String(), fmt.Sprintf("is the service's own listen_on address %s: every flow would connect to the service again, until limits.max_flows is full; list the servers behind the gateway (a server on the gateway itself needs a port of its own)", l))
				}
			}
			if s.Upstream != NAT {
				bad("upstream", string(s.Upstream), "cannot be used by a direct forwarder: clients connect to the gateway, which connects to the backends from its own address; remove the key or set upstream: nat")
			}
		},
	})
}

// OwnListener returns the address of listenOn that a connection to b
// would reach: b itself, or a wildcard address (0.0.0.0, [::]) of b's
// port and family when b is a loopback address or, if own, another
// address of the gateway's. A direct forwarder's backend there is the
// service itself.
func OwnListener(listenOn []AddrPort, b netip.AddrPort, own bool) (netip.AddrPort, bool) {
	ba := b.Addr().Unmap()
	for _, l := range listenOn {
		la := l.Addr().Unmap()
		if l.Port() != b.Port() {
			continue
		}
		if la == ba || la.IsUnspecified() && la.Is4() == ba.Is4() && (ba.IsLoopback() || own) {
			return l.AddrPort, true
		}
	}
	return netip.AddrPort{}, false
}
