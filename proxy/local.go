package proxy

import (
	"encoding/binary"
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
func routeIsLocal(a netip.Addr) (bool, error) {
	r, err := RouteTo(a)
	return r.Local, err
}

// Route is what the routing tables say of a destination.
type Route struct {
	Local   bool // delivered to the gateway itself
	Ifindex int  // the output interface (RTA_OIF)
}

// RouteTo asks the routing tables (RTM_GETROUTE, no mark) where a
// packet to a goes: one netlink round trip, about 25 us. A destination
// without a route is not local, with no interface.
func RouteTo(a netip.Addr) (Route, error) { return routeGet(a, 0) }

// LocalRoute is RouteTo for the routing entry a matches (`ip route get
// fibmatch`): for a local address, Ifindex is the interface of its local
// route (the interface the address is on; lo for an AnyIP range), where
// RouteTo says lo. It is the interface the kernel's reverse path check
// compares with the one a packet from a arrives on. Kernels before 4.13
// ignore the flag and answer as RouteTo does.
func LocalRoute(a netip.Addr) (Route, error) { return routeGet(a, unix.RTM_F_FIB_MATCH) }

func routeGet(a netip.Addr, flags uint32) (r Route, err error) {
	a = a.Unmap()
	routeConn.Lock()
	defer routeConn.Unlock()
	if routeConn.nl == nil {
		if routeConn.nl, err = netlink.Dial(unix.NETLINK_ROUTE, nil); err != nil {
			routeConn.nl = nil
			return Route{}, err
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
		return Route{}, err
	}
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = unix.AF_INET6
	if a.Is4() {
		rtm[0] = unix.AF_INET
	}
	rtm[1] = uint8(a.BitLen())                    // rtm_dst_len
	binary.NativeEndian.PutUint32(rtm[8:], flags) // rtm_flags
	msgs, err := nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETROUTE, Flags: netlink.Request},
		Data:   append(rtm[:], attrs...),
	})
	if err != nil {
		// No route (ENETUNREACH): not local; a connect fails anyway.
		if errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH) {
			return Route{}, nil
		}
		return Route{}, err
	}
	if len(msgs) != 1 || len(msgs[0].Data) < unix.SizeofRtMsg {
		return Route{}, errNoRoute
	}
	r.Local = msgs[0].Data[7] == unix.RTN_LOCAL // rtm_type
	ad, err := netlink.NewAttributeDecoder(msgs[0].Data[unix.SizeofRtMsg:])
	if err != nil {
		return Route{}, err
	}
	for ad.Next() {
		if ad.Type() == unix.RTA_OIF {
			r.Ifindex = int(ad.Uint32())
		}
	}
	return r, ad.Err()
}

var errNoRoute = errors.New("route lookup: unexpected answer")
