package config

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

var (
	tableNameRE   = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,31}$`)
	serviceNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,23}$`)
	ifaceNameRE   = regexp.MustCompile(`^[^/:\s]{1,15}$`)
	hostNameRE    = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$`)
)

func (c *Config) validate(idx *keyIndex) error {
	var errs Errors
	bad := func(path, value, format string, args ...any) {
		errs = append(errs, &Error{Line: idx.Line(path), Key: path, Value: value, Msg: fmt.Sprintf(format, args...)})
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", c.Log.Level, "is not a log level; use debug, info, warn or error")
	}
	switch c.Log.Format {
	case "auto", "text", "json":
	default:
		bad("log.format", c.Log.Format, "is not a log format; use auto (text on a terminal, JSON otherwise), text or json")
	}
	if !tableNameRE.MatchString(c.Kernel.Table) {
		bad("kernel.table", c.Kernel.Table, "is not a usable table name; use a letter then up to 31 letters, digits or _")
	}
	switch c.Kernel.RouteTable {
	case 253, 254, 255:
		bad("kernel.route_table", fmt.Sprint(c.Kernel.RouteTable), "is a system routing table (default, main or local); use a table of its own such as 100")
	}
	if c.Kernel.Queues < 1 || c.Kernel.Queues > MaxQueues {
		bad("kernel.queues", fmt.Sprint(c.Kernel.Queues), "is not a usable number of queues; use 1-%d (0 means one per CPU, at most %d)", MaxQueues, MaxQueues)
	} else if int(c.Kernel.Queue)+c.Kernel.Queues > 65536 {
		bad("kernel.queue", fmt.Sprint(c.Kernel.Queue), "leaves no room for %d queues; use a queue number below %d", c.Kernel.Queues, 65536-c.Kernel.Queues)
	}
	if c.Kernel.Repair != "on" && c.Kernel.Repair != "off" {
		bad("kernel.repair", c.Kernel.Repair, "is not on or off")
	}
	if c.Kernel.OwnTable != "on" && c.Kernel.OwnTable != "off" {
		bad("kernel.own_table", c.Kernel.OwnTable, "is not on or off")
	}
	if c.Kernel.QueueLen < 8 || c.Kernel.QueueLen > 1<<20 {
		bad("kernel.queue_len", fmt.Sprint(c.Kernel.QueueLen), "is not a usable queue length; use 8-1048576 packets (default %d)", DefaultQueueLen)
	}
	switch c.Kernel.NFQueue {
	case "lean", "go-nfqueue":
	default:
		bad("kernel.nfqueue", c.Kernel.NFQueue, "is not a queue backend; use lean (default) or go-nfqueue")
	}
	switch c.Kernel.Datapath {
	case DatapathNFQueue:
	case DatapathBPF, DatapathAuto:
		if uint32(c.Kernel.Mark)&BPFMark != 0 {
			bad("kernel.mark", fmt.Sprintf("%#x", uint32(c.Kernel.Mark)), "uses bit %#x, which the %s datapath sets on the packets it rewrote; use other bits", BPFMark, c.Kernel.Datapath)
		}
	default:
		bad("kernel.datapath", c.Kernel.Datapath, "is not a datapath; use nfqueue (default: the Go engine through NFQUEUE), bpf (a BPF program at tcx ingress; spliced fails to start without it) or auto (bpf where it loads and attaches, else nfqueue)")
	}
	switch c.Kernel.BPFForward {
	case BPFForwardRedirect, BPFForwardStack:
	default:
		bad("kernel.bpf_forward", c.Kernel.BPFForward, "is not a way to forward; use redirect (default: straight to the egress device) or stack (through the kernel's forwarding path and its netfilter hooks)")
	}
	switch c.Kernel.Resend {
	case ResendGSO, ResendRaw:
	default:
		bad("kernel.resend", c.Kernel.Resend, "is not a way to send taken-over payload; use gso (default: whole packets through the egress device) or raw (segments through the IP output path and its netfilter hooks)")
	}
	for i, name := range c.Kernel.Interfaces {
		switch {
		case !ifaceNameRE.MatchString(name):
			bad(fmt.Sprintf("kernel.interfaces[%d]", i), name, "is not an interface name (1-15 characters, no /, : or white space)")
		case name == "lo":
			bad(fmt.Sprintf("kernel.interfaces[%d]", i), name, "is the loopback interface; spliced flows' packets never arrive there")
		case slices.Contains(c.Kernel.Interfaces[:i], name):
			bad(fmt.Sprintf("kernel.interfaces[%d]", i), name, "is listed twice")
		}
	}
	if len(c.Kernel.Interfaces) > 0 && c.Kernel.Datapath == DatapathNFQueue {
		bad("kernel.interfaces", fmt.Sprint(c.Kernel.Interfaces), "needs kernel.datapath bpf or auto (the nfqueue datapath attaches nothing)")
	}
	if !filepath.IsAbs(c.Kernel.BPFFS) || filepath.Clean(c.Kernel.BPFFS) != c.Kernel.BPFFS {
		bad("kernel.bpffs", c.Kernel.BPFFS, "is not a clean absolute path; use the mount point of a bpf file system such as /sys/fs/bpf (default)")
	}
	if c.Kernel.DivertTimeout.D() < time.Second {
		bad("kernel.divert_timeout", c.Kernel.DivertTimeout.D().String(), "is too short: live flows' entries are refreshed every third of it; use at least 1s (default %v)", DefaultDivertTimeout)
	}
	pprofOK := false
	if msg := ControlSocketProblem(c.Control.Socket); msg != "" {
		bad("control.socket", c.Control.Socket, "%s", msg)
	}
	if a := c.Metrics.Listen; a != "" {
		if _, _, msg := parseListen(a); msg != "" {
			bad("metrics.listen", a, "%s; use an address and port such as 127.0.0.1:9410, or leave it empty for no metrics", msg)
		}
	}
	if a := c.Debug.Pprof; a != "" {
		host, _, msg := parseListen(a)
		ip, err := netip.ParseAddr(host)
		switch {
		case msg != "":
			bad("debug.pprof", a, "%s; use a loopback address and port such as 127.0.0.1:6060, or leave it empty for no profiling", msg)
		case err != nil || !ip.Unmap().IsLoopback():
			bad("debug.pprof", a, "is not a loopback address: Go's profiling handlers expose the daemon's memory contents (heap profiles, goroutine stacks, the command line) to whoever reaches them, so they must stay on 127.0.0.1 or ::1; use e.g. 127.0.0.1:6060 or [::1]:6060")
		default:
			pprofOK = true
		}
	}
	if c.Limits.MaxFlows < 0 {
		bad("limits.max_flows", fmt.Sprint(c.Limits.MaxFlows), "is negative; use a positive number of flows (0 means the default %d)", DefaultMaxFlows)
	}
	if p := c.Limits.ClientIPv6Prefix; p < 32 || p > 128 {
		bad("limits.client_ipv6_prefix", fmt.Sprint(p), "is not a prefix length of 32-128; use 128 (each IPv6 address is a client) or 64 (each /64)")
	}
	if c.Limits.MaxFlowsPerClient < 0 {
		bad("limits.max_flows_per_client", fmt.Sprint(c.Limits.MaxFlowsPerClient), "is negative; use a positive number of flows, or 0 for no cap per client")
	}

	// A forward or socks5 service that never splices by policy still
	// splices on request (splicectl splice) once another service makes
	// the gateway splice: its drain_timeout applies then.
	splicesByPolicy := func(s *Service) bool { return s.Splice.Mode != SpliceNever && s.Splice.Mode != "" }
	splicing := slices.ContainsFunc(c.Services, func(s Service) bool { return splicesByPolicy(&s) })
	splices := func(s *Service) bool {
		return splicesByPolicy(s) || splicing && (s.Proxy == "" || s.Proxy == ProxyForward || s.Proxy == "socks5")
	}
	names := map[string]int{}
	listens := map[Port]int{}
	listenOn := map[netip.AddrPort]int{}
	for i := range c.Services {
		s := &c.Services[i]
		p := fmt.Sprintf("services[%d]", i)
		switch {
		case s.Name == "":
			bad(p, "", "has no name; give each service a unique name such as \"web\"")
		case !serviceNameRE.MatchString(s.Name):
			bad(p+".name", s.Name, "is not a usable service name; start with a lowercase letter, then up to 23 lowercase letters, digits or _ (it names nftables sets)")
		default:
			if j, dup := names[s.Name]; dup {
				bad(p+".name", s.Name, "is already the name of services[%d]; names must be unique", j)
			}
			names[s.Name] = i
		}
		def := LookupProxy(s.Proxy)
		if def != nil && !slices.Contains(def.Modes, s.ListenMode) {
			bad(p+".listen_mode", string(s.ListenMode), "%s", fmt.Sprintf("is not a listen mode of proxy %s; use %s", s.Proxy, orList(def.Modes)))
		}
		if s.Backlog < 1 || s.Backlog > 65535 {
			bad(p+".backlog", fmt.Sprint(s.Backlog), "is not a usable listen backlog; use 1-65535 (default %d; the kernel caps it at net.core.somaxconn)", DefaultBacklog)
		}
		switch s.ListenMode {
		case ListenDirect:
			if len(s.ListenOn) == 0 {
				bad(p, s.Name, "has no listen_on addresses; list the gateway addresses and ports to listen on, such as listen_on: [\"10.1.0.1:1080\", \"[fd01::1]:1080\"]")
			}
			for j, a := range s.ListenOn {
				if k, dup := listenOn[a.AddrPort]; dup {
					bad(fmt.Sprintf("%s.listen_on[%d]", p, j), a.String(), "%s", fmt.Sprintf("is already an address of service %q; each service needs its own", c.Services[k].Name))
				} else {
					listenOn[a.AddrPort] = i
				}
			}
			if s.Listen != 0 || len(s.Ports) > 0 || len(s.Destinations) > 0 || len(s.Sources) > 0 {
				bad(p, s.Name, "is a direct service: listen, ports, destinations and sources are for transparent interception; remove them (use access rules to restrict sources)")
			}
		default:
			if s.Listen == 0 {
				bad(p, s.Name, "has no listen port; set listen to a free port on the gateway for its TPROXY listener, such as 15001")
			} else if j, dup := listens[s.Listen]; dup {
				bad(p+".listen", fmt.Sprint(s.Listen), "is already the listen port of service %q; each service needs its own", c.Services[j].Name)
			} else {
				listens[s.Listen] = i
			}
			if len(s.Ports) == 0 {
				bad(p, s.Name, "has no ports; list the destination ports to intercept, such as ports: [\"80\"]")
			}

			if len(s.ListenOn) > 0 {
				bad(p+".listen_on", s.ListenOn[0].String(), "is only for listen_mode: direct; remove it, or set listen_mode: direct")
			}
		}
		switch {
		case s.Splice.Mode == SpliceBytes && s.Splice.Bytes <= 0:
			bad(p+".splice", string(s.Splice.Mode), "needs splice.bytes, the number of bytes to relay before splicing, such as 1MiB")
		case s.Splice.Mode == SpliceTime && s.Splice.After <= 0:
			bad(p+".splice", string(s.Splice.Mode), "needs splice.after, how long after the connect to splice, such as 10s")
		}
		if d, t := s.Splice.DrainTimeout.D(), c.Kernel.DivertTimeout.D(); splices(s) && t >= time.Second && 2*d > t {
			// A splice's divert entries are refreshed (every third of
			// divert_timeout) only once it is done: one still draining
			// when they time out loses them, and its flow stalls.
			why := ""
			if !splicesByPolicy(s) {
				why = " (its flows are spliced on request, splicectl splice, while another service splices)"
			}
			bad(p+".splice.drain_timeout", d.String(), "is more than half of kernel.divert_timeout (%v): the divert entries of a splice still draining could time out, and its flow stall%s; shorten drain_timeout to %v or less, or lengthen divert_timeout", t, why, t/2)
		}
		if l := s.Splice.Linger.D(); l != 0 && (l < MinLinger || l > MaxLinger) {
			bad(p+".splice.linger", l.String(), "is out of range; use 1s to 1m (the default 5s covers a few retransmissions of a flow's last FIN)")
		}
		if b := s.Splice.SocketBuffer; b != 0 {
			switch {
			case b < MinSocketBuffer || b > MaxSocketBuffer:
				bad(p+".splice.socket_buffer", fmt.Sprint(int64(b)), "is out of range; use 16KiB to 64MiB (such as 256KiB), or leave it out for the kernel's autotuning")
			case s.Proxy != "" && s.Proxy != ProxyForward && s.Proxy != "socks5":
				bad(p+".splice.socket_buffer", fmt.Sprint(int64(b)), "applies to the flows of forward and socks5 services (relayed, then spliced); proxy %s does not use it, so remove it", s.Proxy)
			case s.Splice.Mode == SpliceNever || s.Splice.Mode == "":
				bad(p+".splice.socket_buffer", fmt.Sprint(int64(b)), "bounds what a splice must drain, and this service never splices; remove it, or set splice.mode")
			}
		}
		if def != nil && def.Validate != nil {
			def.Validate(s, func(key, value, msg string) {
				if key != "" {
					key = p + "." + key
				} else {
					key = p
				}
				bad(key, value, "%s", msg)
			})
		}
		for j, r := range s.Access.Rules {
			if r.Action == "" {
				bad(fmt.Sprintf("%s.access.rules[%d]", p, j), "", "has no action; set action: allow or action: deny")
			}
		}
		for j := 0; j < i && s.ListenMode == ListenTransparent; j++ {
			if c.Services[j].ListenMode != ListenTransparent {
				continue
			}
			if what, ok := overlap(&c.Services[j], s); ok {
				bad(p+".ports", s.Name, "overlaps service %q: both intercept %s; narrow the ports, destinations or sources of one of them", c.Services[j].Name, what)
			}
		}
	}
	for i := range c.Services {
		s := &c.Services[i]
		if s.ListenMode != ListenDirect {
			continue
		}
		for j, a := range s.ListenOn {
			for k := range c.Services {
				t := &c.Services[k]
				if t.ListenMode != ListenTransparent {
					continue
				}
				if to, from, ok := intercepts(t, a.AddrPort); ok {
					then := "whose connect here from the client's address then times out, and they are reset"
					if t.Upstream == NAT {
						then = "which connects here again from the gateway's address: this service sees every such client as the gateway"
					}
					bad(fmt.Sprintf("services[%d].listen_on[%d]", i, j), a.String(), "%s", fmt.Sprintf("is intercepted by transparent service %q (tcp port %d from %s to %s): its TPROXY rule takes connections to the gateway's own addresses too, so these clients reach %q instead of this service (%s); narrow the destinations of %q so that they leave out this address, or give this service another port", t.Name, a.Port(), from, to, t.Name, then, t.Name))
					break
				}
			}
		}
	}
	var lns []listener
	for i := range c.Services {
		s := &c.Services[i]
		p := fmt.Sprintf("services[%d]", i)
		switch {
		case s.ListenMode == ListenDirect:
			for j, a := range s.ListenOn {
				lns = append(lns, listener{
					key: fmt.Sprintf("%s.listen_on[%d]", p, j), value: a.String(), owner: fmt.Sprintf("service %q", s.Name),
					port: a.Port(), addr: a.Addr(), direct: true,
				})
			}
		case s.Listen != 0:
			lns = append(lns, listener{
				key: p + ".listen", value: fmt.Sprint(s.Listen), owner: fmt.Sprintf("service %q", s.Name),
				port: uint16(s.Listen), all: true, transparent: true,
			})
		}
	}
	for _, k := range []struct {
		key, value string
		ok         bool
	}{{"metrics.listen", c.Metrics.Listen, true}, {"debug.pprof", c.Debug.Pprof, pprofOK}} {
		if k.value == "" || !k.ok {
			continue
		}
		host, port, msg := parseListen(k.value)
		if msg != "" {
			continue
		}
		l := listener{key: k.key, value: k.value, port: port}
		if ip, err := netip.ParseAddr(host); err == nil {
			l.addr = ip.Unmap()
		}
		// net.Listen("tcp") takes every address of both families for
		// an empty host, 0.0.0.0 or :: (one dual-stack socket).
		l.all = host == "" || l.addr.IsUnspecified()
		lns = append(lns, l)
	}
	for i := range lns {
		for j := range i {
			if clash(&lns[j], &lns[i]) {
				bad(lns[i].key, lns[i].value, "%s", fmt.Sprintf("%swants port %d%s, which %s takes on %s: one of them could not bind; give one of them another port",
					lns[i].of(), lns[i].port, lns[i].on(), lns[j].who(), lns[j].where()))
				break
			}
		}
	}

	if len(errs) > 0 {
		return errs
	}
	return nil
}

// listener is a TCP listener the configuration opens, for the check
// that they can all bind.
type listener struct {
	key, value string
	owner      string // service "web"; empty for metrics and pprof
	port       uint16
	addr       netip.Addr // invalid for a host name (resolved at start) or all
	all        bool       // every address of both families
	// transparent: a transparent service's TPROXY listeners (0.0.0.0 and
	// [::], one per family); direct: one of listen_on.
	transparent, direct bool
}

// clash reports whether a and b cannot both listen: on one port, one
// takes every address, both take the same address, or one takes every
// address of the other's family (a direct service's 0.0.0.0 or [::]).
// Linux refuses such a bind while the other socket listens, whatever
// SO_REUSEADDR says. Pairs the service checks above already report
// (two transparent services on one port, one listen_on address twice)
// are left out.
func clash(a, b *listener) bool {
	switch {
	case a.port != b.port:
		return false
	case a.transparent && b.transparent:
		return false
	case a.direct && b.direct && a.addr == b.addr:
		return false
	case a.all || b.all:
		return true
	case !a.addr.IsValid() || !b.addr.IsValid():
		return false
	case a.addr.Is4() != b.addr.Is4():
		return false
	}
	return a.addr == b.addr || a.addr.IsUnspecified() || b.addr.IsUnspecified()
}

// on says where l wants its port when it is every address.
func (l *listener) on() string {
	switch {
	case l.transparent:
		return " on 0.0.0.0 and [::] (its TPROXY listeners)"
	case l.all:
		return " on every address"
	}
	return ""
}

// of names l's service, if any, for an error keyed on l.
func (l *listener) of() string {
	if l.owner != "" {
		return "of " + l.owner + " "
	}
	return ""
}

// who names l: its service and key, or its key.
func (l *listener) who() string {
	if l.owner != "" {
		return fmt.Sprintf("%s (%s)", l.owner, l.key)
	}
	return l.key
}

// where says which addresses l takes.
func (l *listener) where() string {
	switch {
	case l.transparent:
		return "0.0.0.0 and [::]"
	case l.all:
		return "every address"
	case l.addr.IsValid():
		return l.addr.String()
	}
	host, _, _ := net.SplitHostPort(l.value)
	return host
}

// ControlSocketProblem says what is wrong with sock as the control
// socket's path (control.socket, or spliced's -socket flag), and how to
// fix it; "" when nothing is, or sock is empty (no control socket).
func ControlSocketProblem(sock string) string {
	switch {
	case sock == "":
	case !filepath.IsAbs(sock):
		return "is not an absolute path; use one such as /run/spliced/spliced.sock (default), or off"
	case len(sock) > maxSocketPath:
		return fmt.Sprintf("is longer than the %d bytes a Unix socket address holds; use a shorter path such as /run/spliced/spliced.sock (default)", maxSocketPath)
	}
	return ""
}

// maxSocketPath is the longest path a Unix socket address holds (sun_path
// less its terminating NUL).
const maxSocketPath = 107

// parseListen splits a TCP listen address (metrics.listen, debug.pprof)
// as net.Listen reads it: host:port, the host empty (every address), an
// IP address or a name, the port a number 1-65535 (net.Listen would look
// a service name up, and take 0 for any free port). msg says what is
// wrong, or is empty.
func parseListen(a string) (host string, port uint16, msg string) {
	host, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, "is not host:port (an IPv6 address goes in brackets: [::1]:9410)"
	}
	if _, err := netip.ParseAddr(host); err != nil && host != "" && !hostNameRE.MatchString(host) {
		return "", 0, fmt.Sprintf("has host %q, not an IP address or host name", host)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Sprintf("has port %q, not a port number 1-65535", p)
	}
	return host, uint16(n), ""
}

// overlap reports whether two services could both match one flow, and a
// description of such a flow.
func overlap(a, b *Service) (string, bool) {
	var port string
	for _, x := range a.Ports {
		for _, y := range b.Ports {
			if x.Overlaps(y) {
				port = PortRange{max(x.First, y.First), min(x.Last, y.Last)}.String()
			}
		}
	}
	if port == "" {
		return "", false
	}
	// A flow's two addresses share a family, so a service for IPv4
	// sources and one for IPv6 destinations never match the same flow:
	// the prefixes must overlap within one family.
	for _, v4 := range []bool{true, false} {
		dst, ok := prefixesOverlap(a.Destinations, b.Destinations, v4)
		if !ok {
			continue
		}
		src, ok := prefixesOverlap(a.Sources, b.Sources, v4)
		if !ok {
			continue
		}
		return fmt.Sprintf("tcp port %s from %s to %s", port, src, dst), true
	}
	return "", false
}

// intercepts reports whether the transparent service t intercepts
// connections to a, a direct service's listen_on address: its rules
// match the port and every destination, the gateway's own addresses
// included, before the connection reaches a listener. For one address,
// t's destinations must hold it; for 0.0.0.0 or [::], they must be
// every address of its family (a prefix of t's may or may not hold an
// address of the gateway's: that is not known here). It returns the
// destinations and sources that show it.
func intercepts(t *Service, a netip.AddrPort) (to, from string, ok bool) {
	if !containsPort(t.Ports, a.Port()) {
		return "", "", false
	}
	v4 := a.Addr().Unmap().Is4()
	from, ok = prefixesOverlap(t.Sources, nil, v4)
	if !ok {
		return "", "", false
	}
	if a.Addr().IsUnspecified() {
		// A wildcard listener: intercepted only where the service takes
		// every destination of the family (none listed, or 0.0.0.0/0,
		// ::/0).
		if len(t.Destinations) > 0 && !slices.ContainsFunc(ofFamily(t.Destinations, v4), func(p Prefix) bool { return p.Bits() == 0 }) {
			return "", "", false
		}
		return "any address", from, true
	}
	if !containsAddr(t.Destinations, a.Addr()) {
		return "", "", false
	}
	if len(t.Destinations) == 0 {
		return "any address", from, true
	}
	return a.Addr().String(), from, true
}

// prefixesOverlap reports whether two lists of prefixes (an empty list is
// any address) have an address of the family v4 selects in common, and
// the narrower prefix that shows it.
func prefixesOverlap(a, b []Prefix, v4 bool) (string, bool) {
	a, b = ofFamily(a, v4), ofFamily(b, v4)
	anyAddr := "any IPv6 address"
	if v4 {
		anyAddr = "any IPv4 address"
	}
	switch {
	case a == nil && b == nil:
		return anyAddr, true
	case a == nil && len(b) > 0:
		return b[0].String(), true
	case b == nil && len(a) > 0:
		return a[0].String(), true
	}
	for _, x := range a {
		for _, y := range b {
			if x.Overlaps(y.Prefix) {
				if x.Bits() > y.Bits() {
					return x.String(), true
				}
				return y.String(), true
			}
		}
	}
	return "", false
}

// ofFamily returns the prefixes of one family: nil for an empty list (any
// address), and an empty, non-nil list when none is of that family.
func ofFamily(ps []Prefix, v4 bool) []Prefix {
	if len(ps) == 0 {
		return nil
	}
	out := make([]Prefix, 0, len(ps))
	for _, p := range ps {
		if p.Addr().Is4() == v4 {
			out = append(out, p)
		}
	}
	return out
}

// EndsInNumber reports whether a host name's last label is a number,
// decimal or hexadecimal (0x...): URL parsers (WHATWG) and inet_aton,
// which many servers call, read such a name as an IPv4 address, also
// when written 010.0.0.5, 0x0a.0.0.5, 10.5 or 167772165. The HTTP proxy
// takes no such host but a canonical IPv4 address, so that a route for
// 10.0.0.5 holds against every spelling; SOCKS5 refuses such a rule
// domain, which no request's name could match.
func EndsInNumber(name string) bool {
	last := strings.ToLower(name[strings.LastIndexByte(name, '.')+1:])
	if hex, ok := strings.CutPrefix(last, "0x"); ok {
		return strings.Trim(hex, "0123456789abcdef") == ""
	}
	return last != "" && strings.Trim(last, "0123456789") == ""
}
