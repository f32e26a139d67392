package main

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

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

// TestLabPortReuseAfterTimeWait: a client may connect again from the
// port of a connection whose intercepted socket on the gateway is in
// TIME_WAIT (the gateway closed first). A client that opens thousands of
// connections a second (one request per connection) reuses its ports
// within the 60 s of TIME_WAIT. The new SYN must reach the service's
// listener (TPROXY takes a SYN from a TIME_WAIT socket to the listener);
// delivered to the TIME_WAIT socket instead, it is answered with an ACK,
// reset by the client, and the connection waits for the client's SYN
// retransmission (1 s): the client's socket counts it.
func TestLabPortReuseAfterTimeWait(t *testing.T) {
	t.Parallel()
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v6=%v", v6), func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "nat"))
			srv := netip.AddrPortFrom(lab.Server().Addr(v6), 5001)
			// The server closes first, so the gateway's client-side
			// socket closes first.
			serveHello(t, lab.Server(), srv)
			local := netip.AddrPortFrom(lab.Client().Addr(v6), 41234)
			for i := range 3 {
				got, synRetrans, err := exchangeFrom(lab.Client(), local, srv)
				if err == nil && synRetrans != 0 {
					err = fmt.Errorf("the client's SYN was retransmitted %d times", synRetrans)
				}
				if err != nil || got != "hello\n" {
					state, _ := lab.Gateway.Run("ss", "-tan", "state", "time-wait")
					t.Fatalf("connection %d from %v: %q, %v\ngateway sockets in TIME_WAIT:\n%s", i+1, local, got, err, state)
				}
				if i == 0 {
					// The first connection's socket at the gateway
					// waits in TIME_WAIT (or the test proves nothing).
					out, err := lab.Gateway.Run("ss", "-Htan", "state", "time-wait")
					if err != nil || !strings.Contains(out, local.String()) {
						t.Fatalf("no gateway socket in TIME_WAIT for %v (%v):\n%s", local, err, out)
					}
				}
			}
		})
	}
}

// serveHello accepts connections on addr in h's namespace until the test
// ends, sends each "hello\n" and closes it.
func serveHello(t *testing.T, h *testnet.Host, addr netip.AddrPort) {
	t.Helper()
	ln, err := h.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprint(c, "hello\n")
			c.Close()
		}
	}()
}

// exchangeFrom connects from local to srv inside h's namespace, reads
// what the server sends until it closes, and closes. It also returns how
// many times the client's socket retransmitted, its SYN included.
func exchangeFrom(h *testnet.Host, local, srv netip.AddrPort) (string, uint32, error) {
	c, retrans, err := dialFrom(h, local, srv, 3*time.Second) // SYN retransmissions at 1 s and 3 s
	if err != nil {
		return "", retrans, err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), retrans, err
}

// dialFrom connects from local (the port of an earlier connection, hence
// SO_REUSEADDR) to dst inside h's namespace, and returns how many times
// the socket retransmitted by then: its SYN's retransmissions.
func dialFrom(h *testnet.Host, local, dst netip.AddrPort, timeout time.Duration) (*net.TCPConn, uint32, error) {
	var c *net.TCPConn
	var retrans uint32
	err := h.Do(func() error {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(local),
			Timeout:   timeout,
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				return serr
			},
		}
		nc, err := d.DialContext(context.Background(), "tcp", dst.String())
		if err != nil {
			return err
		}
		c = nc.(*net.TCPConn)
		raw, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var infoErr error
		raw.Control(func(fd uintptr) {
			var info *unix.TCPInfo
			if info, infoErr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); infoErr == nil {
				retrans = info.Total_retrans
			}
		})
		if infoErr != nil {
			c.Close()
		}
		return infoErr
	})
	return c, retrans, err
}

// TestLabPortReuseOverStaleConntrack: a client reuses the port of a
// connection whose conntrack entry the gateway's own socket started (the
// entry's original direction is from the service's address to the
// client) and which is not over in conntrack's eyes (CLOSE after a
// reset, or ESTABLISHED). Conntrack cannot reopen such an entry from its
// reply side and leaves the new SYN untracked (INVALID); that SYN must
// still reach the service's listener. It used to be marked for local
// delivery, skip the TPROXY statement (the rule's ct mark read ended it),
// find no socket, and be lost: the client retransmitted its SYN until it
// gave up, one request per connection slowed to a crawl.
func TestLabPortReuseOverStaleConntrack(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "conntrack")
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v6=%v", v6), func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "nat"))
			srv := netip.AddrPortFrom(lab.Server().Addr(v6), 5001)
			serveHello(t, lab.Server(), srv)
			family := "ipv4"
			if v6 {
				family = "ipv6"
			}
			for i, state := range []string{"CLOSE", "ESTABLISHED"} {
				local := netip.AddrPortFrom(lab.Client().Addr(v6), uint16(41300+i))
				// The entry the gateway's socket would start: from the
				// service's address (the server's) to the client.
				if out, err := lab.Gateway.Run("conntrack", "-I", "-p", "tcp",
					"-s", srv.Addr().String(), "--sport", fmt.Sprint(srv.Port()),
					"-d", local.Addr().String(), "--dport", fmt.Sprint(local.Port()),
					"--state", state, "--timeout", "60", "-u", "ASSURED"); err != nil {
					t.Fatalf("insert the stale entry: %v %s", err, out)
				}
				got, synRetrans, err := exchangeFrom(lab.Client(), local, srv)
				if err == nil && synRetrans != 0 {
					err = fmt.Errorf("the client's SYN was retransmitted %d times", synRetrans)
				}
				if err != nil || got != "hello\n" {
					ct, _ := lab.Gateway.Run("conntrack", "-L", "-f", family, "-p", "tcp")
					t.Fatalf("over a stale %s entry, connection from %v: %q, %v\ngateway conntrack:\n%s", state, local, got, err, ct)
				}
			}
		})
	}
}
