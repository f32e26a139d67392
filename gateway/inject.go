package gateway

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"spliced/rules"
	"spliced/splice"
)

// injector sends packets the gateway builds itself (payload taken over
// during a splice) through raw sockets with our own IP headers. They take
// the output path, so the divert chain (prerouting) never sees them again.
type injector struct {
	fd4, fd6 int
	// gso sends taken-over packets longer than a segment whole (gso.go).
	gso *gsoSender
}

// newInjector opens the raw sockets; gso: taken-over packets longer than
// a segment go whole (kernel.resend: gso).
func newInjector(gso bool) (*injector, error) {
	fd4, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, fmt.Errorf("raw IPv4 socket: %w (needs CAP_NET_RAW)", err)
	}
	fd6, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		unix.Close(fd4)
		return nil, fmt.Errorf("raw IPv6 socket: %w (needs CAP_NET_RAW)", err)
	}
	in := &injector{fd4: fd4, fd6: fd6}
	if gso {
		in.gso = newGSOSender()
	}
	return in, nil
}

func (in *injector) Close() error {
	err := errors.Join(unix.Close(in.fd4), unix.Close(in.fd6))
	if in.gso != nil {
		err = errors.Join(err, in.gso.Close())
	}
	return err
}

// send transmits a complete IP packet (IPv4 with IP_HDRINCL semantics,
// IPv6 with IPV6_HDRINCL, both implied by IPPROTO_RAW).
func (in *injector) send(p *splice.Packet) error {
	dst, _ := netip.AddrFromSlice(p.Dst())
	if p.IsIPv6() {
		return unix.Sendto(in.fd6, p.Bytes(), 0, &unix.SockaddrInet6{Addr: dst.As16()})
	}
	return unix.Sendto(in.fd4, p.Bytes(), 0, &unix.SockaddrInet4{Addr: dst.As4()})
}

// sendDivertCommands sends the divert command packets of tuples on queue
// index q (see rules.Divert), each marked for that queue's command rule
// by an SO_MARK control message. The rule drops a command it took, so a
// send that fails with EPERM is a command done; one that succeeds went
// past the rules (errCommandNotTaken).
func (in *injector) sendDivertCommands(q uint16, keys []splice.Key) error {
	var oob [24]byte // unix.CmsgSpace(4)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_SOCKET, unix.SO_MARK
	h.SetLen(unix.CmsgLen(4))
	binary.NativeEndian.PutUint32(oob[unix.CmsgLen(0):], rules.DivertCommandMark+uint32(q))
	var buf [splice.IPv6HeaderLen + splice.TCPMinHeaderLen]byte
	for _, k := range keys {
		b := rules.AppendDivertCommand(buf[:0], k)
		var err error
		if k.IsIPv4() {
			err = unix.Sendmsg(in.fd4, b, oob[:unix.CmsgSpace(4)], &unix.SockaddrInet4{Addr: [4]byte(k.Dst[12:])}, 0)
		} else {
			err = unix.Sendmsg(in.fd6, b, oob[:unix.CmsgSpace(4)], &unix.SockaddrInet6{Addr: k.Dst}, 0)
		}
		switch {
		case err == nil:
			return fmt.Errorf("divert command for %v: %w", k, errCommandNotTaken)
		case !errors.Is(err, unix.EPERM):
			return fmt.Errorf("send the divert command for %v: %w", k, err)
		}
	}
	return nil
}

// errCommandNotTaken: a divert command went past the divertcmd chain.
var errCommandNotTaken = errors.New("no rule of the divertcmd chain took it (was the table changed?)")

// injectBatch is how many packets sendAll hands the kernel per system
// call.
const injectBatch = 64

// sendAll transmits complete IP packets in order, up to injectBatch per
// sendmmsg: a busy flow's splice releases thousands of segments taken
// over during its drain, and a system call each was most of its release
// phase. A packet the kernel refuses is skipped (its sender still has it
// unacknowledged and sends it again); sendAll returns how many went out
// and the first error.
func (in *injector) sendAll(pkts [][]byte) (sent int, err error) {
	var (
		msgs [injectBatch]unix.Mmsghdr
		iovs [injectBatch]unix.Iovec
		sa4  [injectBatch]unix.RawSockaddrInet4
		sa6  [injectBatch]unix.RawSockaddrInet6
	)
	for len(pkts) > 0 {
		// A run of one family, for one socket; the destination is the
		// IP header's.
		v6 := ipVersion(pkts[0]) == 6
		n := 0
		for ; n < len(pkts) && n < injectBatch; n++ {
			b := pkts[n]
			if v := ipVersion(b); v6 && (v != 6 || len(b) < splice.IPv6HeaderLen) || !v6 && (v != 4 || len(b) < 20) {
				break
			}
			iovs[n] = iovec(b)
			msgs[n] = unix.Mmsghdr{}
			msgs[n].Hdr.Iov = &iovs[n]
			msgs[n].Hdr.SetIovlen(1)
			if v6 {
				sa6[n] = unix.RawSockaddrInet6{Family: unix.AF_INET6}
				copy(sa6[n].Addr[:], b[24:40])
				msgs[n].Hdr.Name = (*byte)(unsafe.Pointer(&sa6[n]))
				msgs[n].Hdr.Namelen = unix.SizeofSockaddrInet6
			} else {
				sa4[n] = unix.RawSockaddrInet4{Family: unix.AF_INET}
				copy(sa4[n].Addr[:], b[16:20])
				msgs[n].Hdr.Name = (*byte)(unsafe.Pointer(&sa4[n]))
				msgs[n].Hdr.Namelen = unix.SizeofSockaddrInet4
			}
		}
		if n == 0 {
			// Too short for its IP header: no packet the kernel takes.
			if err == nil {
				err = fmt.Errorf("inject: not an IP packet (%d bytes)", len(pkts[0]))
			}
			pkts = pkts[1:]
			continue
		}
		fd := in.fd4
		if v6 {
			fd = in.fd6
		}
		r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(n), 0, 0, 0)
		runtime.KeepAlive(pkts)
		done := int(r)
		if errno != 0 {
			if errno == unix.EINTR {
				continue
			}
			// The first packet of the run failed (sendmmsg reports an
			// error only when it sent nothing): skip it.
			if err == nil {
				err = errno
			}
			done = 1
		} else {
			sent += done
		}
		pkts = pkts[done:]
	}
	return sent, err
}

// ipVersion is the version field of a packet's IP header (0 if empty).
func ipVersion(b []byte) byte {
	if len(b) == 0 {
		return 0
	}
	return b[0] >> 4
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}

// stripPayload turns a parsed packet, in place, into the pure ACK it
// carries: no payload, no FIN, no PSH, lengths and checksums fixed. It
// returns the shortened packet, or nil when nothing is left to deliver
// (no ACK flag).
func stripPayload(p *splice.Packet) []byte {
	t := p.TCP()
	if t.Flags()&splice.FlagACK == 0 {
		return nil
	}
	t.SetFlags(t.Flags() &^ (splice.FlagFIN | splice.FlagPSH))
	b := p.Bytes()
	end := len(b) - p.PayloadLen()
	setLength(b, p.IsIPv6(), end)
	b = b[:end]
	var q splice.Packet
	if q.Parse(b) != splice.OK {
		return nil
	}
	tq := q.TCP()
	tq.SetChecksum(0)
	tq.SetChecksum(splice.TCPChecksum(q.Src(), q.Dst(), q.Segment()))
	return b
}

// segments splits a held packet (a copy taken during the splice, possibly
// a 64 KB GSO packet) into packets whose TCP segment (header, options and
// payload) is at most wire bytes, in the sender's sequence space; FIN and
// PSH stay on the last one only, an urgent pointer names the same byte in
// every segment before it. Each returned packet is a fresh buffer.
//
// The budget is in wire bytes, not payload, because the packet keeps the
// options of the leg it came from: SACK blocks, or timestamps the other
// leg never negotiated, would push a segment of the receiving leg's MSS
// past the path MTU, and the raw socket refuses it (EMSGSIZE).
func segments(b []byte, wire int) [][]byte {
	var p splice.Packet
	if p.Parse(b) != splice.OK {
		return nil
	}
	payload := p.Payload()
	mss := max(wire-len(p.Segment())+len(payload), 1)
	if len(payload) <= mss {
		return [][]byte{append([]byte(nil), p.Bytes()...)}
	}
	hdrLen := len(p.Bytes()) - len(payload)
	t := p.TCP()
	flags, seq := t.Flags(), t.Seq()
	var out [][]byte
	for off := 0; off < len(payload); off += mss {
		n := min(mss, len(payload)-off)
		seg := make([]byte, hdrLen+n)
		copy(seg, p.Bytes()[:hdrLen])
		copy(seg[hdrLen:], payload[off:off+n])
		setLength(seg, p.IsIPv6(), hdrLen+n)
		var q splice.Packet
		if q.Parse(seg) != splice.OK {
			return out
		}
		tq := q.TCP()
		tq.SetSeq(seq.Add(uint32(off)))
		if off+n < len(payload) {
			tq.SetFlags(flags &^ (splice.FlagFIN | splice.FlagPSH))
		}
		if off > 0 && flags&splice.FlagURG != 0 {
			tq.MoveUrgent(uint32(off))
		}
		out = append(out, seg)
	}
	return out
}

// setLength sets the IP length fields of a packet to total bytes and
// fixes the IPv4 header checksum.
func setLength(b []byte, v6 bool, total int) {
	if v6 {
		binary.BigEndian.PutUint16(b[splice.IPv6PayloadLenOffset:], uint16(total-splice.IPv6HeaderLen))
		return
	}
	binary.BigEndian.PutUint16(b[splice.IPv4TotalLenOffset:], uint16(total))
	splice.IPv4(b).UpdateChecksum()
}

// freshen gives a segment taken over during a splice the sender's latest
// acknowledgment and window as its connection with the gateway knew them
// at capture (ack is never moved backwards). The checksum is left to the
// engine, which computes it in full for these packets.
func freshen(p *splice.Packet, ack splice.Seq, window uint16) {
	t := p.TCP()
	if t.Flags()&splice.FlagACK == 0 {
		return
	}
	if t.Ack().LessThan(ack) {
		t.SetAck(ack)
	}
	t.SetWindow(window)
}
