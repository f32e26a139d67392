package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/splice"
	"spliced/testnet"
)

// TestSegmentsFitTheWireBudget: a taken-over GSO packet whose options
// (timestamps and a SACK block) are longer than the receiving leg's MSS
// allows for is cut so that every segment, options included, fits the
// budget; the payload comes out whole and in order, sequence numbers
// follow it, and FIN and PSH stay on the last segment only.
func TestSegmentsFitTheWireBudget(t *testing.T) {
	const (
		tcpHdr  = 20 + 12 + 12 // timestamps, and NOP NOP SACK with one block
		payload = 5000
		seq     = 0xffffff00 // wraps inside the packet
	)
	b := make([]byte, 20+tcpHdr+payload)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, 6
	copy(b[12:], []byte{10, 1, 0, 2, 10, 2, 0, 2})
	splice.IPv4(b).UpdateChecksum()
	tcp := b[20:]
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 80)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12] = tcpHdr / 4 << 4
	tcp[13] = splice.FlagACK | splice.FlagPSH | splice.FlagFIN
	copy(tcp[20:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1, 5, 10, 0, 0, 0, 9, 0, 0, 0, 10})
	for i := range payload {
		tcp[tcpHdr+i] = byte(i * 7)
	}
	const wire = 1448 + 20 + 12 // a receiving leg with timestamps and MTU 1500
	segs := segments(b, wire)
	var got []byte
	for i, s := range segs {
		var p splice.Packet
		if r := p.Parse(s); r != splice.OK {
			t.Fatalf("segment %d: %v", i, r)
		}
		if n := len(p.Segment()); n > wire {
			t.Errorf("segment %d: %d TCP bytes, budget %d", i, n, wire)
		}
		if want := splice.Seq(seq).Add(uint32(len(got))); p.TCP().Seq() != want {
			t.Errorf("segment %d: seq %d, want %d", i, p.TCP().Seq(), want)
		}
		last := i == len(segs)-1
		if fin := p.TCP().Flags()&(splice.FlagFIN|splice.FlagPSH) != 0; fin != last {
			t.Errorf("segment %d of %d: flags %#x", i, len(segs), p.TCP().Flags())
		}
		got = append(got, p.Payload()...)
	}
	if !bytes.Equal(got, tcp[tcpHdr:]) {
		t.Errorf("payload of %d segments: %d bytes, differs from the %d sent", len(segs), len(got), payload)
	}
	if want := (payload + wire - tcpHdr - 1) / (wire - tcpHdr); len(segs) != want {
		t.Errorf("%d segments, want %d", len(segs), want)
	}
}

// TestSegmentsKeepTheUrgentPoint: a taken-over packet with urgent data
// cut into segments names the same urgent byte in every segment before
// it and marks none after it, as its sender would have. Each segment had
// the packet's pointer, an offset from its own sequence number: every one
// after the first named a later byte, and the receiver, which takes the
// newest pointer, pulled a byte out of the stream that was no urgent one.
func TestSegmentsKeepTheUrgentPoint(t *testing.T) {
	const (
		payload = 5000
		seq     = 0xfffff000
		urg     = 3000 // the point: seq+3000
		wire    = 1000 + 20
	)
	b := make([]byte, 20+20+payload)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, 6
	copy(b[12:], []byte{10, 1, 0, 2, 10, 2, 0, 2})
	splice.IPv4(b).UpdateChecksum()
	tcp := b[20:]
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12] = 20 / 4 << 4
	tcp[13] = splice.FlagACK | splice.FlagPSH | splice.FlagURG
	binary.BigEndian.PutUint16(tcp[18:], urg)
	segs := segments(b, wire)
	if len(segs) != 5 {
		t.Fatalf("%d segments, want 5", len(segs))
	}
	for i, s := range segs {
		var p splice.Packet
		if r := p.Parse(s); r != splice.OK {
			t.Fatalf("segment %d: %v", i, r)
		}
		th := p.TCP()
		marked := th.Flags()&splice.FlagURG != 0
		if before := th.Seq().LessThan(splice.Seq(seq + urg)); marked != before {
			t.Errorf("segment %d at %#x: URG %v, want %v", i, th.Seq(), marked, before)
		}
		if marked && th.Seq().Add(uint32(th.Urgent())) != splice.Seq(seq+urg) {
			t.Errorf("segment %d: urgent point %#x, want %#x", i, th.Seq().Add(uint32(th.Urgent())), seq+urg)
		}
		if !marked && th.Urgent() != 0 {
			t.Errorf("segment %d: pointer %d without URG", i, th.Urgent())
		}
	}
}

// TestSendAllInOrder: packets injected in batches leave in order, batch
// after batch and across a change of family; one the kernel refuses
// (larger than the device's MTU) is skipped and the rest go out.
func TestSendAllInOrder(t *testing.T) {
	testnet.Privileged(t, "ip")
	ns := testnet.Scratch(t)
	ns.MustRun("ip", "link", "set", "lo", "up")
	var in *injector
	var rx [2]int // raw TCP receivers, IPv4 and IPv6
	if err := ns.Do(func() error {
		var err error
		if in, err = newInjector(false); err != nil {
			return err
		}
		for i, family := range []int{unix.AF_INET, unix.AF_INET6} {
			if rx[i], err = unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP); err != nil {
				return err
			}
			tv := unix.NsecToTimeval(int64(2 * time.Second))
			if err := unix.SetsockoptTimeval(rx[i], unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	defer unix.Close(rx[0])
	defer unix.Close(rx[1])

	const n4, n6, refused = 150, 20, 70
	var pkts [][]byte
	for i := range n4 {
		size := 10
		if i == refused {
			size = 66000 // lo's MTU is 65536
		}
		pkts = append(pkts, loopbackSegment(t, false, uint32(i), size))
	}
	for i := range n6 {
		pkts = append(pkts, loopbackSegment(t, true, uint32(1000+i), 10))
	}
	sent, err := in.sendAll(pkts)
	if sent != n4+n6-1 || !errors.Is(err, unix.EMSGSIZE) {
		t.Fatalf("sent %d, error %v; want %d and EMSGSIZE", sent, err, n4+n6-1)
	}
	var want []uint32
	for i := range n4 {
		if i != refused {
			want = append(want, uint32(i))
		}
	}
	for i := range n6 {
		want = append(want, uint32(1000+i))
	}
	var got []uint32
	buf := make([]byte, 70000)
	for v, count := range []int{n4 - 1, n6} {
		for len(got) < len(want) && count > 0 {
			m, _, err := unix.Recvfrom(rx[v], buf, 0)
			if err != nil {
				t.Fatalf("receive (%d of %d so far): %v", len(got), len(want), err)
			}
			seg := buf[:m]
			if v == 0 {
				seg = seg[(seg[0]&0xf)*4:] // IPv4 raw sockets get the IP header too
			}
			if binary.BigEndian.Uint16(seg[0:]) != 4242 || binary.BigEndian.Uint16(seg[2:]) != 9 {
				continue // the stack's reset in reply
			}
			got = append(got, binary.BigEndian.Uint32(seg[4:]))
			count--
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("sequence numbers received:\n%v\nwant\n%v", got, want)
	}
}

// loopbackSegment builds a TCP segment from port 4242 to port 9 on the
// loopback address, with seq and size bytes of payload in all.
func loopbackSegment(t *testing.T, v6 bool, seq uint32, size int) []byte {
	t.Helper()
	ipLen := 20
	if v6 {
		ipLen = splice.IPv6HeaderLen
	}
	b := make([]byte, ipLen+20+size)
	if v6 {
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[4:], uint16(20+size))
		b[6], b[7] = 6, 64
		b[23], b[39] = 1, 1 // ::1 to ::1
	} else {
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:], uint16(min(len(b), 0xffff)))
		b[8], b[9] = 64, 6
		copy(b[12:], []byte{127, 0, 0, 1, 127, 0, 0, 1})
		splice.IPv4(b).UpdateChecksum()
	}
	tcp := b[ipLen:]
	binary.BigEndian.PutUint16(tcp[0:], 4242)
	binary.BigEndian.PutUint16(tcp[2:], 9)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12], tcp[13] = 5<<4, splice.FlagACK|splice.FlagPSH
	binary.BigEndian.PutUint16(tcp[14:], 1000)
	return b
}
