package gateway

import (
	"bytes"
	"encoding/binary"
	"testing"

	"spliced/splice"
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
