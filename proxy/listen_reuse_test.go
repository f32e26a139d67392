package proxy

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"spliced/config"
)

// TestListenServiceReusing: a service changed by a reload gets the old
// service's socket where its address stays, so it can listen at all (a
// second socket cannot bind the address), and a connection waiting in
// the accept queue when the old service closes its listener is accepted
// by the new one.
func TestListenServiceReusing(t *testing.T) {
	probe, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(probe.Addr().String())
	probe.Close()
	svc := &config.Service{Name: "d", ListenMode: config.ListenDirect, Backlog: 16,
		ListenOn: []config.AddrPort{{AddrPort: addr}}}
	old, err := ListenService(context.Background(), svc)
	if err != nil {
		t.Fatal(err)
	}
	changed := *svc
	changed.Backlog = 32
	if _, err := ListenService(context.Background(), &changed); err == nil {
		t.Fatal("a second socket bound the address: the test proves nothing")
	}
	lns, err := ListenServiceReusing(context.Background(), &changed, old)
	if err != nil {
		t.Fatalf("reload of a changed service: %v", err)
	}
	defer lns[0].Close()
	c, err := net.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	old[0].Close() // the old service stops
	a, err := lns[0].AcceptTCP()
	if err != nil {
		t.Fatalf("the queued connection was lost with the old listener: %v", err)
	}
	a.Close()
}

// TestListenOnError: a direct service's listen_on address that is not
// the gateway's, or that another socket holds, fails its start with the
// key and the fix, not only the bind error.
func TestListenOnError(t *testing.T) {
	svc := &config.Service{Name: "d", ListenMode: config.ListenDirect, Backlog: 16,
		ListenOn: []config.AddrPort{{AddrPort: netip.MustParseAddrPort("198.51.100.77:1080")}}}
	_, err := ListenService(context.Background(), svc)
	if err == nil || !strings.Contains(err.Error(), "listen_on[0] 198.51.100.77:1080") || !strings.Contains(err.Error(), "net.ipv4.ip_nonlocal_bind=1") {
		t.Errorf("address not the gateway's: %v", err)
	}
	held, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	svc.ListenOn[0].AddrPort = netip.MustParseAddrPort(held.Addr().String())
	_, err = ListenService(context.Background(), svc)
	if err == nil || !strings.Contains(err.Error(), "another socket listens there") {
		t.Errorf("address in use: %v", err)
	}
}

// TestListenOnErrorHeldByReload: a reload that moves a direct service
// from one address to every address on the same port (or back) cannot
// bind while the old listener holds the port. The error said "another
// socket listens there ... stop it": the socket was spliced's own, the
// one the reload was to replace. It now names it and the way through.
func TestListenOnErrorHeldByReload(t *testing.T) {
	probe, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := netip.MustParseAddrPort(probe.Addr().String()).Port()
	probe.Close()
	one := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	every := netip.AddrPortFrom(netip.IPv4Unspecified(), port)
	for _, c := range []struct{ from, to netip.AddrPort }{{one, every}, {every, one}} {
		svc := &config.Service{Name: "d", ListenMode: config.ListenDirect, Backlog: 16,
			ListenOn: []config.AddrPort{{AddrPort: c.from}}}
		old, err := ListenService(context.Background(), svc)
		if err != nil {
			t.Fatal(err)
		}
		changed := *svc
		changed.ListenOn = []config.AddrPort{{AddrPort: c.to}}
		_, err = ListenServiceReusing(context.Background(), &changed, old)
		old[0].Close()
		if err == nil {
			t.Fatalf("%s -> %s: the new listener bound while the old one listened: the test proves nothing", c.from, c.to)
		}
		if msg := err.Error(); strings.Contains(msg, "another socket listens there") || !strings.Contains(msg, "running configuration's listener on "+c.from.String()) {
			t.Errorf("%s -> %s: %v", c.from, c.to, err)
		}
	}
}
