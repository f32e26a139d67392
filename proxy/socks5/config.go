package socks5

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"spliced/config"
	"spliced/proxy"
)

// Config is the socks5: section of a socks5 service.
type Config struct {
	// UsersFile holds "user:bcrypt-hash" lines (# comments); spliced
	// -hash-password makes the hashes. It is reread on SIGHUP. Required
	// when any client must authenticate.
	UsersFile string `yaml:"users_file"`
	// Auth chooses the method per client source: the first entry whose
	// sources contain the client decides; clients no entry matches use
	// Method.
	Auth []AuthRule `yaml:"auth"`
	// Method is none or password (default: password when users_file is
	// set, none otherwise).
	Method Method `yaml:"method"`
	// Rules decide where clients may connect, by user and destination;
	// the first matching rule decides, Default (allow) when none does. A
	// refused request gets 0x02 and nothing is connected. The service's
	// access rules apply too, to the client's source and the resolved
	// destination.
	Rules   []Rule        `yaml:"rules"`
	Default config.Action `yaml:"default"`
	// Resolver is the DNS server ("address:port") that resolves domain
	// names; empty: the gateway's system resolver.
	Resolver string `yaml:"resolver"`
	// ResolveTimeout bounds a name resolution (default 5s); past it the
	// client gets 0x06.
	ResolveTimeout config.Duration `yaml:"resolve_timeout"`
	// HandshakeTimeout bounds the whole handshake, greeting to request
	// (default 10s).
	HandshakeTimeout config.Duration `yaml:"handshake_timeout"`
	// MaxSessions caps the service's connections, handshaking or
	// established (default 1024).
	MaxSessions int `yaml:"max_sessions"`
	// FailedLogins from one source address before it is backed off
	// (default 5): further logins from it fail without a check for
	// BackOff (default 30s), doubled at each further failure up to 10m.
	FailedLogins int             `yaml:"failed_logins"`
	BackOff      config.Duration `yaml:"back_off"`
}

// Method is an authentication method a client must use.
type Method string

const (
	None     Method = "none"
	Password Method = "password"
)

func (m *Method) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || (n.Value != string(None) && n.Value != string(Password)) {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not an authentication method; use none or password", n.Line, n.Value)}}
	}
	*m = Method(n.Value)
	return nil
}

// AuthRule selects a method for clients from some sources.
type AuthRule struct {
	Sources []config.Prefix `yaml:"sources"`
	Method  Method          `yaml:"method"`
}

// Rule matches requests by user, destination and port; empty lists match
// anything. A destination matches if it is in Destinations (an address,
// literal or resolved) or its name ends in one of Domains (a domain
// matches itself and its subdomains). A rule with neither matches every
// destination.
type Rule struct {
	Action       config.Action      `yaml:"action"`
	Users        []string           `yaml:"users"`
	Destinations []config.Prefix    `yaml:"destinations"`
	Domains      []string           `yaml:"domains"`
	Ports        []config.PortRange `yaml:"ports"`
}

// Defaults of the socks5 section.
const (
	DefaultResolveTimeout   = 5 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxSessions      = 1024
	DefaultFailedLogins     = 5
	DefaultBackOff          = 30 * time.Second
	maxBackOff              = 10 * time.Minute
)

// Registration is the socks5 proxy's kind.
var Registration = proxy.Kind{
	Name: Kind,
	Config: &config.ProxyDef{
		Kind:       Kind,
		Section:    "socks5",
		NewSection: func() any { return new(Config) },
		Modes:      []config.ListenMode{config.ListenDirect},
		Defaults:   defaults,
		Validate:   validate,
	},
	New: func(s proxy.Setup) proxy.Service { return newProxy(s) },
}

// Kind is the proxy kind of the service and of its flows.
const Kind = "socks5"

func init() { proxy.Register(Registration) }

func defaults(s *config.Service) {
	config.SetDefault(&s.Upstream, config.NAT)
	config.SetDefault(&s.Splice.Mode, config.SpliceImmediate)
	c := s.Section().(*Config)
	if c.UsersFile != "" {
		config.SetDefault(&c.Method, Password)
	}
	config.SetDefault(&c.Method, None)
	config.SetDefault(&c.Default, config.Allow)
	config.SetDefault(&c.ResolveTimeout, config.Duration(DefaultResolveTimeout))
	config.SetDefault(&c.HandshakeTimeout, config.Duration(DefaultHandshakeTimeout))
	config.SetDefault(&c.MaxSessions, DefaultMaxSessions)
	config.SetDefault(&c.FailedLogins, DefaultFailedLogins)
	config.SetDefault(&c.BackOff, config.Duration(DefaultBackOff))
	for i := range c.Rules {
		for j, d := range c.Rules[i].Domains {
			c.Rules[i].Domains[j] = strings.TrimSuffix(strings.ToLower(d), ".")
		}
	}
}

func validate(s *config.Service, bad func(key, value, msg string)) {
	c := s.Section().(*Config)
	if s.Upstream != config.NAT {
		bad("upstream", string(s.Upstream), "cannot be used by a socks5 proxy: it connects from the gateway's address; remove the key or set upstream: nat")
	}
	needUsers := c.Method == Password
	for i, a := range c.Auth {
		if a.Method == "" {
			bad(fmt.Sprintf("socks5.auth[%d]", i), "", "has no method; set method: none or method: password")
		}
		needUsers = needUsers || a.Method == Password
	}
	switch {
	case needUsers && c.UsersFile == "":
		bad("socks5", s.Name, "asks for passwords but has no users_file; set socks5.users_file to a file of user:hash lines (spliced -hash-password makes a hash)")
	case c.UsersFile != "":
		if _, err := loadUsers(c.UsersFile); err != nil {
			bad("socks5.users_file", c.UsersFile, err.Error())
		}
	}
	if c.Resolver != "" {
		if _, err := netip.ParseAddrPort(c.Resolver); err != nil {
			bad("socks5.resolver", c.Resolver, "is not an address and port; use e.g. 10.2.0.53:53 or [fd00::53]:53, or remove it for the system resolver")
		}
	}
	if c.MaxSessions < 0 {
		bad("socks5.max_sessions", fmt.Sprint(c.MaxSessions), fmt.Sprintf("is negative; use a positive number of sessions (default %d)", DefaultMaxSessions))
	}
	if c.FailedLogins < 0 {
		// max(limit, 1) took it for 1: a source backed off at its
		// first failure, which no one who wrote -1 meant.
		bad("socks5.failed_logins", fmt.Sprint(c.FailedLogins), fmt.Sprintf("is negative; use the number of failed logins from one source before it is backed off, at least 1 (default %d)", DefaultFailedLogins))
	}
	for i, r := range c.Rules {
		p := fmt.Sprintf("socks5.rules[%d]", i)
		if r.Action == "" {
			bad(p, "", "has no action; set action: allow or action: deny")
		}
		for j, d := range r.Domains {
			switch {
			case !validName(d):
				bad(fmt.Sprintf("%s.domains[%d]", p, j), d, "is not a domain name; use e.g. example.com (it matches its subdomains too)")
			case config.EndsInNumber(d):
				bad(fmt.Sprintf("%s.domains[%d]", p, j), d, "is an IP address, not a domain: a request for it is taken as the address, which domains never match; put the address in the rule's destinations (e.g. 10.0.0.5/32)")
			}
		}
		for j, u := range r.Users {
			if u == "" || strings.ContainsAny(u, ": \t") {
				bad(fmt.Sprintf("%s.users[%d]", p, j), u, "is not a user name of the users file")
			}
		}
	}
}

// decide applies the rules to a request by user (empty without
// authentication) for name (empty for a literal address) and addr (not
// valid before name is resolved). known is false when a rule that needs
// the address comes before any decision.
func (c *Config) decide(user, name string, addr netip.Addr, port uint16) (action config.Action, known bool) {
	action, known, _ = c.decideBy(user, name, addr, port)
	return action, known
}

// decideBy is decide, also returning the prefix of the deciding rule's
// destinations that contains addr, if that is how it matched.
func (c *Config) decideBy(user, name string, addr netip.Addr, port uint16) (action config.Action, known bool, by netip.Prefix) {
	for i := range c.Rules {
		r := &c.Rules[i]
		if len(r.Users) > 0 && !slices.Contains(r.Users, user) {
			continue
		}
		if len(r.Ports) > 0 && !slices.ContainsFunc(r.Ports, func(p config.PortRange) bool { return p.Contains(port) }) {
			continue
		}
		if len(r.Domains) == 0 && len(r.Destinations) == 0 {
			return r.Action, true, netip.Prefix{}
		}
		if name != "" && matchDomain(r.Domains, name) {
			return r.Action, true, netip.Prefix{}
		}
		if len(r.Destinations) > 0 {
			if !addr.IsValid() {
				return "", false, netip.Prefix{}
			}
			if i := slices.IndexFunc(r.Destinations, func(p config.Prefix) bool { return p.Contains(addr.Unmap().WithZone("")) }); i >= 0 {
				return r.Action, true, r.Destinations[i].Prefix
			}
		}
	}
	return c.Default, true, netip.Prefix{}
}

// onGateway returns the range a destination belongs to when it is the
// gateway itself or next to it, and no destination a client gets by
// default: loopback (127.0.0.0/8, ::1), an address the gateway's
// routing delivers locally (its own, as a /32 or /128), or link-local
// (169.254.0.0/16, fe80::/10: neighbours of the gateway's links, such as
// a cloud's metadata service). It returns an invalid prefix for any
// other address.
func onGateway(a netip.Addr) (netip.Prefix, string) {
	a = a.Unmap()
	switch {
	case a.Is4() && a.IsLoopback():
		return netip.MustParsePrefix("127.0.0.0/8"), "loopback"
	case a.IsLoopback():
		return netip.PrefixFrom(a, 128), "loopback"
	case a.Is4() && a.IsLinkLocalUnicast():
		return netip.MustParsePrefix("169.254.0.0/16"), "link-local"
	case a.IsLinkLocalUnicast():
		return netip.MustParsePrefix("fe80::/10"), "link-local"
	case proxy.IsGatewayAddress(a):
		return netip.PrefixFrom(a, a.BitLen()), "an address of the gateway"
	}
	return netip.Prefix{}, ""
}

// namedBy reports whether a rule's prefix names a destination of the
// range r (onGateway): it lies inside r, so that a rule for wider
// destinations (0.0.0.0/0, a LAN's /8) does not open the gateway.
func namedBy(by, r netip.Prefix) bool {
	return by.IsValid() && by.Bits() >= r.Bits() && r.Contains(by.Addr())
}

// matchDomain reports whether name is one of domains or a subdomain of
// one.
func matchDomain(domains []string, name string) bool {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	for _, d := range domains {
		if name == d || strings.HasSuffix(name, "."+d) {
			return true
		}
	}
	return false
}

// method returns the authentication method for a client.
func (c *Config) method(client netip.Addr) Method {
	for _, a := range c.Auth {
		if len(a.Sources) == 0 || slices.ContainsFunc(a.Sources, func(p config.Prefix) bool { return p.Contains(client.Unmap().WithZone("")) }) {
			return a.Method
		}
	}
	return c.Method
}
