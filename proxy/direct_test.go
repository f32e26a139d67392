package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/config"
)

// blackhole returns a loopback address whose SYNs go unanswered: a
// listener whose accept queue is full and never accepted from (the
// kernel drops SYNs to a full queue), as a backend that hangs does.
func blackhole(t *testing.T) netip.AddrPort {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return nil
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := setBacklog(ln.(*net.TCPListener), 0); err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	// Fill the queue: connects that complete stay queued; once one
	// hangs, the queue is full.
	for i := 0; ; i++ {
		if i == 16 {
			t.Fatal("the accept queue never filled")
		}
		d := net.Dialer{Timeout: 300 * time.Millisecond}
		c, err := d.Dial("tcp4", addr.String())
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr
}

// echoServer answers every connection with what it reads.
func echoServer(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return netip.MustParseAddrPort(ln.Addr().String())
}

// startDirect runs a direct forwarder on loopback with the backends and
// returns its address.
func startDirect(t *testing.T, connectTimeout time.Duration, backends ...netip.AddrPort) (*Forwarder, string) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var list []string
	for _, b := range backends {
		list = append(list, `"`+b.String()+`"`)
	}
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: d
    listen_mode: direct
    listen_on: ["%s"]
    connect_timeout: %s
    forward:
      backends: [%s]
      backend_down_for: 1m
`, ln.Addr(), connectTimeout, strings.Join(list, ", "))))
	if err != nil {
		t.Fatal(err)
	}
	svc := &cfg.Services[0]
	f := &Forwarder{Base: Base{Service: svc, Flows: NewFlowTable(100)}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done; f.CloseFlows() })
	return f, ln.Addr().String()
}

// TestDirectHangingBackend: a backend that never answers a SYN costs a
// flow one connect_timeout, after which the next backend is tried with
// a timeout of its own. The pool's backends shared one connect timeout:
// the hanging one used it up, the healthy one was then "tried" with no
// time left, failed at once, and was marked down; the client got a
// reset although a backend was up.
func TestDirectHangingBackend(t *testing.T) {
	hang, good := blackhole(t), echoServer(t)
	f, addr := startDirect(t, 500*time.Millisecond, hang, good)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("no answer through a pool with a healthy backend: %v", err)
	}
	for _, s := range f.backends().Stats() {
		if s.Backend == good.String() && s.Failures != 0 {
			t.Fatalf("the healthy backend was counted as failed %d times", s.Failures)
		}
	}
}

// closedPort returns a loopback address where nothing listens.
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	return a
}

func failures(f *Forwarder) (n uint64) {
	for _, s := range f.backends().Stats() {
		n += s.Failures
	}
	return n
}

// TestDirectAllBackendsDown: once every backend of the pool is marked
// down, a flow tries one of them (the one down longest), not the whole
// pool: each client connection made a connect to every backend, so a
// dead pool multiplied the clients' connections by its size, and with
// hanging backends made each client wait one connect timeout per
// backend.
func TestDirectAllBackendsDown(t *testing.T) {
	f, addr := startDirect(t, time.Second, closedPort(t), closedPort(t), closedPort(t))
	dial := func() {
		t.Helper()
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes through a dead pool", n)
		}
	}
	dial()
	if n := failures(f); n != 3 {
		t.Fatalf("first flow: %d failed connects, want 3 (every backend tried)", n)
	}
	for i := range 3 {
		dial()
		if n := failures(f); n != uint64(4+i) {
			t.Fatalf("flow %d to an all-down pool: %d failed connects in all, want %d (one per flow)", i+2, n, 4+i)
		}
	}
	// Each was the one down longest: every backend was probed once.
	for _, s := range f.backends().Stats() {
		if s.Failures != 2 {
			t.Fatalf("backend %s failed %d times, want 2: %+v", s.Backend, s.Failures, f.backends().Stats())
		}
	}
}

// TestDirectHangingPool: a pool whose backends all hang costs a client
// at most one connect timeout once they are marked down.
func TestDirectHangingPool(t *testing.T) {
	const timeout = 300 * time.Millisecond
	_, addr := startDirect(t, timeout, blackhole(t), blackhole(t), blackhole(t))
	dial := func() time.Duration {
		t.Helper()
		start := time.Now()
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes through a dead pool", n)
		}
		return time.Since(start)
	}
	dial() // marks them down
	if d := dial(); d > 2*timeout {
		t.Fatalf("a client of an all-down pool waited %v, want about one connect timeout (%v)", d, timeout)
	}
}
