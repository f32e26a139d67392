package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestDialAvoidingTakesAnotherPort: a NAT upstream dial whose local ports
// avoid refuses (as a spliced flow holds them) connects from one it
// accepts, the kernel's choices refused twice and then the dial's own;
// so does a dial from a given address (DialFrom: FTP data connections).
func TestDialAvoidingTakesAnotherPort(t *testing.T) {
	for _, tc := range []struct {
		addr string
		from bool
	}{{"127.0.0.1:0", false}, {"[::1]:0", false}, {"127.0.0.1:0", true}, {"[::1]:0", true}} {
		addr := tc.addr
		t.Run(fmt.Sprintf("%s/from=%v", addr, tc.from), func(t *testing.T) {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			server := ln.Addr().(*net.TCPAddr).AddrPort()
			var mu sync.Mutex
			refused := map[netip.AddrPort]bool{}
			asked := 0
			avoid := func(local, to netip.AddrPort) Avoid {
				mu.Lock()
				defer mu.Unlock()
				if to != server {
					t.Errorf("avoid asked about server %v, want %v", to, server)
				}
				asked++
				// Refuse the first four ports asked about: the kernel's
				// two choices and two of the dial's own.
				if len(refused) < 4 && !refused[local] {
					refused[local] = true
				}
				return liveIf(refused[local])
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var c *net.TCPConn
			if tc.from {
				c, err = DialFrom(ctx, server.Addr(), false, server, 5*time.Second, avoid)
			} else {
				c, err = DialUpstream(ctx, false, netip.MustParseAddrPort("192.0.2.1:1234"), server, 5*time.Second, avoid)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			local := AddrPort(c.LocalAddr())
			if refused[local] {
				t.Errorf("connected from %v, a refused port (refused %v)", local, refused)
			}
			if len(refused) != 4 || asked < 5 {
				t.Errorf("avoid asked %d times, refused %v; want 4 refused, then one accepted", asked, refused)
			}
			if local.Addr() != server.Addr() {
				t.Errorf("connected from %v, want the kernel's source address %v", local, server.Addr())
			}
		})
	}
}

// TestDialAvoidingEveryPortRefused: when every local port is refused the
// dial fails at once, naming the port range, instead of hanging.
func TestDialAvoidingEveryPortRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	server := ln.Addr().(*net.TCPAddr).AddrPort()
	_, err = DialUpstream(context.Background(), false, netip.MustParseAddrPort("192.0.2.1:1234"), server, 5*time.Second,
		func(netip.AddrPort, netip.AddrPort) Avoid { return AvoidLive })
	if !errors.Is(err, errPortAvoided) || !strings.Contains(err.Error(), "ip_local_port_range") {
		t.Fatalf("dial with every port refused: %v; want errPortAvoided naming ip_local_port_range", err)
	}
}

// liveIf is AvoidLive if held, else AvoidNot.
func liveIf(held bool) Avoid {
	if held {
		return AvoidLive
	}
	return AvoidNot
}

// TestDialAvoidingTakesEndedPorts: a port of a spliced flow that ended
// (AvoidEnded) is taken as the kernel chose it: under a high rate of
// flows to one server, refusing those refused every port, and every new
// connection to it failed.
func TestDialAvoidingTakesEndedPorts(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	server := ln.Addr().(*net.TCPAddr).AddrPort()
	asked := 0
	c, err := DialUpstream(context.Background(), false, netip.MustParseAddrPort("192.0.2.1:1234"), server, 5*time.Second,
		func(netip.AddrPort, netip.AddrPort) Avoid { asked++; return AvoidEnded })
	if err != nil {
		t.Fatalf("dial with every port of an ended flow: %v", err)
	}
	c.Close()
	if asked != 1 {
		t.Errorf("avoid asked %d times; want once (the kernel's choice, taken)", asked)
	}
}
