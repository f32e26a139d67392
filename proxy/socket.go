package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// setTransparent sets IP_TRANSPARENT (IPv4) or IPV6_TRANSPARENT (IPv6):
// a listener with it accepts flows that TPROXY diverted to it, and an
// upstream socket with it may bind to the client's (non-local) address.
func setTransparent(network string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		level, opt := transparentOption(network == "tcp6")
		serr = unix.SetsockoptInt(int(fd), level, opt, 1)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set transparent: %w (needs CAP_NET_ADMIN)", serr)
	}
	return nil
}

// transparentOption is the socket option that makes a socket of the
// family transparent (TPROXY): IP_TRANSPARENT, or IPV6_TRANSPARENT.
func transparentOption(v6 bool) (level, opt int) {
	if v6 {
		return unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	return unix.SOL_IP, unix.IP_TRANSPARENT
}

// ListenTransparent opens a TPROXY listener on port for one family
// ("tcp4" or "tcp6") with the given accept queue length (0: Go's, which
// is net.core.somaxconn; the kernel caps any value there). The families
// get separate listeners: a dual-stack socket on :: makes IP_TRANSPARENT
// fail silently for IPv4.
func ListenTransparent(ctx context.Context, network string, port uint16, backlog int) (*net.TCPListener, error) {
	addr := netip.AddrPortFrom(netip.IPv4Unspecified(), port)
	if network == "tcp6" {
		addr = netip.AddrPortFrom(netip.IPv6Unspecified(), port)
	}
	lc := net.ListenConfig{
		Control:   func(network, _ string, c syscall.RawConn) error { return setTransparent(network, c) },
		KeepAlive: -1,
	}
	plainTCP(&lc)
	ln, err := lc.Listen(ctx, network, addr.String())
	if err != nil {
		return nil, err
	}
	return withBacklog(ln.(*net.TCPListener), backlog)
}

// withBacklog sets a listener's accept queue length (0: leaves it), or
// closes it and says why it could not: listen(2) again on a listening
// socket only sets its backlog.
func withBacklog(tl *net.TCPListener, backlog int) (*net.TCPListener, error) {
	if backlog > 0 {
		if err := setBacklog(tl, backlog); err != nil {
			tl.Close()
			return nil, err
		}
	}
	return tl, nil
}

// plainTCP makes a listener's sockets plain TCP. Go's listeners use
// Multipath TCP by default (since Go 1.24, where the kernel has it): the
// gateway would answer a client's MP_CAPABLE and hold an MPTCP socket,
// which has no TCP_REPAIR, so the flow could never be spliced ("TCP_REPAIR
// on: protocol not available"); and a proxy in the middle would end the
// client's multipath connection at the gateway. Plain TCP is what a
// router in the path does to the client: the client falls back to TCP,
// as it does with any server without MPTCP. The dialers say so too, in
// case GODEBUG=multipathtcp turns it on for them.
func plainTCP(lc *net.ListenConfig) { lc.SetMultipathTCP(false) }

func setBacklog(ln *net.TCPListener, backlog int) error {
	raw, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Listen(int(fd), backlog) }); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set listen backlog %d: %w", backlog, serr)
	}
	return nil
}

// DialUpstream connects to server on behalf of client. Transparent mode
// binds the client's address (and port where it is free, else an
// ephemeral one) so the server sees the client; NAT mode uses the
// gateway's own address.
func DialUpstream(ctx context.Context, transparent bool, client, server netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	network := "tcp4"
	if server.Addr().Is6() && !server.Addr().Is4In6() {
		network = "tcp6"
	}
	server = netip.AddrPortFrom(server.Addr().Unmap(), server.Port())
	d := net.Dialer{Timeout: timeout, KeepAlive: -1}
	d.SetMultipathTCP(false) // see plainTCP
	if !transparent {
		c, err := d.DialContext(ctx, network, server.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	d.Control = func(network, _ string, c syscall.RawConn) error {
		// SO_REUSEADDR lets the client's port be bound again while an
		// earlier upstream connection from it (to another server port)
		// sits in TIME_WAIT.
		var serr error
		c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		if serr != nil {
			return serr
		}
		return setTransparent(network, c)
	}
	src := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	d.LocalAddr = net.TCPAddrFromAddrPort(src)
	c, err := d.DialContext(ctx, network, server.String())
	if err != nil && (errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL)) {
		// The client's port is taken on the gateway (or the 4-tuple is
		// still in TIME_WAIT): let the kernel choose one.
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src.Addr(), 0))
		c, err = d.DialContext(ctx, network, server.String())
	}
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// addrPort returns a connection address as netip.AddrPort with IPv4
// addresses unmapped.
func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// reset closes c with a RST instead of a FIN, for refused or failed flows.
// setSocketBuffers fixes c's send and receive buffers at size bytes
// (splice.socket_buffer), which turns the kernel's autotuning of both off.
func setSocketBuffers(c *net.TCPConn, size int) error {
	return errors.Join(c.SetReadBuffer(size), c.SetWriteBuffer(size))
}

func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// ListenAt opens a listener on addr. A transparent listener may be bound
// to an address that is not the gateway's: packets to it reach it through
// the table's `socket transparent` rule, as packets of the connections it
// accepts do.
func ListenAt(ctx context.Context, addr netip.AddrPort, transparent bool) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	plainTCP(&lc)
	if transparent {
		lc.Control = func(network, _ string, c syscall.RawConn) error { return setTransparent(network, c) }
	}
	ln, err := lc.Listen(ctx, family(addr.Addr()), addr.String())
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// DialFrom connects to dst from the local address src (an ephemeral
// port); transparent allows src to be an address that is not the
// gateway's.
func DialFrom(ctx context.Context, src netip.Addr, transparent bool, dst netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: timeout, KeepAlive: -1, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src.Unmap(), 0))}
	d.SetMultipathTCP(false) // see plainTCP
	if transparent {
		d.Control = func(network, _ string, c syscall.RawConn) error { return setTransparent(network, c) }
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	c, err := d.DialContext(ctx, family(dst.Addr()), dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func family(a netip.Addr) string {
	if a.Is4() || a.Is4In6() {
		return "tcp4"
	}
	return "tcp6"
}

// AddrPort returns a TCP connection address as netip.AddrPort with IPv4
// addresses unmapped.
func AddrPort(a net.Addr) netip.AddrPort { return addrPort(a) }

// Reset closes c with a RST instead of a FIN.
func Reset(c *net.TCPConn) { reset(c) }
