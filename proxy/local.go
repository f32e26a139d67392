package proxy

import (
	"errors"
	"net/netip"
	"sync"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// IsGatewayAddress reports whether a connection to a would end on the
// gateway itself: a loopback or unspecified address, or one its routing
// table delivers locally (an address of one of its interfaces, or a
// local route such as an AnyIP range), as `ip route get` says. It asks
// the kernel each time (one netlink round trip, about 25 us); when it
// cannot, it falls back to the interfaces' addresses.
func IsGatewayAddress(a netip.Addr) bool {
	a = a.Unmap()
	if !a.IsValid() || a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	local, err := routeIsLocal(a)
	if err != nil {
		return isOwnAddress(a)
	}
	return local
}

// routeConn is the netlink socket of routeIsLocal, dialled when first
// needed (a socket per lookup cost 50 us more than the lookup) and
// dropped after an error.
var routeConn struct {
	sync.Mutex
	nl *netlink.Conn
}

// routeIsLocal asks the routing tables (RTM_GETROUTE, no mark) whether
// a is delivered locally.
func routeIsLocal(a netip.Addr) (local bool, err error) {
	routeConn.Lock()
	defer routeConn.Unlock()
	if routeConn.nl == nil {
		if routeConn.nl, err = netlink.Dial(unix.NETLINK_ROUTE, nil); err != nil {
			routeConn.nl = nil
			return false, err
		}
	}
	nl := routeConn.nl
	defer func() {
		if err != nil {
			nl.Close()
			routeConn.nl = nil
		}
	}()
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(unix.RTA_DST, a.AsSlice())
	attrs, err := ae.Encode()
	if err != nil {
		return false, err
	}
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = unix.AF_INET6
	if a.Is4() {
		rtm[0] = unix.AF_INET
	}
	rtm[1] = uint8(a.BitLen()) // rtm_dst_len
	msgs, err := nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETROUTE, Flags: netlink.Request},
		Data:   append(rtm[:], attrs...),
	})
	if err != nil {
		// No route (ENETUNREACH): not local; a connect fails anyway.
		if errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH) {
			return false, nil
		}
		return false, err
	}
	if len(msgs) != 1 || len(msgs[0].Data) < unix.SizeofRtMsg {
		return false, errNoRoute
	}
	return msgs[0].Data[7] == unix.RTN_LOCAL, nil // rtm_type
}

var errNoRoute = errors.New("route lookup: unexpected answer")
