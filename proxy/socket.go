package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
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

// Avoid says whether an upstream connection from a local address and port
// to a server should take another local port, and how much that matters.
type Avoid uint8

const (
	// AvoidNot: nothing of the gateway's holds the 4-tuple.
	AvoidNot Avoid = iota
	// AvoidEnded: a spliced flow on the 4-tuple ended (or was unspliced)
	// less than about a minute ago, and its server may still hold it in
	// TIME_WAIT with a clock the splice moved ahead: a SYN on it then
	// costs a reset and a retry a second later. A NAT dial takes such a
	// port as the kernel would: under a high rate of flows to one server
	// refusing them all would refuse every port.
	AvoidEnded
	// AvoidLive: a live spliced flow holds the 4-tuple. Its gateway socket
	// is gone, so the kernel sees the port as free and may give it to a
	// new connection to the same server, whose SYN meets the flow's
	// established server and never gets a SYN-ACK. Never taken.
	AvoidLive
)

// AvoidFunc tells how an upstream connection from local to server should
// avoid that local port (Avoid).
type AvoidFunc func(local, server netip.AddrPort) Avoid

// DialUpstream connects to server on behalf of client. Transparent mode
// binds the client's address (and port where it is free, else an
// ephemeral one) so the server sees the client; NAT mode uses the
// gateway's own address. A port the kernel chooses is never one avoid
// (if not nil) says a live spliced flow holds.
func DialUpstream(ctx context.Context, transparent bool, client, server netip.AddrPort, timeout time.Duration, avoid AvoidFunc) (*net.TCPConn, error) {
	network := "tcp4"
	if server.Addr().Is6() && !server.Addr().Is4In6() {
		network = "tcp6"
	}
	server = netip.AddrPortFrom(server.Addr().Unmap(), server.Port())
	d := net.Dialer{Timeout: timeout, KeepAlive: -1}
	d.SetMultipathTCP(false) // see plainTCP
	if !transparent {
		return dialAvoiding(ctx, d, network, netip.Addr{}, server, nil, avoid)
	}
	opts := func(network string, c syscall.RawConn) error {
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
	d.Control = func(network, _ string, c syscall.RawConn) error { return opts(network, c) }
	src := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	if src.Port() != 0 {
		d.LocalAddr = net.TCPAddrFromAddrPort(src)
		c, err := d.DialContext(ctx, network, server.String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		if !errors.Is(err, unix.EADDRINUSE) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return nil, err
		}
		// The client's port is taken on the gateway (or the 4-tuple is
		// still in TIME_WAIT): let the kernel choose one.
		d.LocalAddr = nil
	}
	return dialAvoiding(ctx, d, network, src.Addr(), server, opts, avoid)
}

// errPortAvoided: the kernel gave a dial a local port that a live spliced
// flow to the same server holds.
var errPortAvoided = errors.New("local port held by a spliced flow to the same server")

// kernelPortTries is how many local ports the kernel may choose for a NAT
// upstream connection before the dial chooses one itself. The kernel
// moves on by 2 to 16 ports a connect to the same server
// (__inet_hash_connect), so a second refusal in a row means refused
// ports are dense where it looks (it prefers even ports, and it takes a
// spliced flow's port for free).
const kernelPortTries = 2

// maxBindTries bounds the ports a dial binds itself, when the kernel's
// choices were refused, before it gives up: ports taken on the gateway
// fail the bind at once.
const maxBindTries = 256

// dialAvoiding dials server from src (the kernel's choice of address if
// not valid) on a local port no live spliced flow to server holds
// (AvoidLive): one the kernel chooses as usual, and when the kernel's
// choices are refused, one the dial binds
// itself, from net.ipv4.ip_local_port_range less the ports of
// ip_local_reserved_ports. opts, if not nil, sets the socket's options
// before it binds.
func dialAvoiding(ctx context.Context, d net.Dialer, network string, src netip.Addr, server netip.AddrPort, opts func(string, syscall.RawConn) error, avoid AvoidFunc) (*net.TCPConn, error) {
	withOpts := func(network string, rc syscall.RawConn) error {
		if opts != nil {
			return opts(network, rc)
		}
		return nil
	}
	if avoid == nil {
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
		d.Control = func(network, _ string, rc syscall.RawConn) error { return withOpts(network, rc) }
		c, err := d.DialContext(ctx, network, server.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	// The bind, if any, is startConnect's: the net package would bind
	// after Control, and the connect in Control would have bound first.
	d.LocalAddr = nil
	var refused netip.AddrPort
	d.Control = func(network, _ string, rc syscall.RawConn) error {
		if err := withOpts(network, rc); err != nil {
			return err
		}
		local, err := startConnect(rc, src, server, avoid)
		if errors.Is(err, errPortAvoided) {
			refused = local
		}
		return err
	}
	var err error
	for range kernelPortTries {
		var c net.Conn
		if c, err = d.DialContext(ctx, network, server.String()); err == nil {
			return c.(*net.TCPConn), nil
		}
		if !errors.Is(err, errPortAvoided) {
			return nil, err
		}
	}
	// The kernel's source address stays; the port is ours to choose.
	d.Control = func(network, _ string, rc syscall.RawConn) error { return withOpts(network, rc) }
	lo, hi := localPortRange()
	reserved := reservedPorts()
	n := hi - lo + 1
	start := rand.IntN(n)
	binds := 0
	for i := 0; i < n && binds < maxBindTries; i++ {
		port := uint16(lo + (start+i)%n)
		local := netip.AddrPortFrom(refused.Addr(), port)
		if reserved(port) || avoid(local, server) == AvoidLive {
			continue
		}
		binds++
		d.LocalAddr = net.TCPAddrFromAddrPort(local)
		var c net.Conn
		if c, err = d.DialContext(ctx, network, server.String()); err == nil {
			return c.(*net.TCPConn), nil
		}
		if !errors.Is(err, unix.EADDRINUSE) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("dial %s: no local port of %d-%d (net.ipv4.ip_local_port_range, less ip_local_reserved_ports) is free of spliced flows to it and of other sockets (%d tried): %w", server, lo, hi, binds, errPortAvoided)
}

// localPortRange is the network namespace's net.ipv4.ip_local_port_range
// (for IPv6 too), or Linux's default where it cannot be read.
func localPortRange() (lo, hi int) {
	lo, hi = 32768, 60999
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return lo, hi
	}
	l, err1 := strconv.Atoi(f[0])
	h, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || l < 1 || h > 65535 || l > h {
		return lo, hi
	}
	return l, h
}

// reservedPorts reports the ports of the network namespace's
// net.ipv4.ip_local_reserved_ports (for IPv6 too): the kernel never
// chooses them for a connection, kept for services that bind them, and
// neither does dialAvoiding. None where the list cannot be read.
func reservedPorts() func(uint16) bool {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_reserved_ports")
	if err != nil {
		return func(uint16) bool { return false }
	}
	var ranges [][2]uint16
	for f := range strings.SplitSeq(strings.TrimSpace(string(b)), ",") {
		l, h, isRange := strings.Cut(f, "-")
		if !isRange {
			h = l
		}
		lo, err1 := strconv.ParseUint(l, 10, 16)
		hi, err2 := strconv.ParseUint(h, 10, 16)
		if err1 == nil && err2 == nil && lo <= hi {
			ranges = append(ranges, [2]uint16{uint16(lo), uint16(hi)})
		}
	}
	return func(port uint16) bool {
		for _, r := range ranges {
			if r[0] <= port && port <= r[1] {
				return true
			}
		}
		return false
	}
}

// startConnect binds src (if valid) and starts the connect before the
// net package's own, because
// the kernel chooses the local port only at connect and only then can
// avoid judge it. The connect that follows sees this one in progress
// (EALREADY, or EISCONN when it is done) and waits for it as for its
// own. A refused port closes the socket; its SYN, already sent, meets
// the spliced flow's server, whose answer (an ACK of that flow) the
// flow's rewrite takes.
func startConnect(rc syscall.RawConn, src netip.Addr, server netip.AddrPort, avoid AvoidFunc) (local netip.AddrPort, err error) {
	cerr := rc.Control(func(fd uintptr) {
		if src.IsValid() {
			if e := unix.Bind(int(fd), sockaddrOf(netip.AddrPortFrom(src, 0))); e != nil {
				err = os.NewSyscallError("bind", e)
				return
			}
		}
		if e := unix.Connect(int(fd), sockaddrOf(server)); e != nil && e != unix.EINPROGRESS && e != unix.EINTR {
			err = os.NewSyscallError("connect", e)
			return
		}
		sa, e := unix.Getsockname(int(fd))
		if e != nil {
			err = os.NewSyscallError("getsockname", e)
			return
		}
		if local = addrPortOfSockaddr(sa); avoid(local, server) == AvoidLive {
			err = fmt.Errorf("%w: %v", errPortAvoided, local)
		}
	})
	return local, cmp.Or(cerr, err)
}

// sockaddrOf is ap as a socket address of its family (ap unmapped); an
// IPv6 zone (a link-local address's interface) becomes its scope ID.
func sockaddrOf(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16(), ZoneId: zoneIndex(ap.Addr().Zone())}
}

// zoneIndex is the index of the interface an IPv6 zone names (a name or
// a number); 0 for none or one not found.
func zoneIndex(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	n, _ := strconv.ParseUint(zone, 10, 32)
	return uint32(n)
}

// addrPortOfSockaddr is a socket's address as netip.AddrPort, IPv4
// unmapped, an IPv6 scope ID as its zone (the interface's name, as the
// net package writes it); the zero AddrPort for another family.
func addrPortOfSockaddr(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		addr := netip.AddrFrom16(a.Addr).Unmap()
		if a.ZoneId != 0 && addr.Is6() {
			zone := strconv.FormatUint(uint64(a.ZoneId), 10)
			if ifi, err := net.InterfaceByIndex(int(a.ZoneId)); err == nil {
				zone = ifi.Name
			}
			addr = addr.WithZone(zone)
		}
		return netip.AddrPortFrom(addr, uint16(a.Port))
	}
	return netip.AddrPort{}
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
// port that avoid, if not nil, accepts); transparent allows src to be an
// address that is not the gateway's.
func DialFrom(ctx context.Context, src netip.Addr, transparent bool, dst netip.AddrPort, timeout time.Duration, avoid AvoidFunc) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: timeout, KeepAlive: -1}
	d.SetMultipathTCP(false) // see plainTCP
	var opts func(string, syscall.RawConn) error
	if transparent {
		opts = setTransparent
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	return dialAvoiding(ctx, d, family(dst.Addr()), src.Unmap(), dst, opts, avoid)
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
