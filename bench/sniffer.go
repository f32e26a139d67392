package bench

import (
	"encoding/binary"
	"net"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// sniffer records the TCP segments with payload to one port that arrive
// at an interface: a packet socket, so that it captures from the moment
// it is open, with the kernel's receive timestamps (CLOCK_REALTIME, the
// clock of the daemon's log lines).
type sniffer struct {
	fd    int
	port  uint16
	stop  atomic.Bool
	drops uint32
}

// newSniffer opens the socket in the caller's network namespace.
func newSniffer(dev string, port uint16) (*sniffer, error) {
	ifi, err := net.InterfaceByName(dev)
	if err != nil {
		return nil, err
	}
	proto := htons(unix.ETH_P_IP)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return nil, err
	}
	s := &sniffer{fd: fd, port: port}
	for _, o := range []struct{ level, opt, v int }{
		{unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1},
		{unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64 << 20},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return s, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// run reads until close and returns each segment as (time in seconds
// since the epoch, sequence number, payload length).
func (s *sniffer) run() [][3]float64 {
	var out [][3]float64
	buf := make([]byte, 128) // headers are enough
	oob := make([]byte, 128)
	for !s.stop.Load() {
		n, oobn, _, _, err := unix.Recvmsg(s.fd, buf, oob, unix.MSG_TRUNC)
		if err != nil {
			continue // the receive timeout: look at stop
		}
		seq, length, ok := tcpSegment(buf[:min(n, len(buf))], n, s.port)
		if !ok {
			continue
		}
		out = append(out, [3]float64{stamp(oob[:oobn]), float64(seq), float64(length)})
	}
	if st, err := unix.GetsockoptTpacketStats(s.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
		s.drops = st.Drops
	}
	unix.Close(s.fd)
	return out
}

func (s *sniffer) close() { s.stop.Store(true) }

// dropped is how many packets the socket lost (after run returned).
func (s *sniffer) dropped() int { return int(s.drops) }

// tcpSegment parses an IPv4 packet (its first bytes in b, total the
// packet's length) and returns its TCP sequence number and payload length
// when it goes to port and carries payload.
func tcpSegment(b []byte, total int, port uint16) (seq uint32, length int, ok bool) {
	if len(b) < 20 || b[0]>>4 != 4 || b[9] != unix.IPPROTO_TCP {
		return 0, 0, false
	}
	ihl := int(b[0]&0xf) * 4
	if len(b) < ihl+20 || binary.BigEndian.Uint16(b[ihl+2:]) != port {
		return 0, 0, false
	}
	tcpLen := int(b[ihl+12]>>4) * 4
	ipLen := int(binary.BigEndian.Uint16(b[2:]))
	if ipLen == 0 { // a GSO packet may carry 0 here
		ipLen = total
	}
	length = ipLen - ihl - tcpLen
	if length <= 0 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint32(b[ihl+4:]), length, true
}

// stamp reads the SCM_TIMESTAMPNS control message, in seconds.
func stamp(oob []byte) float64 {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return float64(time.Now().UnixNano()) / 1e9
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
			sec := int64(binary.NativeEndian.Uint64(m.Data))
			nsec := int64(binary.NativeEndian.Uint64(m.Data[8:]))
			return float64(sec) + float64(nsec)/1e9
		}
	}
	return float64(time.Now().UnixNano()) / 1e9
}
