package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inNetNS runs fn on a thread of its own in a new network namespace with
// lo up, so that the sysctls it sets touch nothing of the host; the
// thread is discarded after. fn must not call t.Fatal (another
// goroutine): t.Error and return.
func inNetNS(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	done := make(chan struct{})
	var failed error
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			failed = err
			return
		}
		if failed = linkUp("lo"); failed != nil {
			return
		}
		fn()
	}()
	<-done
	if failed != nil {
		t.Fatal(failed)
	}
}

// linkUp sets an interface of the calling thread's network namespace up.
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// closingServer accepts connections on addr and closes them; stop ends
// it.
func closingServer(t *testing.T, addr string) (server netip.AddrPort, stop func()) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Error(err)
		return netip.AddrPort{}, func() {}
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort(), func() { ln.Close() }
}

// setSysctls sets sysctls of net.ipv4 in the calling thread's network
// namespace.
func setSysctls(t *testing.T, kv map[string]string) bool {
	for f, v := range kv {
		if err := os.WriteFile("/proc/sys/net/ipv4/"+f, []byte(v), 0); err != nil {
			t.Error(err)
			return false
		}
	}
	return true
}

// TestDialAvoidingSkipsReservedPorts: the ports a dial binds itself, once
// the kernel's choices were refused, keep off
// net.ipv4.ip_local_reserved_ports as the kernel's own choices do: a
// port reserved there is one a local service means to bind, and a
// connection holding it makes that bind fail.
func TestDialAvoidingSkipsReservedPorts(t *testing.T) {
	client := netip.MustParseAddrPort("192.0.2.1:1234")
	t.Run("every free port refused", func(t *testing.T) {
		inNetNS(t, func() {
			if !setSysctls(t, map[string]string{"ip_local_port_range": "40000 40009", "ip_local_reserved_ports": "40000-40004,40006-40008"}) {
				return
			}
			server, stop := closingServer(t, "127.0.0.1:5000")
			defer stop()
			// The kernel's choices are 40005 and 40009: refuse both.
			avoid := func(local, _ netip.AddrPort) Avoid { return liveIf(local.Port() == 40005 || local.Port() == 40009) }
			c, err := DialUpstream(context.Background(), false, client, server, 5*time.Second, avoid)
			if err == nil {
				t.Errorf("connected from %v, a reserved port; want errPortAvoided", c.LocalAddr())
				c.Close()
			} else if !errors.Is(err, errPortAvoided) {
				t.Errorf("dial: %v; want errPortAvoided", err)
			}
		})
	})
	t.Run("kernel's choices refused", func(t *testing.T) {
		for range 5 { // a new namespace each: no TIME_WAIT left
			inNetNS(t, func() {
				if !setSysctls(t, map[string]string{"ip_local_port_range": "40000 40019", "ip_local_reserved_ports": "40000-40009"}) {
					return
				}
				server, stop := closingServer(t, "127.0.0.1:5000")
				defer stop()
				refused := map[uint16]bool{}
				avoid := func(local, _ netip.AddrPort) Avoid {
					if len(refused) < kernelPortTries {
						refused[local.Port()] = true
					}
					return liveIf(refused[local.Port()])
				}
				c, err := DialUpstream(context.Background(), false, client, server, 5*time.Second, avoid)
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				if p := AddrPort(c.LocalAddr()).Port(); p < 40010 || refused[p] {
					t.Errorf("connected from port %d; want one of 40010-40019 not refused (refused %v)", p, refused)
				}
			})
		}
	})
}

// TestDialAvoidingLinkLocal: a dial that checks its port (avoid set)
// reaches a link-local server as one that does not: the server's zone
// names the interface the connect needs.
func TestDialAvoidingLinkLocal(t *testing.T) {
	inNetNS(t, func() {
		for _, args := range [][]string{{"link", "add", "d0", "type", "veth", "peer", "name", "d1"}, {"link", "set", "d1", "up"}, {"link", "set", "d0", "up"}, {"addr", "add", "fe80::1/64", "dev", "d0", "nodad"}} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Errorf("ip %v: %v: %s", args, err, out)
				return
			}
		}
		server, stop := closingServer(t, "[fe80::1%d0]:5000")
		defer stop()
		server = netip.AddrPortFrom(server.Addr().WithZone("d0"), server.Port())
		var asked []netip.AddrPort
		avoid := func(local, _ netip.AddrPort) Avoid {
			asked = append(asked, local)
			return liveIf(len(asked) <= kernelPortTries) // the dial's own choice too
		}
		for _, from := range []bool{false, true} {
			asked = nil
			var c *net.TCPConn
			var err error
			if from {
				c, err = DialFrom(context.Background(), server.Addr(), false, server, 5*time.Second, avoid)
			} else {
				c, err = DialUpstream(context.Background(), false, netip.MustParseAddrPort("192.0.2.1:1234"), server, 5*time.Second, avoid)
			}
			if err != nil {
				t.Errorf("from=%v: %v", from, err)
				continue
			}
			c.Close()
			if len(asked) != kernelPortTries+1 {
				t.Errorf("from=%v: avoid asked about %v; want the kernel's %d choices and the dial's own", from, asked, kernelPortTries)
			}
		}
	})
}
