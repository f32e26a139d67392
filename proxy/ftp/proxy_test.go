package ftp

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
	"spliced/proxy"
)

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

// TestServerConnectFailuresLoggedPerKind: connect failures to the FTP
// server were rate-limited per server, which the client picks (an
// intercepted control connection goes where the client sent it): one
// warning per address a scanner swept. They are one kind of event.
func TestServerConnectFailuresLoggedPerKind(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	cfg, err := config.Parse("ftp.yaml", []byte(fmt.Sprintf("services:\n  - name: ftp\n    listen: %d\n    ports: [\"21\"]\n    proxy: ftp\n", port)))
	if err != nil {
		t.Fatal(err)
	}
	svc := &cfg.Services[0]
	// A plain listener's sessions go to the address the client
	// connected to, the listener itself; a connect with no time fails
	// before it starts, as one to a host that does not answer fails
	// later.
	svc.ConnectTimeout = 1
	var log syncBuffer
	p := &Proxy{Base: proxy.Base{Service: svc, Flows: proxy.NewFlowTable(100), Log: slog.New(slog.NewTextHandler(&log, nil))}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done; p.CloseFlows() }()

	const servers = 20
	for i := range servers {
		// The 421 and a reset, which on loopback may come before the
		// connect returns.
		c, err := net.Dial("tcp4", netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + i)}), port).String())
		if err != nil {
			if errors.Is(err, syscall.ECONNRESET) {
				continue
			}
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("client %d: the session was neither refused nor served in 10 s (read %q)", i, got)
		}
	}
	waitFor(t, "the flows to leave the table", func() bool { return p.Flows.Len() == 0 })
	lines := strings.Count(log.String(), "upstream connect failed")
	if lines == 0 {
		t.Fatalf("no connect failure logged:\n%s", log.String())
	}
	// One line per 10 s: the test's connects take far less.
	if lines > servers/4 {
		t.Errorf("%d lines for %d failed connects to %d servers; want one per kind and interval:\n%s", lines, servers, servers, log.String())
	}
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
