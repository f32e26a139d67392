package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"spliced/logging"
	"spliced/proxy"
	"spliced/splice"
)

// Forwarding. A proxied flow's packets are delivered to the gateway's own
// sockets, which needs no forwarding: a transparent proxy or a load
// balancer (direct mode) may run with it off (net.ipv4.ip_forward=0, or
// IPv6 forwarding off on a router that routes only IPv4). Once spliced,
// the flow's packets are rewritten and forwarded instead, on both
// datapaths (the bpf datapath's route lookup, bpf_fib_lookup, answers
// BPF_FIB_LKUP_RET_FWD_DISABLED as the stack drops): with forwarding off
// where they arrive, every spliced packet was dropped and the flow stalled
// at once (TestLabForwardingOff). Such a splice is refused, the flow stays
// proxied, and a warning says what to turn on.
//
// The kernel checks IPv4 forwarding on the interface a packet arrives on
// (net.ipv4.conf.IF.forwarding, which net.ipv4.ip_forward sets for every
// interface) and IPv6 forwarding for the host (net.ipv6.conf.all.forwarding),
// unless the interface forces it (net.ipv6.conf.IF.force_forwarding, Linux
// 6.17 and later).

// forwardingState caches the interfaces that do not forward, per family.
type forwardingState struct {
	mu       sync.Mutex
	read     time.Time
	off4     map[int]string // ifindex -> name
	off6     map[int]string
	refusals spliceRefusal
}

// forwardingRefresh is how long a reading of the sysctls holds.
const forwardingRefresh = 5 * time.Second

// forget makes the next offInterfaces read the settings again.
func (s *forwardingState) forget() {
	s.mu.Lock()
	s.off4, s.off6 = nil, nil
	s.mu.Unlock()
}

// offInterfaces returns the interfaces that do not forward IPv4 and IPv6
// packets, read at most every forwardingRefresh.
func (s *forwardingState) offInterfaces(now time.Time) (off4, off6 map[int]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.off4 != nil && now.Sub(s.read) < forwardingRefresh {
		return s.off4, s.off6
	}
	s.read = now
	s.off4, s.off6 = NotForwarding()
	return s.off4, s.off6
}

// NotForwarding lists the interfaces (but loopback ones) on which the
// kernel does not forward IPv4 packets, and those on which it does not
// forward IPv6 packets, by index.
func NotForwarding() (off4, off6 map[int]string) {
	off4, off6 = map[int]string{}, map[int]string{}
	ifs, err := net.Interfaces()
	if err != nil {
		return off4, off6
	}
	all6 := sysctlInt("ipv6", "all", "forwarding", 1)
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		if sysctlInt("ipv4", ifc.Name, "forwarding", 1) == 0 {
			off4[ifc.Index] = ifc.Name
		}
		if all6 == 0 && sysctlInt("ipv6", ifc.Name, "force_forwarding", 0) == 0 {
			off6[ifc.Index] = ifc.Name
		}
	}
	return off4, off6
}

// sysctlInt reads net.FAMILY.conf.NAME.KEY (forwarding, rp_filter), or
// def when it cannot (no such interface any more, an IPv6 key on a host
// without IPv6, a key this kernel does not have).
func sysctlInt(family, name, key string, def int) int {
	b, err := os.ReadFile(filepath.Join("/proc/sys/net", family, "conf", name, key))
	if err != nil {
		return def
	}
	var v int
	if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &v); err != nil {
		return def
	}
	return v
}

// legAddrs are the addresses of a flow's two connections: the client's
// (its peer the client, its local address the original destination) and
// the upstream one (its peer the server, its local address the gateway's
// or, transparent, the client's).
type legAddrs struct {
	clientLocal, clientRemote, upLocal, upRemote netip.Addr
}

func legsOfConns(client, upstream *net.TCPConn) legAddrs {
	return legAddrs{addrPort(client.LocalAddr()).Addr(), addrPort(client.RemoteAddr()).Addr(),
		addrPort(upstream.LocalAddr()).Addr(), addrPort(upstream.RemoteAddr()).Addr()}
}

// legsOfKeys are a spliced flow's legs from its input tuples.
func legsOfKeys(k [2]splice.Key) legAddrs {
	c, s := k[splice.C2S], k[splice.S2C]
	return legAddrs{c.DstAddrPort().Addr(), c.SrcAddrPort().Addr(), s.DstAddrPort().Addr(), s.SrcAddrPort().Addr()}
}

// forwardingRefusal says why the kernel would drop the spliced packets of
// the flow whose legs are l (forwarding is off where they arrive), or ""
// when it would not, and its cause. It costs nothing while every
// interface forwards, two route lookups otherwise.
func (g *Gateway) forwardingRefusal(l legAddrs) (refusalCause, string) {
	off4, off6 := g.fwd.offInterfaces(time.Now())
	if len(off4) == 0 && len(off6) == 0 {
		return refusalCause{}, ""
	}
	// Packets from each peer arrive on the interface of the route to it.
	for _, peer := range []netip.Addr{l.clientRemote, l.upRemote} {
		off := off4
		if peer.Is6() {
			off = off6
		}
		if len(off) == 0 {
			continue
		}
		in, err := proxy.RouteTo(peer)
		if err != nil || in.Local {
			continue
		}
		name, ok := off[in.Ifindex]
		if !ok {
			continue
		}
		if peer.Is4() {
			return refusalCause{4, in.Ifindex}, fmt.Sprintf("IPv4 forwarding is off on %s (net.ipv4.conf.%s.forwarding is 0): once spliced, this flow's packets from %s arrive there to be forwarded, and the kernel would drop them; turn forwarding on (sysctl -w net.ipv4.ip_forward=1) or keep the service proxied (splice.mode: never)",
				name, name, peer)
		}
		return refusalCause{6, in.Ifindex}, fmt.Sprintf("IPv6 forwarding is off (net.ipv6.conf.all.forwarding is 0): once spliced, this flow's packets from %s arrive on %s to be forwarded, and the kernel would drop them; turn forwarding on (sysctl -w net.ipv6.conf.all.forwarding=1) or keep the service proxied (splice.mode: never)",
			peer, name)
	}
	return refusalCause{}, ""
}

// forwardingWarnings are the latest refusals' reasons of the interfaces
// that still do not forward, for the status.
func (g *Gateway) forwardingWarnings() []string {
	off4, off6 := g.fwd.offInterfaces(time.Now())
	return g.fwd.refusals.current(func(c refusalCause) bool {
		off := off4
		if c.family == 6 {
			off = off6
		}
		_, ok := off[c.ifindex]
		return ok
	})
}

// spliceRefusal keeps the latest reason of one kind of splice refusal per
// cause (an interface), and when one was last logged: the log says it
// once a minute, the status for as long as its cause lasts.
type spliceRefusal struct {
	mu      sync.Mutex
	warned  time.Time
	reasons map[refusalCause]string
}

// refusalCause is what makes splices refused: a setting of one family on
// one interface.
type refusalCause struct{ family, ifindex int }

// refuse records reason, due to cause, and logs it for flow f, at most
// once a minute.
func (r *spliceRefusal) refuse(g *Gateway, f *proxy.Flow, cause refusalCause, reason string) {
	r.mu.Lock()
	if r.reasons == nil {
		r.reasons = map[refusalCause]string{}
	}
	r.reasons[cause] = reason
	warn := time.Since(r.warned) > time.Minute
	if warn {
		r.warned = time.Now()
	}
	r.mu.Unlock()
	if warn {
		g.log.Warn("splice refused: "+reason, logging.KeyFlow, f.ID, logging.KeyService, f.Service)
	}
}

// current returns the reasons whose cause lasts (sorted), and forgets the
// others.
func (r *spliceRefusal) current(lasts func(refusalCause) bool) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reasons) == 0 {
		return nil
	}
	var out []string
	for cause, reason := range r.reasons {
		if !lasts(cause) {
			delete(r.reasons, cause)
			continue
		}
		out = append(out, reason)
	}
	slices.Sort(out)
	return out
}
