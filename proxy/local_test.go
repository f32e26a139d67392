package proxy

import (
	"net"
	"net/netip"
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
