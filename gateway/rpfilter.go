package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"spliced/proxy"
)

// Strict reverse path filtering. A spliced NAT flow's packets carry the
// gateway's own address once rewritten (the client's toward the server
// leave from the gateway's address, and, when the client connected to an
// address of the gateway, the server's toward it come from that
// address), and they arrive on the other leg's interface. With
// net.ipv4.conf.{all,IF}.rp_filter=1 (strict; hardening guides ask for
// it) the kernel drops them, as the gateway's address is not routed out
// of that interface: on the nfqueue datapath such a flow stalled right
// after its splice (TestLabStrictReversePath; loose mode, 2, lets them
// through; the bpf datapath's redirect checks the original source
// itself). IPv6 has no rp_filter. A splice that strict filtering would
// break is refused, and the flow stays proxied, with a warning that says
// what to change.

// rpfFilter caches the interfaces whose IPv4 reverse path filter is
// strict: the larger of conf.all and conf.IF (what the kernel applies).
type rpfFilter struct {
	mu       sync.Mutex
	read     time.Time
	strict   map[int]string // ifindex -> name
	refusals spliceRefusal
}

// rpfRefresh is how long a reading of the sysctls holds.
const rpfRefresh = 5 * time.Second

// forget makes the next strictInterfaces read the settings again.
func (r *rpfFilter) forget() {
	r.mu.Lock()
	r.strict = nil
	r.mu.Unlock()
}

// strictInterfaces returns the interfaces with strict filtering, read at
// most every rpfRefresh (a few file reads per interface).
func (r *rpfFilter) strictInterfaces(now time.Time) map[int]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.strict != nil && now.Sub(r.read) < rpfRefresh {
		return r.strict
	}
	r.read, r.strict = now, map[int]string{}
	all := sysctlInt("ipv4", "all", "rp_filter", 0)
	ifs, err := net.Interfaces()
	if err != nil {
		return r.strict
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback == 0 && max(all, sysctlInt("ipv4", ifc.Name, "rp_filter", 0)) == 1 {
			r.strict[ifc.Index] = ifc.Name
		}
	}
	return r.strict
}

// reversePathRefusal says why strict reverse path filtering would drop
// the spliced packets of the flow whose legs are l, or
// "" when it would not (or does not apply: IPv6, the bpf datapath's
// redirect, but where an interface's tc ingress qdisc leaves what arrives
// there to the stack), and its cause: the strict interface.
func (g *Gateway) reversePathRefusal(l legAddrs) (refusalCause, string) {
	if g.redirectsSpliced() {
		return refusalCause{}, ""
	}
	clientAddr, serverAddr := l.clientRemote, l.upRemote
	if !clientAddr.Is4() || !serverAddr.Is4() {
		return refusalCause{}, ""
	}
	strict := g.rpf.strictInterfaces(time.Now())
	if len(strict) == 0 {
		return refusalCause{}, ""
	}
	// The source a rewritten packet carries, and the peer it comes
	// from (on the interface of the route to that peer).
	for _, d := range []struct{ src, from netip.Addr }{
		{l.upLocal, clientAddr},
		{l.clientLocal, serverAddr},
	} {
		src, err := proxy.LocalRoute(d.src)
		if err != nil || !src.Local {
			continue
		}
		in, err := proxy.RouteTo(d.from)
		if err != nil || g.redirectsFrom(in.Ifindex) {
			continue
		}
		if name, ok := strict[in.Ifindex]; ok && rpfDrops(src, in.Ifindex) {
			also := "as does kernel.datapath: bpf"
			if g.redirects() {
				also = "or no tc ingress qdisc on " + name + " (the bpf datapath's redirect leaves what arrives there to the stack, so that its filters see it)"
			}
			return refusalCause{4, in.Ifindex}, fmt.Sprintf("strict reverse path filtering on %s (net.ipv4.conf.all.rp_filter or net.ipv4.conf.%s.rp_filter is 1) would drop this flow's packets once spliced: they carry the gateway's own address %s and arrive from %s on %s; loose filtering lets them through (sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2), %s",
				name, name, d.src, d.from, name, name, also)
		}
	}
	return refusalCause{}, ""
}

// rpfDrops says whether strict filtering drops a packet whose source is
// the local address with route src (proxy.LocalRoute) arriving on the
// interface in: unless the address's local route is on that interface
// (a gateway with one interface for both legs), the kernel finds no
// route back through in (__fib_validate_source: the nexthop's device is
// not in, and rp_filter is 1).
func rpfDrops(src proxy.Route, in int) bool {
	return src.Ifindex != in
}

// reversePathWarnings are the latest refusals' reasons of the interfaces
// that still filter strictly, for the status.
func (g *Gateway) reversePathWarnings() []string {
	strict := g.rpf.strictInterfaces(time.Now())
	return g.rpf.refusals.current(func(c refusalCause) bool { _, ok := strict[c.ifindex]; return ok })
}
