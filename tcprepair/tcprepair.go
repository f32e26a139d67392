// Package tcprepair reads the state of a live TCP socket with the kernel's
// TCP_REPAIR interface (the one CRIU uses), so that the gateway can close
// its sockets silently and let the splice engine continue their
// connections. It needs CAP_NET_ADMIN.
//
// In repair mode a socket sends nothing: closing it sends neither FIN nor
// RST, and its peer never learns it is gone.
package tcprepair

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Repair queue selectors (TCP_REPAIR_QUEUE).
const (
	recvQueue = 1
	sendQueue = 2
)

// tcp_info fields the engine needs that x/sys's TCPInfo does not name.
const (
	tcpInfoOptions   = 5 // tcpi_options
	tcpInfoWscale    = 6 // tcpi_snd_wscale:4 (low nibble), tcpi_rcv_wscale:4
	tcpInfoSndMSS    = 16
	tcpInfoAdvMSS    = 84
	tcpiOptTimestamp = 1
	tcpiOptSACK      = 2
	tcpiOptWscale    = 4
	tcpiOptECN       = 8
)

// OpError is a failed socket operation, with the option that failed.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string { return "tcprepair: " + e.Op + ": " + e.Err.Error() }
func (e *OpError) Unwrap() error { return e.Err }

// Unread returns the bytes in a socket's receive queue (SIOCINQ); it
// answers in repair mode too.
func Unread(c *net.TCPConn) (int, error) {
	var n int
	err := control(c, func(fd int) error {
		var err error
		if n, err = unix.IoctlGetInt(fd, unix.SIOCINQ); err != nil {
			return &OpError{"SIOCINQ", err}
		}
		return nil
	})
	return n, err
}

// Queues returns the bytes in a socket's receive queue (unread) and send
// queue (not yet acknowledged by the peer).
func Queues(c *net.TCPConn) (inq, outq int, err error) {
	err = control(c, func(fd int) error {
		if inq, err = unix.IoctlGetInt(fd, unix.SIOCINQ); err != nil {
			return &OpError{"SIOCINQ", err}
		}
		if outq, err = unix.IoctlGetInt(fd, unix.SIOCOUTQ); err != nil {
			return &OpError{"SIOCOUTQ", err}
		}
		return nil
	})
	return inq, outq, err
}

// OutQ returns the bytes in a socket's send queue not yet acknowledged
// by the peer (SIOCOUTQ: write_seq - snd_una).
func OutQ(c *net.TCPConn) (outq int, err error) {
	err = control(c, func(fd int) error {
		if outq, err = unix.IoctlGetInt(fd, unix.SIOCOUTQ); err != nil {
			return &OpError{"SIOCOUTQ", err}
		}
		return nil
	})
	return outq, err
}

// Established reports whether the connection is in state ESTABLISHED
// (TCP_INFO): false once a RST reset it, or a FIN went either way.
func Established(c *net.TCPConn) (bool, error) {
	var state uint8
	err := control(c, func(fd int) error {
		var info [8]byte // tcpi_state is the first byte
		if err := getsockopt(fd, unix.TCP_INFO, unsafe.Pointer(&info), unsafe.Sizeof(info)); err != nil {
			return &OpError{"TCP_INFO", err}
		}
		state = info[0]
		return nil
	})
	return state == tcpEstablished, err
}

// ErrNotEstablished is returned by Capture for a connection that is not
// in state ESTABLISHED: a FIN was sent or received, and the sequence
// numbers no longer describe a byte stream alone.
var ErrNotEstablished = errors.New("tcprepair: connection is not established (half-closed or closing)")

const tcpEstablished = 1

// Capture puts the socket into repair mode and reads everything the splice
// engine needs to continue its connection. On success the socket stays in
// repair mode: closing it then is silent. On error the socket leaves repair
// mode (without a window probe) and is usable as before.
//
// Capture expects empty queues (see Queues): SndNxt is write_seq, which
// equals snd_una only when everything sent was acknowledged.
func Capture(c *net.TCPConn) (splice.Conn, error) {
	var st splice.Conn
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return st, errors.New("tcprepair: connection has no addresses")
	}
	st.Local = unmap(local)
	st.Remote = unmap(remote)
	err := control(c, func(fd int) error {
		// The state, options, window scales and MSS, read before the
		// repair mode, which changes none of them (one system call for
		// the check and the capture).
		var info [104]byte
		if err := getsockopt(fd, unix.TCP_INFO, unsafe.Pointer(&info), unsafe.Sizeof(info)); err != nil {
			return &OpError{"TCP_INFO", err}
		}
		if info[0] != tcpEstablished {
			return fmt.Errorf("%w: state %s", ErrNotEstablished, tcpStateName(info[0]))
		}
		opts := info[tcpInfoOptions]
		st.Timestamps = opts&tcpiOptTimestamp != 0
		st.SACK = opts&tcpiOptSACK != 0
		st.ECN = opts&tcpiOptECN != 0
		if opts&tcpiOptWscale != 0 {
			st.SndWscale = info[tcpInfoWscale] & 0x0f
			st.RcvWscale = info[tcpInfoWscale] >> 4
		}
		st.MSS = uint16(binary.NativeEndian.Uint32(info[tcpInfoSndMSS:]))
		st.AdvMSS = uint16(binary.NativeEndian.Uint32(info[tcpInfoAdvMSS:]))
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
			return &OpError{"TCP_REPAIR on", err}
		}
		if err := capture(fd, &st); err != nil {
			unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
			return err
		}
		return nil
	})
	return st, err
}

func capture(fd int, st *splice.Conn) error {
	seq := func(queue int) (uint32, error) {
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
			return 0, &OpError{"TCP_REPAIR_QUEUE", err}
		}
		v, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_QUEUE_SEQ)
		if err != nil {
			return 0, &OpError{"TCP_QUEUE_SEQ", err}
		}
		return uint32(v), nil
	}
	rcv, err := seq(recvQueue)
	if err != nil {
		return err
	}
	snd, err := seq(sendQueue)
	if err != nil {
		return err
	}
	// The repair queue stays selected: it matters only in repair mode,
	// which a captured socket leaves only by its close or by Leave, and
	// TCP_REPAIR on selects no queue again (one system call less per
	// socket on a splice's path).
	st.RcvNxt, st.SndNxt = splice.Seq(rcv), splice.Seq(snd)

	// struct tcp_repair_window { snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup }
	var win [5]uint32
	if err := getsockopt(fd, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(&win), unsafe.Sizeof(win)); err != nil {
		return &OpError{"TCP_REPAIR_WINDOW", err}
	}
	st.SndWnd, st.MaxWnd, st.RcvWnd = win[1], win[2], win[3]

	ts, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP)
	if err != nil {
		return &OpError{"TCP_TIMESTAMP", err}
	}
	// Since Linux 6.7 bit 0 flags a microsecond clock; it is not part of
	// the value.
	st.TSval = uint32(ts) &^ 1
	return nil
}

func getsockopt(fd, opt int, p unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_TCP, uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func control(c *net.TCPConn, fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return fmt.Errorf("tcprepair: %w", err)
	}
	return ferr
}

func unmap(a *net.TCPAddr) netip.AddrPort {
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Leave takes a captured socket out of repair mode without sending a
// window probe, so it can be used normally again (for example when a
// splice is aborted after the capture).
func Leave(c *net.TCPConn) error {
	return control(c, func(fd int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP); err != nil {
			return &OpError{"TCP_REPAIR off", err}
		}
		return nil
	})
}

func tcpStateName(s uint8) string {
	names := []string{1: "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"}
	if int(s) < len(names) && names[s] != "" {
		return names[s]
	}
	return fmt.Sprintf("state %d", s)
}

// Restore builds a connected socket in state ESTABLISHED from st, without
// a handshake (the CRIU recipe): IP_TRANSPARENT (Local may be an
// address that is not the gateway's), repair mode, the queue
// sequence numbers, the MSS clamp, bind and connect (no SYN is sent), then
// the negotiated options, the timestamp clock and the windows. The socket
// stays in repair mode, silent, until Resume.
//
// st.SndNxt becomes snd_una and write_seq (empty send queue), st.RcvNxt
// rcv_nxt; st.SndWnd is the peer's window and st.RcvWnd the socket's own,
// in bytes; st.TSval is the clock value the next segment carries.
func Restore(st *splice.Conn) (*net.TCPConn, error) {
	network := "tcp4"
	family := unix.AF_INET
	if st.Local.Addr().Is6() {
		network, family = "tcp6", unix.AF_INET6
	}
	// Through a net.Dialer, whose Control runs the steps before bind and
	// connect: net.FileConn would dup the socket, set it non-blocking
	// and ask its type, and turn on keep-alive (nine system calls of
	// about 27 a socket; the proxies' own sockets have no keep-alive).
	var stepErr error
	d := net.Dialer{
		KeepAlive: -1,
		LocalAddr: net.TCPAddrFromAddrPort(st.Local),
		Control: func(_, _ string, rc syscall.RawConn) error {
			if err := rc.Control(func(fd uintptr) { stepErr = beforeConnect(int(fd), family, st) }); err != nil {
				return err
			}
			return stepErr
		},
	}
	// A repaired socket is plain TCP, whatever GODEBUG=multipathtcp says:
	// an MPTCP socket has no TCP_REPAIR.
	d.SetMultipathTCP(false)
	c, err := d.Dial(network, st.Remote.String())
	if err != nil {
		if stepErr != nil {
			return nil, stepErr
		}
		return nil, &OpError{"bind " + st.Local.String() + ", connect " + st.Remote.String(), err}
	}
	tc := c.(*net.TCPConn)
	if err := control(tc, func(fd int) error { return afterConnect(fd, st) }); err != nil {
		tc.Close() // in repair mode: silent
		return nil, err
	}
	return tc, nil
}

// beforeConnect runs the steps of a restore that come before bind and
// connect.
func beforeConnect(fd, family int, st *splice.Conn) error {
	setInt := func(level, opt, v int, name string) error {
		if err := unix.SetsockoptInt(fd, level, opt, v); err != nil {
			return &OpError{name, err}
		}
		return nil
	}
	if family == unix.AF_INET6 {
		if err := setInt(unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT"); err != nil {
			return err
		}
	} else if err := setInt(unix.SOL_IP, unix.IP_TRANSPARENT, 1, "IP_TRANSPARENT"); err != nil {
		return err
	}
	steps := []struct {
		level, opt, v int
		name          string
	}{
		// Repair mode also forces the reuse of the local address
		// (SK_FORCE_REUSE): bind takes the port even while another
		// socket holds it (SO_REUSEADDR, set here before, was
		// overwritten by it).
		{unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON, "TCP_REPAIR on"},
		{unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, recvQueue, "TCP_REPAIR_QUEUE"},
		{unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(st.RcvNxt)), "TCP_QUEUE_SEQ recv"},
		{unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, sendQueue, "TCP_REPAIR_QUEUE"},
		// The send queue stays selected: the selection matters only
		// to writes in repair mode, which a restored socket gets none
		// of (see capture).
		{unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(st.SndNxt)), "TCP_QUEUE_SEQ send"},
		// Without it the cached MSS would be 536 until the options are
		// set. The kernel bounds TCP_MAXSEG by 32767 (loopback's MSS is
		// larger); TCP_REPAIR_OPTIONS sets the real clamp.
		{unix.SOL_TCP, unix.TCP_MAXSEG, int(min(mssClamp(st), 32767)), "TCP_MAXSEG"},
	}
	for _, s := range steps {
		if err := setInt(s.level, s.opt, s.v, s.name); err != nil {
			return err
		}
	}
	return nil
}

// afterConnect runs the steps of a restore that come after connect,
// which resets them: the options, the timestamp clock and the windows.
func afterConnect(fd int, st *splice.Conn) error {
	if err := repairOptions(fd, st); err != nil {
		return err
	}
	if st.Timestamps {
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP, int(int32(st.TSval&^1))); err != nil {
			return &OpError{"TCP_TIMESTAMP", err}
		}
	}
	// struct tcp_repair_window { snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup }
	// snd_wl1 one before rcv_nxt: the peer's next segment updates the
	// window even when it carries no data and a smaller window (what
	// the window probe of TCP_REPAIR_OFF arranges; see Resume).
	// max_window: the peer's largest window as captured, when known (it
	// bounds the socket's segments, and a later splice reads it back);
	// otherwise the larger of the two windows.
	maxWnd := max(st.SndWnd, st.RcvWnd)
	if st.MaxWnd != 0 {
		maxWnd = max(st.MaxWnd, st.SndWnd)
	}
	win := [5]uint32{uint32(st.RcvNxt - 1), st.SndWnd, maxWnd, st.RcvWnd, uint32(st.RcvNxt)}
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_TCP, unix.TCP_REPAIR_WINDOW,
		uintptr(unsafe.Pointer(&win)), unsafe.Sizeof(win), 0)
	if errno != 0 {
		return &OpError{"TCP_REPAIR_WINDOW", errno}
	}
	return nil
}

// mssClamp is the MSS the peer announced: the captured MSS (mss_cache)
// leaves out the timestamp option.
func mssClamp(st *splice.Conn) uint16 {
	if st.Timestamps {
		return st.MSS + 12
	}
	return st.MSS
}

// repairOptions sets the options the handshake negotiated
// (TCP_REPAIR_OPTIONS: an array of {code, value}).
func repairOptions(fd int, st *splice.Conn) error {
	const (
		optMSS       = 2
		optWindow    = 3
		optSACKPerm  = 4
		optTimestamp = 8
	)
	opts := [][2]uint32{{optMSS, uint32(mssClamp(st))}}
	if st.SndWscale != 0 || st.RcvWscale != 0 {
		opts = append(opts, [2]uint32{optWindow, uint32(st.SndWscale) | uint32(st.RcvWscale)<<16})
	}
	if st.SACK {
		opts = append(opts, [2]uint32{optSACKPerm, 0})
	}
	if st.Timestamps {
		opts = append(opts, [2]uint32{optTimestamp, 0})
	}
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_TCP, unix.TCP_REPAIR_OPTIONS,
		uintptr(unsafe.Pointer(&opts[0])), uintptr(len(opts))*8, 0)
	if errno != 0 {
		return &OpError{"TCP_REPAIR_OPTIONS", errno}
	}
	return nil
}

// Resume takes a restored socket out of repair mode, and the connection
// runs as any other.
//
// It sends no window probe (TCP_REPAIR_OFF_NO_WP). CRIU's probe makes
// the peer answer with its current window; a restored socket already has
// it (Restore's SndWnd, and snd_wl1 lets the next segment update it), and
// a zero window arms the persist timer once the socket has something to
// send, as on any connection. The probe and its answer cost two packets
// through the gateway's queue per socket, on an unsplice's critical path.
func Resume(c *net.TCPConn) error {
	return control(c, func(fd int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP); err != nil {
			return &OpError{"TCP_REPAIR off", err}
		}
		return nil
	})
}
