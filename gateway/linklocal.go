package gateway

import (
	"net/netip"
)

// linkLocalPeer returns the first IPv6 link-local address (fe80::/10)
// among a flow's endpoints, if any. Such a flow cannot be spliced: its
// spliced packets would have to be forwarded from one link to another
// with that address as source or destination, and IPv6 routing keeps a
// link-local address on its link. The kernel does not forward a packet
// from one to another interface (ip6_forward answers "beyond scope of
// source address"), and it routes one to a link-local destination back
// out of the interface it came in on (the route is looked up on the
// input interface); the bpf datapath's lookup finds no better. Proxied,
// the gateway's sockets talk to each peer on its own link, which works.
func linkLocalPeer(endpoints ...netip.AddrPort) (netip.Addr, bool) {
	for _, ap := range endpoints {
		if a := ap.Addr().Unmap(); a.Is6() && a.IsLinkLocalUnicast() {
			return a, true
		}
	}
	return netip.Addr{}, false
}
