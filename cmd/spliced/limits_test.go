package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabMaxFlows: with limits.max_flows 8 and 8 flows open (proxied, or
// spliced), 200 more connections are each refused with a reset before
// anything is connected upstream; the refusals are logged a few times,
// not 200; the daemon's memory stays put; the 8 flows stay intact; and a
// slot that frees admits a new flow.
func TestLabMaxFlows(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"copy", "splice"} {
		t.Run(mode, func(t *testing.T) {
			testnet.Privileged(t)
			lab := testnet.NewT(t, testnet.Options{})
			spliceMode := "never"
			if mode == "splice" {
				spliceMode = "immediate"
			}
			d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: info
limits:
  max_flows: 8
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: %s
`, spliceMode))
			dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
			upstream := countingEcho(t, lab.Server(), dst)
			echo := func(c net.Conn, b byte) error {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				defer c.SetDeadline(time.Time{})
				if _, err := c.Write([]byte{b}); err != nil {
					return err
				}
				got := make([]byte, 1)
				if _, err := io.ReadFull(c, got); err != nil {
					return err
				}
				if got[0] != b {
					return fmt.Errorf("echoed %q, want %q", got, b)
				}
				return nil
			}
			var held []net.Conn
			for i := range 8 {
				c, err := lab.Client().Dial(dst, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if err := echo(c, byte('a'+i)); err != nil {
					t.Fatalf("flow %d: %v", i, err)
				}
				held = append(held, c)
			}
			flows := func() (int, int) {
				st, err := d.Client().Status(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				n := 0
				for _, v := range st.Flows {
					n += v
				}
				return n, st.Flows["spliced"]
			}
			testnet.Eventually(t, 10*time.Second, func() error {
				n, spliced := flows()
				if n != 8 || (mode == "splice" && spliced != 8) {
					return fmt.Errorf("%d flows, %d spliced", n, spliced)
				}
				return nil
			})
			rssBefore := rss(t, d.Pid())

			const extra = 200
			refused := 0
			for i := range extra {
				c, err := lab.Client().Dial(dst, 5*time.Second)
				if err != nil {
					refused++ // reset during the handshake: refused too
					continue
				}
				err = echo(c, 'z')
				c.Close()
				switch {
				case err == nil:
					t.Fatalf("connection %d beyond max_flows was served", i)
				case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), isReset(err):
					refused++
				default:
					t.Fatalf("connection %d beyond max_flows: %v (want a reset)", i, err)
				}
			}
			rssAfter := rss(t, d.Pid())
			logged := strings.Count(d.Log(), "flow cap reached")
			n, _ := flows()
			t.Logf("%s: %d of %d connections beyond max_flows 8 refused; %d log lines; %d flows open; upstream connections %d; daemon RSS %d KiB before, %d KiB after",
				mode, refused, extra, logged, n, upstream.Load(), rssBefore>>10, rssAfter>>10)
			if refused != extra {
				t.Errorf("%d of %d refused", refused, extra)
			}
			if up := upstream.Load(); up != 8 {
				t.Errorf("%d connections reached the server, want the 8 admitted", up)
			}
			if logged == 0 || logged > 5 {
				t.Errorf("the cap was logged %d times for %d refusals, want a few (rate-limited)", logged, extra)
			}
			if n != 8 {
				t.Errorf("%d flows open after the refusals, want 8", n)
			}
			if rssAfter > rssBefore+8<<20 {
				t.Errorf("the daemon's RSS grew from %d to %d KiB", rssBefore>>10, rssAfter>>10)
			}
			for i, c := range held {
				if err := echo(c, byte('A'+i)); err != nil {
					t.Errorf("held flow %d after the refusals: %v", i, err)
				}
			}
			// A slot that frees admits a new flow.
			held[0].Close()
			testnet.Eventually(t, 10*time.Second, func() error {
				if n, _ := flows(); n != 7 {
					return fmt.Errorf("%d flows", n)
				}
				return nil
			})
			c, err := lab.Client().Dial(dst, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := echo(c, 'n'); err != nil {
				t.Fatalf("a new flow after a slot freed: %v", err)
			}
		})
	}
}

// isReset reports whether err is a connection reset.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// TestLabMaxFlowsPerClient: with limits.max_flows_per_client 4, a client
// holding 4 spliced flows is refused a fifth flow with a reset (nothing
// connects upstream) and even a SOCKS5 handshake, while another client
// is served; SOCKS5 handshakes under way count with a client's flows, so
// one client cannot hold every session of max_sessions; the refusals
// are logged, rate-limited, with the key to raise; a flow that ends
// frees its client's place.
func TestLabMaxFlowsPerClient(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t)
	lab := testnet.NewT(t, testnet.Options{Clients: 2})
	socksAddr := netip.AddrPortFrom(lab.GatewayClientSide[0].IPv4, 1080)
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: info
limits:
  max_flows_per_client: 4
metrics:
  listen: 127.0.0.1:9411
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: immediate
  - name: socks
    proxy: socks5
    listen_on: ["%s"]
    socks5:
      method: none
`, socksAddr))
	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	upstream := countingEcho(t, lab.Server(), dst)
	a, b := lab.Clients[0], lab.Clients[1]
	// served: a round trip through the flow (an echo, or a SOCKS5
	// greeting answered); a refused connection reads EOF or a reset.
	served := func(c net.Conn, send, want []byte) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		defer c.SetDeadline(time.Time{})
		if _, err := c.Write(send); err != nil {
			return err
		}
		got := make([]byte, len(want))
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
		if string(got) != string(want) {
			return fmt.Errorf("got %q, want %q", got, want)
		}
		return nil
	}
	refused := func(h *testnet.Host, to netip.AddrPort, send, want []byte, what string) {
		t.Helper()
		c, err := h.Dial(to, 5*time.Second)
		if err != nil {
			return // reset during the handshake: refused too
		}
		defer c.Close()
		switch err := served(c, send, want); {
		case err == nil:
			t.Errorf("%s was served", what)
		case !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !isReset(err):
			t.Errorf("%s: %v (want a reset)", what, err)
		}
	}
	open := func(h *testnet.Host, to netip.AddrPort, send, want []byte, what string) net.Conn {
		t.Helper()
		c, err := h.Dial(to, 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		t.Cleanup(func() { c.Close() })
		if send != nil {
			if err := served(c, send, want); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		return c
	}
	echo, greeting, methodNone := []byte("x"), []byte{5, 1, 0}, []byte{5, 0}

	var held []net.Conn
	for i := range 4 {
		held = append(held, open(a, dst, echo, echo, fmt.Sprintf("flow %d of client A", i)))
	}
	testnet.Eventually(t, 10*time.Second, func() error {
		st, err := d.Client().Status(context.Background())
		if err != nil {
			return err
		}
		if st.Flows["spliced"] != 4 {
			return fmt.Errorf("%d flows spliced, want 4", st.Flows["spliced"])
		}
		return nil
	})
	for i := range 20 {
		refused(a, dst, echo, echo, fmt.Sprintf("flow %d of client A beyond its cap", 5+i))
	}
	refused(a, socksAddr, greeting, methodNone, "a SOCKS5 handshake of client A at its cap")
	if up := upstream.Load(); up != 4 {
		t.Errorf("%d connections reached the server, want client A's 4", up)
	}

	// Client B: a flow and three handshakes waiting for their request
	// (the greeting answered: the proxy counts them) fill its cap; a
	// fourth handshake is refused; one that ends frees a place.
	open(b, dst, echo, echo, "client B's flow")
	var idle []net.Conn
	for i := range 3 {
		idle = append(idle, open(b, socksAddr, greeting, methodNone, fmt.Sprintf("SOCKS5 handshake %d of client B", i)))
	}
	refused(b, socksAddr, greeting, methodNone, "a fourth SOCKS5 handshake of client B")
	m := scrapeMetrics(t, lab, "127.0.0.1:9411")
	for _, want := range []string{`spliced_flows_refused_total{limit="max_flows_per_client"} 22`, `spliced_flows_refused_total{limit="max_flows"} 0`} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q after 20 flows and 2 SOCKS5 handshakes refused:\n%s", want, grepLines(m, "spliced_flows_refused_total"))
		}
	}
	idle[0].Close()
	testnet.Eventually(t, 10*time.Second, func() error {
		c, err := b.Dial(socksAddr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		return served(c, greeting, methodNone)
	})

	for i, c := range held {
		if err := served(c, []byte{byte('a' + i)}, []byte{byte('a' + i)}); err != nil {
			t.Errorf("client A's flow %d after the refusals: %v", i, err)
		}
	}
	logged := 0
	if l := grepLines(d.Log(), "max_flows_per_client"); l != "" {
		logged = strings.Count(l, "\n") + 1
	}
	t.Logf("client A: 21 connections refused at 4 flows; log lines naming the cap: %d", logged)
	if logged == 0 || logged > 6 {
		t.Errorf("the per-client cap was logged %d times, want a few (rate-limited)", logged)
	}
	// A flow of client A that ends frees its place.
	held[0].Close()
	testnet.Eventually(t, 10*time.Second, func() error {
		c, err := a.Dial(dst, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		return served(c, echo, echo)
	})
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// countingEcho runs an echo server on h at addr until the test ends and
// returns how many connections it accepted.
func countingEcho(t *testing.T, h *testnet.Host, addr netip.AddrPort) *atomic.Int64 {
	t.Helper()
	ln, err := h.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return &accepted
}
