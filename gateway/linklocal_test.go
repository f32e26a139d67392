package gateway

import (
	"net/netip"
	"testing"
)

func TestLinkLocalPeer(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, c := range []struct {
		endpoints []netip.AddrPort
		want      string
	}{
		{[]netip.AddrPort{ap("[fd00:1::2]:40000"), ap("[fd00:2::2]:80")}, ""},
		{[]netip.AddrPort{ap("10.1.0.2:40000"), ap("169.254.1.1:80")}, ""}, // IPv4 link-local is routed
		{[]netip.AddrPort{ap("[fe80::1%eth0]:40000"), ap("[fd00:2::2]:80")}, "fe80::1%eth0"},
		{[]netip.AddrPort{ap("[fd00:1::2]:40000"), ap("[febf::1]:80")}, "febf::1"},
		{[]netip.AddrPort{ap("[fd00:1::2]:40000"), ap("[fec0::1]:80")}, ""}, // site-local, deprecated: routed
		{[]netip.AddrPort{ap("[::ffff:169.254.0.1]:40000")}, ""},
	} {
		a, ok := linkLocalPeer(c.endpoints...)
		if got := a.String(); ok != (c.want != "") || ok && got != c.want {
			t.Errorf("linkLocalPeer(%v) = %v, %v; want %q", c.endpoints, got, ok, c.want)
		}
	}
}
