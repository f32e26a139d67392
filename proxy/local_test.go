package proxy

import (
	"net"
	"net/netip"
	"os/exec"
	"testing"
)

// TestIsGatewayAddress: loopback, unspecified and the addresses of the
// machine's interfaces are the gateway's; documentation addresses are
// not.
func TestIsGatewayAddress(t *testing.T) {
	for _, s := range []string{"127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"} {
		if !IsGatewayAddress(netip.MustParseAddr(s)) {
			t.Errorf("%s: not the gateway's", s)
		}
	}
	for _, s := range []string{"192.0.2.1", "2001:db8::1", "198.51.100.7"} {
		if IsGatewayAddress(netip.MustParseAddr(s)) {
			t.Errorf("%s: the gateway's", s)
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, ia := range addrs {
		ipn, ok := ia.(*net.IPNet)
		if !ok {
			continue
		}
		a, _ := netip.AddrFromSlice(ipn.IP)
		if a = a.Unmap(); a.IsLoopback() || a.IsLinkLocalUnicast() {
			continue
		}
		n++
		local, err := routeIsLocal(a)
		if err != nil || !local {
			t.Errorf("%s, an interface's address: route lookup says local=%v, %v", a, local, err)
		}
	}
	local, err := routeIsLocal(netip.MustParseAddr("127.0.0.1"))
	if err != nil || !local {
		t.Errorf("127.0.0.1: route lookup says local=%v, %v", local, err)
	}
	t.Logf("%d interface addresses checked", n)
}

// TestLocalRoute: for an address of an interface, LocalRoute names that
// interface, the one the kernel's reverse path check compares with a
// packet's, where RouteTo names lo; for other destinations the two
// agree.
func TestLocalRoute(t *testing.T) {
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip(8)")
	}
	inNetNS(t, func() {
		// The cached socket may belong to the host's namespace.
		dropRouteConn()
		defer dropRouteConn()
		if out, err := exec.Command("sh", "-c", "ip link add v0 type veth peer name v1 && ip addr add 10.1.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up").CombinedOutput(); err != nil {
			t.Errorf("veth: %v: %s", err, out)
			return
		}
		v0, err := net.InterfaceByName("v0")
		if err != nil {
			t.Error(err)
			return
		}
		lo, err := net.InterfaceByName("lo")
		if err != nil {
			t.Error(err)
			return
		}
		own, peer := netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("::ffff:10.1.0.9")
		for _, c := range []struct {
			name string
			get  func(netip.Addr) (Route, error)
			a    netip.Addr
			want Route
		}{
			{"LocalRoute", LocalRoute, own, Route{Local: true, Ifindex: v0.Index}},
			{"RouteTo", RouteTo, own, Route{Local: true, Ifindex: lo.Index}},
			{"LocalRoute", LocalRoute, peer, Route{Ifindex: v0.Index}},
			{"RouteTo", RouteTo, peer, Route{Ifindex: v0.Index}},
		} {
			if r, err := c.get(c.a); err != nil || r != c.want {
				t.Errorf("%s(%v) = %+v, %v; want %+v", c.name, c.a, r, err, c.want)
			}
		}
	})
}

// dropRouteConn closes the socket of the route lookups, for the next to
// dial one in the calling thread's network namespace.
func dropRouteConn() {
	routeConn.Lock()
	defer routeConn.Unlock()
	if routeConn.nl != nil {
		routeConn.nl.Close()
		routeConn.nl = nil
	}
}
