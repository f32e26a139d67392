package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

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
