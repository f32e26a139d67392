package splice

import (
	"encoding/binary"
	"fmt"
	"testing"
)

// withECN sets a built packet's ECN field, with a correct IPv4 header
// checksum (the reference sum).
func withECN(b []byte, ecn uint8) []byte {
	if b[0]>>4 == 6 {
		b[1] = b[1]&^0x30 | ecn<<4
		return b
	}
	b[1] = b[1]&^3 | ecn
	hl := int(b[0]&0x0f) * 4
	binary.BigEndian.PutUint16(b[10:], 0)
	binary.BigEndian.PutUint16(b[10:], ^refFold(refSum(b[:hl], 0)))
	return b
}

// TestECNAcrossLegs: ECN is negotiated per connection, and a client
// that asks for it gets it from the gateway's socket while the gateway's
// connection to the server does not ask (tcp_ecn=2, Linux's default).
// Spliced, the client's ECN-capable packets reached a server that never
// negotiated ECN: a router marks such packets CE instead of dropping
// them, the server ignores the mark, and the client never slows down.
// Toward a receiver without ECN, packets now go Not-ECT and a CE mark
// becomes a drop; where both legs agree nothing changes.
func TestECNAcrossLegs(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, nat := range []bool{false, true} {
			for _, c := range []struct {
				client, server bool
				strip          [2]bool // by direction
			}{
				{true, false, [2]bool{true, false}},
				{false, true, [2]bool{false, true}},
				{true, true, [2]bool{}},
				{false, false, [2]bool{}},
			} {
				name := fmt.Sprintf("v6=%v nat=%v client=%v server=%v", v6, nat, c.client, c.server)
				f := newFixture(t, v6, nat, func(p *Params) { p.Client.ECN, p.Server.ECN = c.client, c.server })
				seq := [2]uint32{1000, 0xffffff00}
				for _, d := range []Dir{C2S, S2C} {
					build := func(ecn uint8, n int) []byte {
						var s seg
						if d == C2S {
							s = f.c2s(seq[d], sa(0), FlagACK)
						} else {
							s = f.s2c(seq[d], 0x7ffffff0, FlagACK)
						}
						s.payload = make([]byte, n)
						return withECN(s.bytes(), ecn)
					}
					for _, ecn := range []uint8{1, 2} { // ECT(1), ECT(0)
						b := build(ecn, 100)
						if v := f.run(t, b, d, true); v != Forward {
							t.Fatalf("%s %v ECT(%d): verdict %v", name, d, 2-ecn, v)
						}
						seq[d] += 100
						var p Packet
						p.Parse(b)
						want := ecn
						if c.strip[d] {
							want = ECNNotECT
						}
						if got := p.ECN(); got != want {
							t.Errorf("%s %v: ECN %d forwarded as %d, want %d", name, d, ecn, got, want)
						}
					}
					before := f.e.flow.State()
					b := build(ECNCE, 100)
					v := f.run(t, b, d, true)
					switch {
					case c.strip[d] && v != DropCE:
						t.Errorf("%s %v: CE toward a leg without ECN: verdict %v, want %v", name, d, v, DropCE)
					case c.strip[d] && f.e.flow.State() != before:
						t.Errorf("%s %v: the dropped CE packet changed the flow", name, d)
					case !c.strip[d] && v != Forward:
						t.Errorf("%s %v: CE verdict %v, want forward", name, d, v)
					case !c.strip[d]:
						seq[d] += 100
						var p Packet
						p.Parse(b)
						if p.ECN() != ECNCE {
							t.Errorf("%s %v: CE forwarded as %d", name, d, p.ECN())
						}
					}
				}
			}
		}
	}
}
