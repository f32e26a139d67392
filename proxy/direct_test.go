package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/config"
	"spliced/testnet"
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
	f, addr := startDirect(t, time.Second, testnet.RefusingPort(t), testnet.RefusingPort(t), testnet.RefusingPort(t))
	dial := func() { t.Helper(); refusedDial(t, addr) }
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
// one connect timeout once they are marked down: its flow probes one
// backend, not each in turn. (Counted, not timed: the elapsed time of a
// dial is the machine's load as much as the code's.)
func TestDirectHangingPool(t *testing.T) {
	const timeout = 300 * time.Millisecond
	f, addr := startDirect(t, timeout, blackhole(t), blackhole(t), blackhole(t))
	attempts := func() (n int) {
		for _, s := range f.backends().Stats() {
			n += int(s.Failures)
		}
		return n
	}
	refusedDial(t, addr) // marks them down
	if n := attempts(); n != 3 {
		t.Fatalf("the first client's flow tried %d connects, want one to each of the 3 backends", n)
	}
	refusedDial(t, addr)
	if n := attempts() - 3; n != 1 {
		t.Fatalf("a client of an all-down pool waited for %d connect timeouts, want one (%+v)", n, f.backends().Stats())
	}
}

// TestDirectBackendIsItsListener: a direct forwarder listening on
// every address whose backend is the gateway's own address on the same
// port connects to itself. One client connection made a flow that
// connected to the service again, which made another, until the flow
// table was full: the service refused every client after that. Such a
// backend is refused at the connect, with a log line that says why.
func TestDirectBackendIsItsListener(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: d
    listen_mode: direct
    listen_on: ["0.0.0.0:%d"]
    connect_timeout: 1s
    forward:
      backends: ["192.0.2.1:%d"]
`, port, port)))
	if err != nil {
		t.Fatal(err)
	}
	// The configuration refuses a loopback backend on the port of a
	// wildcard listener; one of the gateway's other addresses it
	// cannot tell: loopback stands in for it here.
	fw := cfg.Services[0].Section().(*config.Forward)
	fw.Backends[0].AddrPort = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port)
	var log syncBuffer
	f := &Forwarder{Base: Base{Service: &cfg.Services[0], Flows: NewFlowTable(50), Log: slog.New(slog.NewTextHandler(&log, nil))}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done; f.CloseFlows() }()

	refusedDial(t, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	time.Sleep(200 * time.Millisecond)
	if n := f.Flows.Len(); n != 0 {
		t.Fatalf("%d flows in the table after the client's one was refused (max 50)", n)
	}
	if !strings.Contains(log.String(), "is this service's own listener") {
		t.Fatalf("the log does not say why:\n%s", log.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// refusedDial connects to addr and expects the connection to end with
// nothing read. A reset can come before the connect returns (the
// proxy accepts and resets at once on loopback): that counts too.
func refusedDial(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			return
		}
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes where the proxy should have refused", n)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the proxy neither served nor ended the connection in 10 s")
	}
}

// TestDirectDestinationWhileListed: a direct flow is in the table (and
// listed by the control API) before its backend is chosen; its proxy
// then sets where it goes while a lister reads it. Run under the race
// detector (CI's make test-race of ./proxy/...), the writes were plain
// field stores racing the API's reads; now both go through legMu. And
// each flow ends up listed with the listen address its client connected
// to and the backend it reached.
func TestDirectDestinationWhileListed(t *testing.T) {
	backend := echoServer(t)
	f, addr := startDirect(t, time.Second, backend)
	stop := make(chan struct{})
	listed := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				listed <- n
				return
			default:
			}
			for _, fl := range f.Flows.List() {
				fl.Destination()
				fl.ServerLeg()
				n++
			}
		}
	}()
	var conns []net.Conn
	for range 20 {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	close(stop)
	t.Logf("%d flow reads while 20 flows connected", <-listed)
	flows := f.Flows.List()
	if len(flows) != len(conns) {
		t.Fatalf("%d flows listed, want %d", len(flows), len(conns))
	}
	for _, fl := range flows {
		local, server := fl.Destination()
		if local.String() != addr || server != backend {
			t.Errorf("flow %d: listed as %v -> %v, want %s -> %v", fl.ID, local, server, addr, backend)
		}
	}
}

// TestDirectBackendListedTwice: a backend listed twice (twice the share
// of round robin) is one server: once a connect to it fails, it is down,
// and a flow does not try it again. Each listing was a backend of its
// own, so a flow that found it dead tried it again before the next
// server (a hanging one cost the client two connect timeouts, not one),
// and it stayed up for the flows that picked its other listing.
func TestDirectBackendListedTwice(t *testing.T) {
	dead, good := testnet.RefusingPort(t), echoServer(t)
	f, addr := startDirect(t, time.Second, dead, dead, good)
	for i := range 3 {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatalf("flow %d: no answer through a pool with a healthy backend: %v", i, err)
		}
		c.Close()
	}
	if n := failures(f); n != 1 {
		t.Fatalf("%d failed connects to the dead backend listed twice, want 1 (down after the first): %+v", n, f.backends().Stats())
	}
}

// takeSplicer splices every flow by taking its sockets, and hands them
// to the test.
type takeSplicer struct {
	taken chan takenFlow
}

type takenFlow struct {
	flow             *Flow
	client, upstream *net.TCPConn
}

func (s *takeSplicer) Splice(_ context.Context, f *Flow, client, upstream *net.TCPConn) error {
	s.taken <- takenFlow{f, client, upstream}
	return nil
}

func active(f *Forwarder) (n int32) {
	for _, s := range f.backends().Stats() {
		n += s.Active
	}
	return n
}

// TestDirectUnsplicedFlowCounts: least_conn counts the flows the proxy
// relays, and a flow the gateway gave back by an unsplice (splicectl
// unsplice) is relayed by the proxy again. It was counted only until
// its first splice: a backend's flows relayed after unsplices did not
// count, and least_conn sent it more.
func TestDirectUnsplicedFlowCounts(t *testing.T) {
	backend := echoServer(t)
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: d
    listen_mode: direct
    listen_on: ["%s"]
    splice:
      mode: immediate
    forward:
      backends: ["%s"]
      balance: least_conn
`, ln.Addr(), backend)))
	if err != nil {
		t.Fatal(err)
	}
	f := &Forwarder{Base: Base{Service: &cfg.Services[0], Flows: NewFlowTable(10)}}
	sp := &takeSplicer{taken: make(chan takenFlow, 1)}
	f.SetSplicer(sp)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done; f.CloseFlows() }()

	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tf := <-sp.taken
	// Spliced: the proxy's handler returns, and the flow no longer counts.
	waitFor(t, "the spliced flow to leave the count", func() bool { return active(f) == 0 })
	f.SetSplicer(nil) // relayed from now on
	if !tf.flow.Resume(tf.client, tf.upstream) {
		t.Fatal("the forwarder did not take the flow back")
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("the unspliced flow is not relayed: %v", err)
	}
	if n := active(f); n != 1 {
		t.Fatalf("a flow relayed again after an unsplice: the backend counts %d flows, want 1", n)
	}
	c.Close()
	waitFor(t, "the flow to end and leave the count", func() bool { return f.Flows.Len() == 0 && active(f) == 0 })
}

// waitFor waits until cond holds, for what says; it fails the test if
// that takes more than 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}

// metric returns the value of a direct forwarder's metric for backend b.
func metric(t *testing.T, f *Forwarder, name string, b netip.AddrPort) float64 {
	t.Helper()
	for _, m := range f.Metrics() {
		if m.Name == name && len(m.Values) == 1 && m.Values[0] == b.String() {
			return m.Value
		}
	}
	t.Fatalf("no %s{backend=%q} in %+v", name, b, f.Metrics())
	return 0
}

// TestDirectBackendStateMetrics: the metrics say which backends are
// skipped after a failed connect and how many flows each relays now.
// Only the flows and failures counters were reported: a backend marked
// down could not be told from one that got no flows.
func TestDirectBackendStateMetrics(t *testing.T) {
	dead, good := testnet.RefusingPort(t), echoServer(t)
	f, addr := startDirect(t, time.Second, dead, good)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("no answer through a pool with a healthy backend: %v", err)
	}
	if up := metric(t, f, "spliced_forward_backend_up", dead); up != 0 {
		t.Errorf("the refusing backend, down for a minute: up %v", up)
	}
	if up := metric(t, f, "spliced_forward_backend_up", good); up != 1 {
		t.Errorf("the healthy backend: up %v", up)
	}
	if n := metric(t, f, "spliced_forward_backend_relayed_flows", good); n != 1 {
		t.Errorf("the healthy backend relays %v flows, want 1", n)
	}
}

// refusingSplicer counts the flows handed to it and refuses each, as
// the gateway refuses a flow whose legs are of two families (the
// engine does not translate IPv4 to IPv6), after diverting its packets
// and capturing both sockets in repair mode.
type refusingSplicer struct {
	mu    sync.Mutex
	calls int
}

func (s *refusingSplicer) Splice(context.Context, *Flow, *net.TCPConn, *net.TCPConn) error {
	s.mu.Lock()
	s.calls++
	s.mu.Unlock()
	return errors.New("build the engine flow: the two connections have different address families")
}

// TestDirectOtherFamilyBackend: an IPv6 client sent to an IPv4 backend
// (a pool shared by listeners of both families) is relayed, and the
// proxy does not ask the gateway to splice it: each such flow went
// through a splice's divert, drain and socket capture before the engine
// refused it, and logged a warning per flow, which a client could have
// written into the log at will. Now the flow says why it stays
// proxied, and the log says so at most once per 10 s, with the fix.
func TestDirectOtherFamilyBackend(t *testing.T) {
	backend := echoServer(t)
	ln, err := net.ListenTCP("tcp6", &net.TCPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: d
    listen_mode: direct
    listen_on: ["%s"]
    splice:
      mode: immediate
    forward:
      backends: ["%s"]
`, ln.Addr(), backend)))
	if err != nil {
		t.Fatal(err)
	}
	var log syncBuffer
	f := &Forwarder{Base: Base{Service: &cfg.Services[0], Flows: NewFlowTable(10), Log: slog.New(slog.NewTextHandler(&log, nil))}}
	sp := &refusingSplicer{}
	f.SetSplicer(sp)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done; f.CloseFlows() }()

	for i := range 3 {
		c, err := net.Dial("tcp6", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatalf("flow %d to a backend of the other family is not relayed: %v", i, err)
		}
	}
	sp.mu.Lock()
	calls := sp.calls
	sp.mu.Unlock()
	if calls != 0 {
		t.Errorf("%d flows with legs of two families were handed to the splicer", calls)
	}
	for _, fl := range f.Flows.List() {
		if e := fl.SpliceError(); !strings.Contains(e, "address families") {
			t.Errorf("flow %d stays proxied for %q", fl.ID, e)
		}
	}
	if n := strings.Count(log.String(), "flow stays proxied"); n != 1 {
		t.Errorf("%d log lines for 3 flows, want 1:\n%s", n, log.String())
	}
	if !strings.Contains(log.String(), "forward.backends") {
		t.Errorf("the log does not name the fix:\n%s", log.String())
	}
}
