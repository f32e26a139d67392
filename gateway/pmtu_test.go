package gateway

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"

	"spliced/config"
	"spliced/nfq"
	"spliced/splice"
)

// fragNeeded builds the ICMP "fragmentation needed" a router at from
// sends to the source of pkt (an IPv4 packet as it left the gateway),
// quoting its first quote bytes.
func fragNeeded(from netip.Addr, pkt []byte, quote int, mtu uint16) []byte {
	q := pkt[:min(quote, len(pkt))]
	b := make([]byte, 28, 28+len(q))
	b[0] = 0x45
	b[8], b[9] = 64, 1
	copy(b[12:], from.AsSlice())
	copy(b[16:], pkt[12:16])
	b[20], b[21] = 3, 4
	binary.BigEndian.PutUint16(b[26:], mtu)
	b = append(b, q...)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	splice.IPv4(b).UpdateChecksum()
	binary.BigEndian.PutUint16(b[22:], ^splice.Fold(splice.Sum(b[20:], 0)))
	return b
}

// quoted is what a path MTU error quotes of a TCP segment.
type quoted struct {
	src, dst netip.AddrPort
	seq, ack uint32
}

func (q quoted) String() string {
	return fmt.Sprintf("%v > %v seq %d ack %d", q.src, q.dst, q.seq, q.ack)
}

// TestPMTUErrorTranslated: the packet handler sends a path MTU error
// about a spliced NAT flow's packet (either direction) on to the sender
// of the segment it quotes, in that sender's terms, and keeps the
// quoted sequence number's place relative to the sender's window: the
// sender's kernel checks it against what it has in flight (tcp_v4_err:
// snd_una..snd_nxt, else TcpExtOutOfWindowIcmps) and so ignores a
// forged error of an off-path attacker (RFC 5927) as it would without
// the gateway. A translation that moved the quote into the window (or
// answered a forged one with its own numbers) would hand the attacker
// the sender's path MTU. What the engine does not translate passes
// unchanged or, when its checksum fails, is dropped.
func TestPMTUErrorTranslated(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	gw := netip.MustParseAddrPort("10.2.0.1:50000")
	router := netip.MustParseAddr("10.2.0.254")
	g := New(&config.Config{}, slog.New(slog.DiscardHandler))
	g.engine = splice.NewTable()
	p := splice.Params{
		Client: splice.Conn{Local: s, Remote: c, SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: gw, Remote: s, SndNxt: 700000, RcvNxt: 9000000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	if _, err := g.engine.Add(1, &p, 0); err != nil {
		t.Fatal(err)
	}
	h := &packetHandler{g: g}
	forward := func(pkt []byte) []byte {
		t.Helper()
		np := &nfq.Packet{Data: pkt}
		if d := h.handle(np); d != nfq.AcceptModified {
			t.Fatalf("data: %v, want it forwarded", d)
		}
		return np.Data
	}
	// The client's 1000 bytes at 1000 leave as the gateway's at 700000;
	// the server's at 9000000 leave as the gateway's at 5000.
	c2s := forward(dataPacket(c, s, 1000, 5000, make([]byte, 1000), false))
	s2c := forward(dataPacket(s, gw, 9000000, 701000, make([]byte, 1000), false))

	for _, tc := range []struct {
		name  string
		out   []byte // the packet as it left the gateway
		seq   uint32 // the quoted sequence number, as forwarded (0: the packet's)
		quote int
		to    netip.Addr
		want  quoted
	}{
		{"client's segment", c2s, 0, len(c2s), c.Addr(), quoted{c, s, 1000, 5000}},
		{"client's segment, 28 bytes quoted", c2s, 0, 28, c.Addr(), quoted{c, s, 1000, 0}},
		{"server's segment", s2c, 0, len(s2c), s.Addr(), quoted{s, gw, 9000000, 701000}},
		// Forged: 2^30 beyond what the gateway sent each way. It stays
		// 2^30 beyond what the sender sent, which its kernel ignores.
		{"forged, client's leg", c2s, 700000 + 1<<30, len(c2s), c.Addr(), quoted{c, s, 1000 + 1<<30, 5000}},
		{"forged, server's leg", s2c, 5000 + 1<<30, len(s2c), s.Addr(), quoted{s, gw, 9000000 + 1<<30, 701000}},
	} {
		out := append([]byte(nil), tc.out...)
		if tc.seq != 0 {
			binary.BigEndian.PutUint32(out[20+4:], tc.seq)
		}
		np := &nfq.Packet{Data: fragNeeded(router, out, tc.quote, 1400)}
		if d := h.handle(np); d != nfq.AcceptModified {
			t.Errorf("%s: %v, want translated", tc.name, d)
			continue
		}
		b := np.Data
		if got := netip.AddrFrom4([4]byte(b[16:20])); got != tc.to {
			t.Errorf("%s: error to %v, want %v", tc.name, got, tc.to)
		}
		if splice.Fold(splice.Sum(b[:20], 0)) != 0xffff || splice.Fold(splice.Sum(b[20:], 0)) != 0xffff {
			t.Errorf("%s: IP or ICMP checksum fails", tc.name)
		}
		if mtu := binary.BigEndian.Uint16(b[26:]); mtu != 1400 {
			t.Errorf("%s: MTU %d, want 1400", tc.name, mtu)
		}
		q := b[28:]
		qt := q[20:]
		got := quoted{
			netip.AddrPortFrom(netip.AddrFrom4([4]byte(q[12:16])), binary.BigEndian.Uint16(qt[0:])),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte(q[16:20])), binary.BigEndian.Uint16(qt[2:])),
			binary.BigEndian.Uint32(qt[4:]), 0,
		}
		if len(qt) >= 12 {
			got.ack = binary.BigEndian.Uint32(qt[8:])
		}
		if got != tc.want {
			t.Errorf("%s: quote %v, want %v", tc.name, got, tc.want)
		}
	}
	if n := g.counters.pmtu[pmtuTranslated].Load(); n != 5 {
		t.Errorf("translated counted %d, want 5", n)
	}

	// A corrupted checksum: dropped, not made valid.
	bad := fragNeeded(router, c2s, len(c2s), 1400)
	bad[len(bad)-1] ^= 0xff
	if d := h.handle(&nfq.Packet{Data: bad}); d != nfq.Drop {
		t.Errorf("bad checksum: %v, want drop", d)
	}
	// No spliced flow for the quote: it goes on as it came.
	other := append([]byte(nil), c2s...)
	binary.BigEndian.PutUint16(other[20:], 50001)
	msg := fragNeeded(router, other, len(other), 1400)
	np := &nfq.Packet{Data: append([]byte(nil), msg...)}
	if d := h.handle(np); d != nfq.Accept || !bytes.Equal(np.Data, msg) {
		t.Errorf("no flow: %v, want it accepted unchanged", d)
	}
	// Addressed to a third host: not the flow's, sent on unchanged.
	elsewhere := fragNeeded(router, c2s, len(c2s), 1400)
	copy(elsewhere[16:20], []byte{203, 0, 113, 9})
	splice.IPv4(elsewhere).UpdateChecksum()
	np = &nfq.Packet{Data: append([]byte(nil), elsewhere...)}
	if d := h.handle(np); d != nfq.Accept || !bytes.Equal(np.Data, elsewhere) {
		t.Errorf("addressed elsewhere: %v, want it accepted unchanged", d)
	}
	for r, want := range map[int]uint64{pmtuBadChecksum: 1, pmtuNoFlow: 1, pmtuUnparsed: 1} {
		if n := g.counters.pmtu[r].Load(); n != want {
			t.Errorf("%s counted %d, want %d", pmtuResultNames[r], n, want)
		}
	}
}
