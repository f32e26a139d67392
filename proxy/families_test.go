package proxy

import (
	"net"
	"testing"
)

// loopbackConn returns the two ends of a connection from dial's address
// to a listener on addr ("127.0.0.1:0", "[::1]:0").
func loopbackConn(t *testing.T, addr, dial string) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	c, err := net.Dial("tcp", net.JoinHostPort(dial, port))
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestTwoFamilies: a flow whose legs are of two families is told apart
// (the gateway's Splice refuses it before anything is diverted: the HTTP
// proxy's responses from a backend of the other family were diverted and
// captured each time, for the engine to refuse them then); legs of one
// family are not, an IPv4 one on an IPv6 socket (a mapped address)
// included.
func TestTwoFamilies(t *testing.T) {
	v4, _ := loopbackConn(t, "127.0.0.1:0", "127.0.0.1")
	v6, _ := loopbackConn(t, "[::1]:0", "::1")
	// An IPv4 client of a dual-stack listener: its accepted socket's
	// addresses are IPv4-mapped IPv6 ones.
	_, mapped := loopbackConn(t, "[::]:0", "127.0.0.1")
	if a := mapped.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); !a.Is4In6() {
		t.Fatalf("the dual-stack socket's address %v is not IPv4-mapped", a)
	}
	if !TwoFamilies(v4, v6) || !TwoFamilies(v6, v4) {
		t.Errorf("IPv4 and IPv6 legs: not told apart")
	}
	for _, c := range [][2]*net.TCPConn{{v4, v4}, {v6, v6}, {mapped, v4}, {v4, mapped}} {
		if TwoFamilies(c[0], c[1]) {
			t.Errorf("%v and %v: taken for two families", c[0].LocalAddr(), c[1].LocalAddr())
		}
	}
}
