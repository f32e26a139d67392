// Package config reads, defaults and validates spliced's configuration
// file (YAML). Every error a user can get names the file, the line, the key
// path, the bad value and what would be valid, for example:
//
//	config spliced.yaml: line 12: services[0].listen: 70000 is not a port; use 1-65535
//
// The zero value of every field is useful and documented; Load fills in
// defaults, so code that uses a loaded Config never sees a zero where a
// default applies.
package config

import (
	_ "embed"
	"fmt"
	"net/netip"
	"runtime"
	"time"
)

// Default is the configuration used when spliced runs without -config. It
// intercepts nothing until services are added; its comments document every
// key.
//
//go:embed default.yaml
var Default []byte

// Config is the whole configuration file.
type Config struct {
	Log      Log       `yaml:"log"`
	Kernel   Kernel    `yaml:"kernel"`
	Limits   Limits    `yaml:"limits"`
	Control  Control   `yaml:"control"`
	Metrics  Metrics   `yaml:"metrics"`
	Debug    Debug     `yaml:"debug"`
	Services []Service `yaml:"services"`

	// File is where the configuration was read from ("<default>" for the
	// embedded one). Not a key of the file.
	File string `yaml:"-"`
}

// Log configures logging.
type Log struct {
	// Level is debug, info (default), warn or error.
	Level string `yaml:"level"`
	// Format is auto (default: colored text on a terminal, JSON otherwise),
	// text or json.
	Format string `yaml:"format"`
}

// Kernel names what spliced installs in the kernel.
type Kernel struct {
	// Table is the name of spliced's own nftables table in family inet
	// (default "spliced"). spliced never touches any other table.
	Table string `yaml:"table"`
	// Mark is the fwmark bit spliced sets on intercepted packets and routes
	// with policy routing (default 0x5c1). Only these bits of the mark are
	// set or matched, so other users of the mark keep theirs.
	Mark Hex32 `yaml:"mark"`
	// CtMark is the conntrack mark bit spliced sets on a connection whose
	// SYN it intercepted, until a socket of the gateway has seen the
	// connection (default 0x5c10000). It lets the ACK that completes a SYN
	// cookie handshake reach the listener: under a SYN flood the listener
	// answers with cookies and keeps no state of its own. Only these bits
	// of the conntrack mark are set or matched. Its rules make the kernel
	// track connections in the gateway's network namespace.
	CtMark Hex32 `yaml:"ct_mark"`
	// RouteTable is the routing table holding the local default routes that
	// deliver marked packets to the proxies (default 100).
	RouteTable uint32 `yaml:"route_table"`
	// RulePriority is the priority of spliced's `ip rule` (default 100).
	RulePriority uint32 `yaml:"rule_priority"`
	// Queue is the first NFQUEUE number for spliced flows (default 100)
	// and Queues how many queues there are (default: one per CPU).
	Queue  uint16 `yaml:"queue"`
	Queues int    `yaml:"queues"`
	// QueueLen is how many packets each queue holds while they wait for
	// spliced (default 4096); past it the kernel drops them (counted as
	// kernel_queue_dropped) and TCP retransmits.
	QueueLen uint32 `yaml:"queue_len"`
	// NFQueue selects how packets of spliced flows are read: "lean"
	// (default: batched system calls, no copies) or "go-nfqueue" (the
	// library; slower, kept for comparison).
	NFQueue string `yaml:"nfqueue"`
	// Repair is "on" (default: restore the table when someone deletes or
	// edits it) or "off" (leave the drift, for `splicectl ruleset -diff`).
	Repair string `yaml:"repair"`
	// OwnTable is "on" (default: the table belongs to the daemon, so that
	// no other process changes or deletes it, `nft flush ruleset`
	// included; Linux 6.9 and later) or "off".
	OwnTable string `yaml:"own_table"`
	// DivertTimeout is the lifetime of a spliced flow's divert entry in
	// the kernel if spliced dies without removing it (default 24h); live
	// flows are refreshed.
	DivertTimeout Duration `yaml:"divert_timeout"`
	// Datapath is where spliced flows' packets are rewritten: "nfqueue"
	// (default: the Go engine, fed by NFQUEUE), "bpf" (a BPF program at
	// tcx ingress of Interfaces rewrites established spliced flows in the
	// kernel; the Go engine splices and unsplices them, and takes the
	// packets the program leaves alone; spliced does not start without
	// it) or "auto" (bpf where the program loads and attaches, else
	// nfqueue; the log says which and why).
	Datapath string `yaml:"datapath"`
	// Interfaces are the interfaces the bpf datapath attaches to, at the
	// start only. Default: every interface but lo, bridges' ports and
	// bonds' and teams' slaves, followed as they come and go (one that
	// appears later is attached to, one that goes is let go of).
	Interfaces []string `yaml:"interfaces"`
	// BPFFS is where a bpf file system is mounted (default /sys/fs/bpf;
	// spliced mounts one there if none is). The bpf datapath pins its
	// maps and links in BPFFS/spliced/TABLE, so that spliced flows
	// outlive the daemon and the next one adopts them.
	BPFFS string `yaml:"bpffs"`
	// BPFForward is how the bpf datapath forwards the packets it
	// rewrote: "redirect" (default: straight to the device the routing
	// table gives their destination, with bpf_fib_lookup and
	// bpf_redirect_neigh, skipping netfilter's forward and postrouting hooks;
	// egress qdiscs still apply) or "stack" (on through the kernel's
	// forwarding path, its netfilter hooks included).
	BPFForward string `yaml:"bpf_forward"`
	// Resend is how a splice sends on the payload it took over while
	// the sockets drained: "gso" (default: a packet longer than a
	// segment whole, as a GSO packet through a packet socket on its
	// egress device, skipping netfilter's output and postrouting hooks;
	// in segments where that does not resolve, and always while IPsec
	// policies exist) or "raw" (one segment at a time through a raw IP
	// socket and the IP output path, its netfilter hooks included).
	Resend string `yaml:"resend"`
}

// Datapath values.
const (
	DatapathNFQueue = "nfqueue"
	DatapathBPF     = "bpf"
	DatapathAuto    = "auto"
)

// BPFForward values.
const (
	BPFForwardRedirect = "redirect"
	BPFForwardStack    = "stack"
)

// Resend values.
const (
	ResendGSO = "gso"
	ResendRaw = "raw"
)

// BPFMark is the mark bit the bpf datapath sets on the packets it
// rewrote (the divert rule skips them); kernel.mark and kernel.ct_mark
// must not use it with that datapath.
const BPFMark = 0x20000000

// SpliceMode says when a service's forwarder splices a flow.
type SpliceMode string

const (
	SpliceNever     SpliceMode = "never"     // relay every byte through the proxy (default)
	SpliceImmediate SpliceMode = "immediate" // splice right after the upstream connect
	SpliceBytes     SpliceMode = "bytes"     // splice once Bytes were relayed (both directions)
	SpliceTime      SpliceMode = "time"      // splice After the flow was established
)

// Splice is a service's splice policy.
type Splice struct {
	Mode  SpliceMode `yaml:"mode"`
	Bytes ByteSize   `yaml:"bytes"`
	After Duration   `yaml:"after"`
	// DrainTimeout bounds how long a splice waits for both ends to
	// acknowledge what the gateway already acknowledged (default 5s);
	// past it the splice is abandoned and the flow stays proxied.
	DrainTimeout Duration `yaml:"drain_timeout"`
	// StallAfter: a spliced flow with data its receiver has not
	// acknowledged for this long, while packets of the flow still come,
	// is reported as stalled (counted, logged with the engine's state;
	// default 15s). A stall is a bug to report, not a state to wait out.
	StallAfter Duration `yaml:"stall_after"`
	// Linger is how long a spliced flow that ended (FIN both ways,
	// acknowledged, or a RST) stays on the datapath before it is retired
	// (default 5s): a lost final ACK, or the FIN its sender retransmits
	// then, is still rewritten rather than answered by the gateway's
	// stack, which has no socket for it.
	Linger Duration `yaml:"linger"`
	// SocketBuffer, when set, fixes the send and receive buffers of a
	// relayed flow's two sockets (SO_SNDBUF, SO_RCVBUF) instead of the
	// kernel's autotuning: what the sockets hold when a splice starts is
	// what its drain must move and the peers acknowledge, and the
	// receive window bounds what arrives during the drain and is
	// released after it. Smaller buffers make a busy flow's splice
	// shorter, and cap the relayed phase at SocketBuffer per round trip.
	SocketBuffer ByteSize `yaml:"socket_buffer"`
}

// Bounds of splice.linger. Below a second a retransmitted FIN (TCP's
// retransmission timeout is at least 200 ms, and doubles) may come after
// the flow's rewrite is gone; past a minute a lingering flow would catch
// a new connection that reuses its ports after the client's TIME_WAIT.
const (
	MinLinger = time.Second
	MaxLinger = time.Minute
)

// Bounds of splice.socket_buffer.
const (
	MinSocketBuffer = 16 << 10
	MaxSocketBuffer = 64 << 20
)

// Limits bound what the daemon holds.
type Limits struct {
	// MaxFlows caps the flows over all services, spliced ones included
	// (default 10000). Flows beyond the cap are refused with a reset and
	// a rate-limited log line.
	MaxFlows int `yaml:"max_flows"`
	// MaxFlowsPerClient caps the flows of one client over all services
	// (0, the default: no cap): an IPv4 address, or the IPv6 addresses
	// of one ClientIPv6Prefix. A SOCKS5 handshake counts as a flow.
	// Flows beyond it are refused as beyond MaxFlows: one client cannot
	// fill the table the others share.
	MaxFlowsPerClient int `yaml:"max_flows_per_client"`
	// ClientIPv6Prefix is how many leading bits of an IPv6 client's
	// address make one client for MaxFlowsPerClient (default 128: each
	// address). 64 counts a /64 as one: a host may use every address
	// of its subnet, but the hosts of a LAN share one /64. Set at the
	// start only.
	ClientIPv6Prefix int `yaml:"client_ipv6_prefix"`
}

// Control is the control API (splicectl).
type Control struct {
	// Socket is the Unix socket of the API, an absolute path (default
	// /run/spliced/spliced.sock); "off" disables it.
	Socket string `yaml:"socket"`
	// Group may use the socket (mode 0660); empty: root only (0600).
	Group string `yaml:"group"`
}

// Metrics is the Prometheus endpoint.
type Metrics struct {
	// Listen is the address of /metrics, e.g. 127.0.0.1:9410; empty
	// disables it.
	Listen string `yaml:"listen"`
}

// Debug holds what helps a developer look inside a running daemon; all of
// it is off by default.
type Debug struct {
	// Pprof is the address of Go's net/http/pprof handlers
	// (/debug/pprof/), e.g. 127.0.0.1:6060; empty disables them. They
	// show the daemon's memory and goroutines to whoever reaches the
	// address, so it must be a loopback address (others are refused).
	Pprof string `yaml:"pprof"`
}

// UpstreamMode says which source address the server sees.
type UpstreamMode string

const (
	// Transparent: the server sees the client's address (and port where it
	// is free). The default.
	Transparent UpstreamMode = "transparent"
	// NAT: the server sees the gateway's address (a classical proxy).
	NAT UpstreamMode = "nat"
)

// Service is one intercepted service: which flows the gateway takes over and
// how it relays them.
type Service struct {
	// Name identifies the service in logs and metrics (required, unique).
	Name string `yaml:"name"`
	// Listen is the port of a transparent service's TPROXY listener on
	// the gateway (required, unique). Clients never connect to it
	// directly. A direct service listens on ListenOn instead.
	Listen Port `yaml:"listen"`
	// Backlog is the listeners' accept queue (default 4096): connections
	// the kernel completed and the proxy has not accepted yet. The kernel
	// caps it at net.core.somaxconn of the gateway's namespace. Half-open
	// connections under a SYN flood do not fill it: past the SYN queue the
	// kernel answers with SYN cookies (net.ipv4.tcp_syncookies, default 1,
	// which spliced leaves as it is).
	Backlog int `yaml:"backlog"`
	// Ports are the intercepted destination ports, single ("80") or ranges
	// ("8000-8100"). Required in transparent mode.
	Ports []PortRange `yaml:"ports"`
	// Destinations and Sources restrict interception to these prefixes;
	// empty means any address of either family.
	Destinations []Prefix `yaml:"destinations"`
	Sources      []Prefix `yaml:"sources"`
	// Upstream is transparent (default) or nat.
	Upstream UpstreamMode `yaml:"upstream"`
	// ConnectTimeout bounds the upstream connect (default 5s).
	ConnectTimeout Duration `yaml:"connect_timeout"`
	// IdleTimeout closes a flow after no byte moved either way for this
	// long (default 5m).
	IdleTimeout Duration `yaml:"idle_timeout"`
	// Access decides which intercepted flows are relayed.
	Access Access `yaml:"access"`
	// Splice says when flows of this service are spliced. For an FTP
	// service it applies to the data connections (never: relayed by the
	// proxy; any other mode: spliced as soon as they are set up); the
	// control connection always stays proxied.
	Splice Splice `yaml:"splice"`
	// Proxy is the kind of proxy relaying the service's flows: forward
	// (default, the plain forwarder), ftp, http or socks5 (see
	// ProxyKinds: each proxy registers itself).
	Proxy ProxyKind `yaml:"proxy"`
	// ListenMode is how clients reach the service: transparent (the
	// service's ports, destinations and sources are intercepted with
	// TPROXY and diverted to its listen port) or direct (the service
	// listens on ListenOn like any server; nothing is intercepted).
	// Default: the proxy's (direct for socks5, transparent otherwise).
	ListenMode ListenMode `yaml:"listen_mode"`
	// ListenOn are the gateway addresses and ports a direct service
	// listens on, IPv4 and IPv6, such as ["10.1.0.1:1080", "[fd01::1]:1080"].
	ListenOn []AddrPort `yaml:"listen_on"`

	// Sections holds the service's proxy section (such as its ftp: key),
	// decoded by the type its proxy registered, by section key. Proxies
	// read theirs with Section.
	Sections map[string]any `yaml:"-"`
}

// ListenMode is how clients reach a service.
type ListenMode string

const (
	ListenTransparent ListenMode = "transparent" // TPROXY interception of routed flows
	ListenDirect      ListenMode = "direct"      // a plain listener on gateway addresses
)

// ProxyKind names a proxy.
type ProxyKind string

const (
	// ProxyForward is the plain forwarder, the default kind. The other
	// kinds are defined by their packages (proxy/ftp, proxy/httpproxy,
	// proxy/socks5) and registered with RegisterProxy.
	ProxyForward ProxyKind = "forward"
)

// Action of an access rule.
type Action string

const (
	Allow Action = "allow"
	Deny  Action = "deny"
)

// Access is an ordered list of rules; the first rule that matches a flow
// decides, and Default applies when none does (default allow).
type Access struct {
	Default Action       `yaml:"default"`
	Rules   []AccessRule `yaml:"rules"`
}

// AccessRule matches flows by source and destination prefix and destination
// port; an empty list matches anything.
type AccessRule struct {
	Action       Action      `yaml:"action"`
	Sources      []Prefix    `yaml:"sources"`
	Destinations []Prefix    `yaml:"destinations"`
	Ports        []PortRange `yaml:"ports"`
}

// Decide returns the action for a flow from src to dst.
func (a *Access) Decide(src netip.Addr, dst netip.AddrPort) Action {
	for _, r := range a.Rules {
		if r.Matches(src, dst) {
			return r.Action
		}
	}
	return a.Default
}

// Matches reports whether the rule applies to a flow from src to dst.
func (r *AccessRule) Matches(src netip.Addr, dst netip.AddrPort) bool {
	return containsAddr(r.Sources, src) && containsAddr(r.Destinations, dst.Addr()) && containsPort(r.Ports, dst.Port())
}

func containsAddr(ps []Prefix, a netip.Addr) bool {
	if len(ps) == 0 {
		return true
	}
	// A link-local address from a socket carries its interface as a
	// zone (fe80::1%eth0), and netip.Prefix.Contains matches no zoned
	// address: a deny rule for fe80::/10 let link-local clients through.
	// Prefixes have no zone (the parser refuses one), so none is lost.
	a = a.Unmap().WithZone("")
	for _, p := range ps {
		if p.Prefix.Contains(a) {
			return true
		}
	}
	return false
}

func containsPort(rs []PortRange, port uint16) bool {
	if len(rs) == 0 {
		return true
	}
	for _, r := range rs {
		if r.Contains(port) {
			return true
		}
	}
	return false
}

// Defaults of zero-valued fields.
const (
	DefaultTable          = "spliced"
	DefaultMark           = 0x5c1
	DefaultCtMark         = 0x5c10000
	DefaultRouteTable     = 100
	DefaultRulePriority   = 100
	DefaultMaxFlows       = 10000
	DefaultConnectTimeout = 5 * time.Second
	DefaultIdleTimeout    = 5 * time.Minute
	DefaultBacklog        = 4096
	DefaultQueue          = 100
	DefaultQueueLen       = 4096
	DefaultDivertTimeout  = 24 * time.Hour
	DefaultDrainTimeout   = 5 * time.Second
	DefaultStallAfter     = 15 * time.Second
	DefaultLinger         = 5 * time.Second
	DefaultBPFFS          = "/sys/fs/bpf"
)

func (c *Config) applyDefaults() {
	SetDefault(&c.Log.Level, "info")
	SetDefault(&c.Log.Format, "auto")
	SetDefault(&c.Kernel.Table, DefaultTable)
	SetDefault(&c.Kernel.Mark, DefaultMark)
	SetDefault(&c.Kernel.CtMark, DefaultCtMark)
	SetDefault(&c.Kernel.RouteTable, DefaultRouteTable)
	SetDefault(&c.Kernel.RulePriority, DefaultRulePriority)
	SetDefault(&c.Limits.MaxFlows, DefaultMaxFlows)
	SetDefault(&c.Limits.ClientIPv6Prefix, 128)
	SetDefault(&c.Kernel.Queue, DefaultQueue)
	SetDefault(&c.Kernel.Queues, defaultQueues(runtime.NumCPU()))
	SetDefault(&c.Kernel.QueueLen, DefaultQueueLen)
	SetDefault(&c.Kernel.DivertTimeout, Duration(DefaultDivertTimeout))
	SetDefault(&c.Kernel.NFQueue, "lean")
	SetDefault(&c.Kernel.Datapath, DatapathNFQueue)
	SetDefault(&c.Kernel.BPFFS, DefaultBPFFS)
	SetDefault(&c.Kernel.BPFForward, BPFForwardRedirect)
	SetDefault(&c.Kernel.Resend, ResendGSO)
	SetDefault(&c.Kernel.Repair, "on")
	SetDefault(&c.Kernel.OwnTable, "on")
	SetDefault(&c.Control.Socket, "/run/spliced/spliced.sock")
	if c.Control.Socket == "off" {
		c.Control.Socket = ""
	}
	for i := range c.Services {
		s := &c.Services[i]
		SetDefault(&s.Proxy, ProxyForward)
		if def := LookupProxy(s.Proxy); def != nil {
			SetDefault(&s.ListenMode, def.Modes[0])
			if def.Section != "" {
				if s.Sections == nil {
					s.Sections = map[string]any{}
				}
				if s.Sections[def.Section] == nil {
					s.Sections[def.Section] = def.NewSection()
				}
			}
			if def.Defaults != nil {
				def.Defaults(s)
			}
		}
		SetDefault(&s.ListenMode, ListenTransparent)
		SetDefault(&s.Upstream, Transparent)
		SetDefault(&s.ConnectTimeout, Duration(DefaultConnectTimeout))
		SetDefault(&s.IdleTimeout, Duration(DefaultIdleTimeout))
		SetDefault(&s.Backlog, DefaultBacklog)
		SetDefault(&s.Access.Default, Allow)
		SetDefault(&s.Splice.Mode, SpliceNever)
		SetDefault(&s.Splice.DrainTimeout, Duration(DefaultDrainTimeout))
		SetDefault(&s.Splice.StallAfter, Duration(DefaultStallAfter))
		SetDefault(&s.Splice.Linger, Duration(DefaultLinger))
	}
}

// SetDefault sets *p to v if *p is the zero value: a setting left out
// takes its default. Proxy packages use it for their sections.
func SetDefault[T comparable](p *T, v T) {
	var zero T
	if *p == zero {
		*p = v
	}
}

// Service returns the service with the given name, or nil.
func (c *Config) Service(name string) *Service {
	for i := range c.Services {
		if c.Services[i].Name == name {
			return &c.Services[i]
		}
	}
	return nil
}

// String of a service for logs.
func (s *Service) String() string { return fmt.Sprintf("service %q", s.Name) }

// MaxQueues bounds kernel.queues.
const MaxQueues = 64

// defaultQueues is kernel.queues when not set: one per CPU, at most
// MaxQueues (a machine with more CPUs failed the validation of its own
// default).
func defaultQueues(cpus int) int { return min(max(cpus, 1), MaxQueues) }
