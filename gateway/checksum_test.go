package gateway

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"spliced/config"
	"spliced/nfq"
	"spliced/splice"
)

// dataPacket is an IPv4 TCP segment with ACK and payload and a complete,
// correct checksum (or, partial, only the pseudo-header sum, as a
// CHECKSUM_PARTIAL packet from a local sender has).
func dataPacket(src, dst netip.AddrPort, seq, ack uint32, payload []byte, partial bool) []byte {
	b := splice.AppendBareSegment(nil, splice.KeyFrom(src, dst), splice.Seq(seq), splice.FlagACK|splice.FlagPSH, 64)
	b = append(b, payload...)
	binary.BigEndian.PutUint16(b[splice.IPv4TotalLenOffset:], uint16(len(b)))
	splice.IPv4(b).UpdateChecksum()
	var p splice.Packet
	p.Parse(b)
	t := p.TCP()
	t.SetAck(splice.Seq(ack))
	t.SetWindow(1000)
	t.SetChecksum(0)
	if partial {
		s := splice.Sum(p.Src(), 0)
		s = splice.Sum(p.Dst(), s) + 6 + uint64(len(p.Segment()))
		t.SetChecksum(splice.Fold(s))
	} else {
		t.SetChecksum(splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()))
	}
	return b
}

func checksumOK(b []byte) bool {
	var p splice.Packet
	return p.Parse(b) == splice.OK && splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()) == 0
}

// TestDrainRefusesCorruptSegment: a data segment whose (complete) TCP
// checksum is wrong, corrupted on its way or forged, that arrives while
// a splice drains must be dropped, as its receiver would drop it. Before,
// the drain kept a copy of its payload and delivered its ACK part to the
// socket with a freshly computed checksum; the release then sent the
// copy through the engine, which computes taken-over packets' checksums
// in full: the corrupted bytes reached the receiver with a valid
// checksum, their sender had them acknowledged and never sent them again.
// A CHECKSUM_PARTIAL packet (the field holds only the pseudo-header sum)
// is taken over as before.
func TestDrainRefusesCorruptSegment(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	keys := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, netip.MustParseAddrPort("10.1.0.2:40001"))}
	for _, partial := range []bool{false, true} {
		g := New(&config.Config{}, nil)
		tr := newTransition(keys, 0, phaseDraining, nil)
		g.transitions.add(tr)
		tr.progress <- struct{}{} // a wake pending: handle tells no queue of this one (it has none)
		b := dataPacket(c, s, 1000, 2000, []byte("GET /a HTTP/1.1\r\n\r\n"), partial)
		if !partial && !checksumOK(b) {
			t.Fatal("test packet: bad checksum")
		}
		b[len(b)-5] ^= 0x20 // a bit flipped in the payload
		np := &nfq.Packet{Data: b, CsumNotReady: partial, CsumNotVerified: !partial}
		d := (&packetHandler{g: g}).handle(np)
		if partial {
			if d != nfq.AcceptModified || len(tr.taken[splice.C2S]) != 1 {
				t.Errorf("CHECKSUM_PARTIAL segment: %v, %d taken over; want its ACK delivered and its payload taken over", d, len(tr.taken[splice.C2S]))
			}
			continue
		}
		if len(tr.taken[splice.C2S]) != 0 {
			t.Errorf("a segment with a wrong checksum was taken over (its copy leaves with a valid checksum at the release)")
		}
		if d != nfq.Drop {
			valid := d == nfq.AcceptModified && checksumOK(np.Data)
			t.Errorf("a segment with a wrong checksum: %v (delivered with a valid checksum: %v), want drop", d, valid)
		}
	}
}

// TestReleasedAckKeepsCorruption: an unsplice releases the packets it
// held to the rebuilt sockets with their ACK raised to what the socket
// sent. A held segment whose complete checksum is wrong (its payload
// corrupted on its way) must still fail its receiver's check after the
// raise, and a correct one pass it; before, the checksum was computed
// afresh and the rebuilt socket took and acknowledged the corrupted bytes.
// A CHECKSUM_PARTIAL packet gets its full checksum.
func TestReleasedAckKeepsCorruption(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	for _, tc := range []struct {
		name             string
		partial, corrupt bool
		wantValid        bool
	}{
		{"complete", false, false, true},
		{"complete, corrupted", false, true, false},
		{"partial", true, false, true},
	} {
		b := dataPacket(c, s, 1000, 2000, []byte("GET /next HTTP/1.1\r\n\r\n"), tc.partial)
		if tc.corrupt {
			b[len(b)-3] ^= 0x01
		}
		var p splice.Packet
		if p.Parse(b) != splice.OK {
			t.Fatal("parse")
		}
		if !raiseAck(&p, 0x10000, !tc.partial) || p.TCP().Ack() != 0x10000 {
			t.Fatalf("%s: ACK not raised", tc.name)
		}
		if got := checksumOK(p.Bytes()); got != tc.wantValid {
			t.Errorf("%s: checksum valid %v after the ACK was raised, want %v", tc.name, got, tc.wantValid)
		}
		if raiseAck(&p, 0x10000, !tc.partial) {
			t.Errorf("%s: an ACK at snd raised again", tc.name)
		}
	}
}

// TestForwardDropsUnverifiedCorruption: a spliced flow's packet whose
// checksum nothing verified (NFQA_SKB_CSUM_NOTVERIFIED) and is wrong is
// dropped before the engine sees it, as its receiver would drop it:
// before, the engine learned from it (a corrupted ACK number or
// timestamp taken for the flow's) and forwarded it with the corruption
// kept. The same packet intact is forwarded, and a packet whose checksum
// the NIC verified is not summed again.
func TestForwardDropsUnverifiedCorruption(t *testing.T) {
	g := New(&config.Config{}, nil)
	g.engine = splice.NewTable()
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1000, RcvNxt: 5000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := g.engine.Add(1, &p, 0)
	if err != nil {
		t.Fatal(err)
	}
	h := &packetHandler{g: g}
	send := func(corrupt, verified bool) nfq.Decision {
		b := dataPacket(c, s, 1000, 5000, []byte("0123456789"), false)
		if corrupt {
			b[len(b)-1] ^= 0x01
		}
		return h.handle(&nfq.Packet{Data: b, CsumNotVerified: !verified})
	}
	before := e.HighestSeq(splice.C2S)
	if d := send(true, false); d != nfq.Drop {
		t.Errorf("a corrupted packet nothing verified: %v, want drop", d)
	}
	if n := g.counters.verdicts[splice.DropMalformed].Load(); n != 1 {
		t.Errorf("drop_malformed counted %d, want 1", n)
	}
	if got := e.HighestSeq(splice.C2S); got != before {
		t.Errorf("the engine learned from a corrupted packet: highest sequence %d, was %d", got, before)
	}
	if d := send(false, false); d != nfq.AcceptModified {
		t.Errorf("the intact packet: %v, want it forwarded", d)
	}
	if d := send(true, true); d != nfq.AcceptModified {
		t.Errorf("a packet the NIC verified: %v, want it forwarded without a second check", d)
	}
}
