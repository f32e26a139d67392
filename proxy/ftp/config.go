package ftp

import (
	"fmt"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// Config is the ftp: section of an ftp service. Its upstream is always nat: servers see only
// the gateway's external address.
type Config struct {
	// External is the gateway's address the servers see in PORT and EPRT
	// commands. Default: the source address of the session's control
	// connection to the server.
	External config.Addr `yaml:"external"`
	// Internal is the gateway's address clients get in 227 (PASV)
	// replies. Default: the gateway's address on the route to the client.
	// 229 (EPSV) replies carry no address; clients connect to the address
	// they sent the control connection to, where the proxy listens
	// transparently.
	Internal config.Addr `yaml:"internal"`
	// DataPorts is the range of gateway ports for data connections
	// (default 40000-40999).
	DataPorts config.PortRange `yaml:"data_ports"`
	// MaxLine is the longest command line accepted, CRLF included
	// (default 512). A longer line, or a NUL byte, ends the session. RFC
	// 959 sets no limit; real commands, paths included, stay far below
	// it.
	MaxLine int `yaml:"max_line"`
	// SessionTimeout ends a control connection after this long (default
	// 24h). The service's idle_timeout ends one that is idle while no
	// data connection of it is open.
	SessionTimeout config.Duration `yaml:"session_timeout"`
	// DataTimeout bounds the wait for a data connection the session set
	// up (default 30s).
	DataTimeout config.Duration `yaml:"data_timeout"`
	// MaxSessions caps the service's control connections (default 256).
	MaxSessions int `yaml:"max_sessions"`
}

// Defaults of the ftp section.
const (
	DefaultDataFirst      = 40000
	DefaultDataLast       = 40999
	DefaultMaxLine        = 512
	DefaultSessionTimeout = 24 * time.Hour
	DefaultDataTimeout    = 30 * time.Second
	DefaultMaxSessions    = 256
)

// Kind is the ftp proxy's registration.
var Kind = proxy.Kind{
	Name: "ftp",
	Config: &config.ProxyDef{
		Kind:       "ftp",
		Section:    "ftp",
		NewSection: func() any { return new(Config) },
		Defaults:   defaults,
		Validate:   validate,
	},
	New: func(s proxy.Setup) proxy.Service { return &Proxy{Base: s.Base()} },
}

func init() { proxy.Register(Kind) }

// conf is the ftp section of the proxy's service.
func (p *Proxy) conf() *Config { return p.Service.Section().(*Config) }

func defaults(s *config.Service) {
	config.SetDefault(&s.Upstream, config.NAT)
	c := s.Section().(*Config)
	config.SetDefault(&c.DataPorts, config.PortRange{First: DefaultDataFirst, Last: DefaultDataLast})
	config.SetDefault(&c.MaxLine, DefaultMaxLine)
	config.SetDefault(&c.SessionTimeout, config.Duration(DefaultSessionTimeout))
	config.SetDefault(&c.DataTimeout, config.Duration(DefaultDataTimeout))
	config.SetDefault(&c.MaxSessions, DefaultMaxSessions)
}

func validate(s *config.Service, bad func(key, value, msg string)) {
	c := s.Section().(*Config)
	if s.Upstream != config.NAT {
		bad("upstream", string(s.Upstream), "cannot be used by an ftp proxy: its servers see only the gateway's address; remove the key or set upstream: nat")
	}
	if c.MaxLine < 64 || c.MaxLine > 8192 {
		bad("ftp.max_line", fmt.Sprint(c.MaxLine), fmt.Sprintf("is not a usable line limit; use 64-8192 bytes (default %d)", DefaultMaxLine))
	}
	if c.MaxSessions < 0 {
		bad("ftp.max_sessions", fmt.Sprint(c.MaxSessions), fmt.Sprintf("is negative; use a positive number of sessions (default %d)", DefaultMaxSessions))
	}
	if c.DataPorts.First < 1024 {
		bad("ftp.data_ports", c.DataPorts.String(), "includes privileged ports; use a range above 1023 such as 40000-40999")
	}
}
