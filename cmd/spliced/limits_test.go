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
			ln, err := lab.Server().Listen(dst)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var upstream atomic.Int64
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					upstream.Add(1)
					go func() { io.Copy(c, c); c.Close() }()
				}
			}()
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
