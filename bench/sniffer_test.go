package bench

import (
	"encoding/binary"
	"testing"
)

func TestTCPSegment(t *testing.T) {
	pkt := func(dport uint16, ipLen int) []byte {
		b := make([]byte, 40)
		b[0], b[9] = 0x45, 6
		binary.BigEndian.PutUint16(b[2:], uint16(ipLen))
		binary.BigEndian.PutUint16(b[22:], dport)
		binary.BigEndian.PutUint32(b[24:], 123456)
		b[32] = 5 << 4
		return b
	}
	for _, c := range []struct {
		name   string
		b      []byte
		total  int
		ok     bool
		length int
	}{
		{"data", pkt(7300, 1040), 1040, true, 1000},
		{"pure ack", pkt(7300, 40), 40, false, 0},
		{"other port", pkt(7301, 1040), 1040, false, 0},
		{"gso, ip length 0", pkt(7300, 0), 65000, true, 64960},
		{"short", pkt(7300, 1040)[:30], 1040, false, 0},
	} {
		seq, n, ok := tcpSegment(c.b, c.total, 7300)
		if ok != c.ok || n != c.length || (ok && seq != 123456) {
			t.Errorf("%s: seq %d len %d ok %v, want len %d ok %v", c.name, seq, n, ok, c.length, c.ok)
		}
	}
}
