package gateway

import (
	"net"
	"strings"
	"testing"
)

// loopbackConn returns the client end of a connection to a listener on
// addr ("127.0.0.1:0", "[::1]:0").
func loopbackConn(t *testing.T, network, addr string) *net.TCPConn {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn)
}

// TestMixedFamilies: a flow whose legs are of two families is refused
// before anything is diverted (the HTTP proxy's responses from a backend
// of the other family were diverted and captured each time, for the
// engine to refuse them then); legs of one family are not, an IPv4 one
// on an IPv6 socket (a mapped address) included.
func TestMixedFamilies(t *testing.T) {
	v4 := loopbackConn(t, "tcp4", "127.0.0.1:0")
	v6 := loopbackConn(t, "tcp6", "[::1]:0")
	mapped := loopbackConn(t, "tcp", "[::ffff:127.0.0.1]:0")
	if r := mixedFamilies(v4, v6); !strings.Contains(r, "two address families") {
		t.Errorf("IPv4 client, IPv6 server: %q, want a refusal", r)
	}
	if r := mixedFamilies(v6, v4); !strings.Contains(r, "two address families") {
		t.Errorf("IPv6 client, IPv4 server: %q, want a refusal", r)
	}
	for _, c := range [][2]*net.TCPConn{{v4, v4}, {v6, v6}, {mapped, v4}, {v4, mapped}} {
		if r := mixedFamilies(c[0], c[1]); r != "" {
			t.Errorf("%v and %v: %q, want none", c[0].RemoteAddr(), c[1].RemoteAddr(), r)
		}
	}
}
