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
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Repair queue selectors (TCP_REPAIR_QUEUE).
const (
	noQueue   = 0
	recvQueue = 1
	sendQueue = 2
)

// tcp_info fields the engine needs that x/sys's TCPInfo does not name.
const (
	tcpInfoOptions   = 5 // tcpi_options
	tcpInfoWscale    = 6 // tcpi_snd_wscale:4 (low nibble), tcpi_rcv_wscale:4
	tcpInfoSndMSS    = 16
	tcpiOptTimestamp = 1
	tcpiOptSACK      = 2
	tcpiOptWscale    = 4
)

// OpError is a failed socket operation, with the option that failed.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string { return "tcprepair: " + e.Op + ": " + e.Err.Error() }
func (e *OpError) Unwrap() error { return e.Err }

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
		if opts&tcpiOptWscale != 0 {
			st.SndWscale = info[tcpInfoWscale] & 0x0f
			st.RcvWscale = info[tcpInfoWscale] >> 4
		}
		st.MSS = uint16(binary.NativeEndian.Uint32(info[tcpInfoSndMSS:]))
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
	st.SndWnd, st.RcvWnd = win[1], win[3]

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
// a handshake (the CRIU recipe): SO_REUSEADDR and IP_TRANSPARENT (Local
// may be an address that is not the gateway's), repair mode, the queue
// sequence numbers, the MSS clamp, bind and connect (no SYN is sent), then
// the negotiated options, the timestamp clock and the windows. The socket
// stays in repair mode, silent, until Resume.
//
// st.SndNxt becomes snd_una and write_seq (empty send queue), st.RcvNxt
// rcv_nxt; st.SndWnd is the peer's window and st.RcvWnd the socket's own,
// in bytes; st.TSval is the clock value the next segment carries.
func Restore(st *splice.Conn) (*net.TCPConn, error) {
	family := unix.AF_INET
	if st.Local.Addr().Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, &OpError{"socket", err}
	}
	if err := restore(fd, family, st); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "tcp-restored")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, &OpError{"FileConn", err}
	}
	return c.(*net.TCPConn), nil
}

func restore(fd, family int, st *splice.Conn) error {
	setInt := func(level, opt, v int, name string) error {
		if err := unix.SetsockoptInt(fd, level, opt, v); err != nil {
			return &OpError{name, err}
		}
		return nil
	}
	transparent := func() error {
		if family == unix.AF_INET6 {
			return setInt(unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT")
		}
		return setInt(unix.SOL_IP, unix.IP_TRANSPARENT, 1, "IP_TRANSPARENT")
	}
	steps := []func() error{
		transparent,
		// SO_REUSEADDR before repair mode: the tuple may still be bound
		// by a socket the splice closed silently.
		func() error { return setInt(unix.SOL_SOCKET, unix.SO_REUSEADDR, 1, "SO_REUSEADDR") },
		func() error { return setInt(unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON, "TCP_REPAIR on") },
		func() error { return setInt(unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, recvQueue, "TCP_REPAIR_QUEUE") },
		func() error {
			return setInt(unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(st.RcvNxt)), "TCP_QUEUE_SEQ recv")
		},
		func() error { return setInt(unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, sendQueue, "TCP_REPAIR_QUEUE") },
		func() error {
			return setInt(unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(st.SndNxt)), "TCP_QUEUE_SEQ send")
		},
		func() error { return setInt(unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, noQueue, "TCP_REPAIR_QUEUE") },
		// Without it the cached MSS would be 536 until the options are
		// set. The kernel bounds TCP_MAXSEG by 32767 (loopback's MSS is
		// larger); TCP_REPAIR_OPTIONS sets the real clamp.
		func() error {
			return setInt(unix.SOL_TCP, unix.TCP_MAXSEG, int(min(mssClamp(st), 32767)), "TCP_MAXSEG")
		},
		func() error {
			if err := unix.Bind(fd, sockaddr(st.Local)); err != nil {
				return &OpError{"bind " + st.Local.String(), err}
			}
			return nil
		},
		func() error {
			if err := unix.Connect(fd, sockaddr(st.Remote)); err != nil {
				return &OpError{"connect " + st.Remote.String(), err}
			}
			return nil
		},
		// Options and windows only after connect, which resets them.
		func() error { return repairOptions(fd, st) },
		func() error {
			if !st.Timestamps {
				return nil
			}
			return setInt(unix.SOL_TCP, unix.TCP_TIMESTAMP, int(int32(st.TSval&^1)), "TCP_TIMESTAMP")
		},
		func() error {
			// struct tcp_repair_window { snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup }
			win := [5]uint32{uint32(st.RcvNxt), st.SndWnd, max(st.SndWnd, st.RcvWnd), st.RcvWnd, uint32(st.RcvNxt)}
			_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_TCP, unix.TCP_REPAIR_WINDOW,
				uintptr(unsafe.Pointer(&win)), unsafe.Sizeof(win), 0)
			if errno != 0 {
				return &OpError{"TCP_REPAIR_WINDOW", errno}
			}
			return nil
		},
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
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

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// Resume takes a restored socket out of repair mode; the kernel sends a
// window probe, and the connection runs as any other.
func Resume(c *net.TCPConn) error {
	return control(c, func(fd int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF); err != nil {
			return &OpError{"TCP_REPAIR off", err}
		}
		return nil
	})
}
