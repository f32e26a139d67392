package socks5

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// TestClientCapAcrossServices: limits.max_flows_per_client counts a
// client's flows over all services, and a SOCKS5 handshake under way as
// one of them. The handshakes were counted by each SOCKS5 service on its
// own, where only its own handshakes saw them: a client holding its cap
// of handshakes on one service got as many again on another, and as
// many flows of any other service (their admission saw its flows only).
func TestClientCapAcrossServices(t *testing.T) {
	cfg, err := config.Parse("test.yaml", []byte(`
services:
  - name: socks_a
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    splice:
      mode: never
  - name: socks_b
    proxy: socks5
    listen_on: ["127.0.0.1:1081"]
    splice:
      mode: never
`))
	if err != nil {
		t.Fatal(err)
	}
	tab := proxy.NewFlowTable(100)
	tab.SetMaxPerClient(2)
	a, b := &lab{}, &lab{}
	a.serveTable(t, &cfg.Services[0], slog.New(slog.DiscardHandler), tab)
	b.serveTable(t, &cfg.Services[1], slog.New(slog.DiscardHandler), tab)
	dial := func(l *lab) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.5")}}
		c, err := d.Dial("tcp4", l.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// Two handshakes on service A wait for their request: the client's
	// cap.
	for range 2 {
		c := dial(a)
		c.Write(greetNone)
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if got := make([]byte, 2); func() error { _, err := io.ReadFull(c, got); return err }() != nil || got[1] != MethodNone {
			t.Fatalf("handshake on service A: got %x", got)
		}
	}
	// Refused with a reset as soon as it is accepted: on loopback the
	// reset may come before the dial returns, and the dial reports it.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.5")}}
	switch c, err := d.Dial("tcp4", b.addr); {
	case err == nil:
		defer c.Close()
		c.Write(greetNone)
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Errorf("a third handshake of a client at its cap of 2, on another service: answered %x, want a reset", got)
		}
	case !errors.Is(err, syscall.ECONNRESET):
		t.Fatal(err)
	}
	f := proxy.NewFlow("fwd", "forward", netip.MustParseAddrPort("127.0.0.5:2000"), netip.MustParseAddrPort("10.2.0.2:80"))
	if err := tab.Admit(f); err != proxy.ErrClientCap {
		t.Errorf("a flow of another service for a client with 2 handshakes under way: %v, want ErrClientCap", err)
	}
}
