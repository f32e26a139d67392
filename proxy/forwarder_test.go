package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"spliced/config"
)

// TestDialFailuresLoggedPerKind: a transparent service's upstream
// connect failures were rate-limited per destination, and the client
// picks the destination: a scanner sweeping addresses that do not
// answer on an intercepted port got one warning logged per address,
// up to the limiter's 1,024 keys every 10 s (about 100 lines a second
// on a router's flash). They are one kind of event, logged once per
// interval with the count of those suppressed.
func TestDialFailuresLoggedPerKind(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: t
    listen: %d
    ports: ["80"]
    upstream: nat
`, port)))
	if err != nil {
		t.Fatal(err)
	}
	svc := &cfg.Services[0]
	// A plain listener's flows go to the address the client connected
	// to, the listener itself; a connect with no time fails before it
	// starts, as one to a host that does not answer fails later.
	svc.ConnectTimeout = 1
	var log syncBuffer
	f := &Forwarder{Base: Base{Service: svc, Flows: NewFlowTable(100), Log: slog.New(slog.NewTextHandler(&log, nil))}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done; f.CloseFlows() }()

	const destinations = 20
	for i := range destinations {
		refusedDial(t, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + i)}), port).String())
	}
	waitFor(t, "the flows to leave the table", func() bool { return f.Flows.Len() == 0 })
	lines := strings.Count(log.String(), "upstream connect failed")
	if lines == 0 {
		t.Fatalf("no upstream connect failure logged:\n%s", log.String())
	}
	// One line per 10 s: the test's connects take far less.
	if lines > destinations/4 {
		t.Errorf("%d lines for %d failed connects to %d destinations; want one per kind and interval:\n%s", lines, destinations, destinations, log.String())
	}
}

// TestNotInterceptedCheckOffAcceptLoop: a connection to a transparent
// service's listen port on the gateway's own address is refused after
// a look at the gateway's addresses (a netlink dump, tens of
// microseconds, more with many interfaces). The look ran in the accept
// loop, one at a time: a client connecting to that port again and
// again held up every intercepted connection of the service behind it.
// It runs with the connection's handler now; here a look that does not
// end stands in for slow ones.
func TestNotInterceptedCheckOffAcceptLoop(t *testing.T) {
	ln, err := ListenAt(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), true)
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	own := ownAddress
	ownAddress = func(netip.Addr) bool {
		if calls.Add(1) > 1 {
			return false // the next connection stands for an intercepted one
		}
		close(entered)
		<-release
		return true
	}
	defer func() { ownAddress = own }()
	handled := make(chan struct{}, 1)
	var refused atomic.Int32
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		ServeListeners(ctx, []*net.TCPListener{ln}, &wg, func(c *net.TCPConn) { c.Close(); handled <- struct{}{} }, func(err error) {
			var ni *NotInterceptedError
			if errors.As(err, &ni) {
				refused.Add(1)
			}
		})
		close(done)
	}()
	released := false
	defer func() {
		if !released {
			close(release)
		}
		cancel()
		<-done
		wg.Wait()
	}()

	a, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	<-entered
	b, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	select {
	case <-handled:
	case <-time.After(10 * time.Second):
		t.Fatal("a connection waited 10 s behind the check of another one to the listen port")
	}
	close(release)
	released = true
	waitFor(t, "the connection to the listen port to be refused", func() bool { return refused.Load() == 1 })
}
