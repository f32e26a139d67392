package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"spliced/config"
	"spliced/logging"
	"spliced/proxy"
	"spliced/rules"
)

// SourceNATConflict is a transparent service whose upstream connections
// leave on an interface where the router's source NAT (masquerade or
// snat) applies. Such a connection has the client's own 4-tuple, so
// conntrack takes it for the client's intercepted connection, whose NAT
// bindings were set when the client's SYN arrived: the rule never sees
// it. The servers get the client's address, which behind a masquerading
// router they cannot answer (rules.SourceNATs; TestLabSourceNAT).
type SourceNATConflict struct {
	Service string
	Ifname  string // where the service's connections leave
	Rule    rules.SourceNAT
}

func (c SourceNATConflict) String() string {
	return fmt.Sprintf("service %s: upstream transparent, but %s applies to its connections leaving on %s, and never to an intercepted flow's: servers get the client's own address; set upstream: nat for this service", c.Service, c.Rule, c.Ifname)
}

// SourceNATConflicts finds the transparent services of cfg whose
// upstream connections leave on an interface that a source NAT rule of
// another table applies to (for the connections' family, and for the
// service's sources where the rule is limited to a source prefix).
// Where they leave is where the routes to the service's destinations go
// (to any address: those to 192.0.2.1 and 2001:db8::1, documentation
// addresses that follow the default routes).
func SourceNATConflicts(cfg *config.Config, m *rules.Manager) ([]SourceNATConflict, error) {
	transparent := TransparentServices(cfg)
	if len(transparent) == 0 {
		return nil, nil
	}
	nats, err := m.SourceNATs()
	if err != nil || len(nats) == 0 {
		return nil, err
	}
	return sourceNATConflicts(transparent, nats, egressInterfaces), nil
}

// TransparentServices returns the services whose upstream connections
// leave from their clients' addresses (upstream: transparent): the ones
// another table's source NAT can miss.
func TransparentServices(cfg *config.Config) []*config.Service {
	var out []*config.Service
	for i := range cfg.Services {
		s := &cfg.Services[i]
		if s.Upstream == config.Transparent && s.ListenMode != config.ListenDirect {
			out = append(out, s)
		}
	}
	return out
}

// sourceNATConflicts finds the conflicts of services with nats, each
// once; egress tells where a service's connections leave.
func sourceNATConflicts(services []*config.Service, nats []rules.SourceNAT, egress func(*config.Service) []egressInterface) []SourceNATConflict {
	var out []SourceNATConflict
	for _, s := range services {
		var sources []netip.Prefix
		for _, p := range s.Sources {
			sources = append(sources, p.Prefix)
		}
		for _, e := range egress(s) {
			for _, r := range nats {
				c := SourceNATConflict{Service: s.Name, Ifname: e.name, Rule: r}
				if r.Applies(e.name, e.ipv6, sources) && !slices.ContainsFunc(out, c.same) {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

// same reports whether c and o are the same conflict.
func (c SourceNATConflict) same(o SourceNATConflict) bool {
	return c.Service == o.Service && c.Ifname == o.Ifname && c.Rule.String() == o.Rule.String()
}

// egressInterface is an interface a service's connections of a family
// leave on.
type egressInterface struct {
	name string
	ipv6 bool
}

// egressInterfaces are the interfaces the routes to a service's
// destinations leave on (the gateway's own addresses not included).
func egressInterfaces(s *config.Service) []egressInterface {
	var to []netip.Addr
	for _, p := range s.Destinations {
		if p.Bits() == 0 {
			to = append(to, anyAddress(p.Addr().Is4()))
		} else {
			to = append(to, p.Masked().Addr())
		}
	}
	if len(to) == 0 {
		to = []netip.Addr{anyAddress(true), anyAddress(false)}
	}
	var out []egressInterface
	for _, a := range to {
		r, err := proxy.RouteTo(a)
		if err != nil || r.Local || r.Ifindex == 0 {
			continue
		}
		if ifc, err := net.InterfaceByIndex(r.Ifindex); err == nil {
			if e := (egressInterface{ifc.Name, !a.Unmap().Is4()}); !slices.Contains(out, e) {
				out = append(out, e)
			}
		}
	}
	return out
}

// anyAddress is an address that the default route of its family serves.
func anyAddress(v4 bool) netip.Addr {
	if v4 {
		return netip.MustParseAddr("192.0.2.1")
	}
	return netip.MustParseAddr("2001:db8::1")
}

// checkSourceNAT warns of each new SourceNATConflict, and says when one
// is gone; statusWarnings lists them. Under rulesMu, as checkFirewall.
func (g *Gateway) checkSourceNAT() {
	found, err := SourceNATConflicts(g.config(), g.manager())
	if err != nil {
		if !g.sourceNATUnread {
			g.log.Warn("cannot read the other tables' source NAT rules to check the transparent services against them", logging.Err(err))
		}
		g.sourceNATUnread = true
		return
	}
	g.sourceNATUnread = false
	var was []SourceNATConflict
	if p := g.sourceNATs.Load(); p != nil {
		was = *p
	}
	for _, c := range found {
		if !slices.ContainsFunc(was, c.same) {
			g.log.Warn("a transparent service's upstream connections miss the router's source NAT: they keep the client's address, which servers beyond it cannot answer (connects time out, proxied or spliced). Set upstream: nat for the service, or take the rule off that interface",
				logging.KeyService, c.Service, "interface", c.Ifname, "rule", c.Rule.String())
		}
	}
	for _, c := range was {
		if !slices.ContainsFunc(found, c.same) {
			g.log.Info("a transparent service's upstream connections no longer meet a source NAT rule", logging.KeyService, c.Service, "interface", c.Ifname, "rule", c.Rule.String())
		}
	}
	g.sourceNATs.Store(&found)
}

// sourceNATWarnings are the status's lines for what checkSourceNAT last
// found.
func (g *Gateway) sourceNATWarnings() []string {
	var out []string
	if p := g.sourceNATs.Load(); p != nil {
		for _, c := range *p {
			out = append(out, c.String())
		}
	}
	return out
}
