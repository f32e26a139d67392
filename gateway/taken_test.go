package gateway

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"spliced/config"
	"spliced/nfq"
	"spliced/splice"
)

// tsDataPacket is an IPv4 data segment with the timestamps option.
func tsDataPacket(src, dst netip.AddrPort, seq, ack, tsVal, tsEcr uint32, payload []byte) []byte {
	b := splice.AppendBareSegment(nil, splice.KeyFrom(src, dst), splice.Seq(seq), splice.FlagACK|splice.FlagPSH, 64)
	opts := []byte{splice.OptNOP, splice.OptNOP, splice.OptTimestamps, 10, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(opts[4:], tsVal)
	binary.BigEndian.PutUint32(opts[8:], tsEcr)
	b = append(append(b, opts...), payload...)
	b[splice.IPv4MinHeaderLen+splice.TCPDataOffOffset] = (splice.TCPMinHeaderLen + 12) / 4 << 4
	binary.BigEndian.PutUint16(b[splice.IPv4TotalLenOffset:], uint16(len(b)))
	splice.IPv4(b).UpdateChecksum()
	var p splice.Packet
	p.Parse(b)
	t := p.TCP()
	t.SetAck(splice.Seq(ack))
	t.SetWindow(1000)
	t.SetChecksum(0)
	t.SetChecksum(splice.TCPChecksum(p.Src(), p.Dst(), p.Segment()))
	return b
}

// takenFixture is a splice being completed: both legs with timestamps,
// the client's leg sent up to 5000 and received up to 1000, the
// server's the other way round; and a gateway that releases taken-over
// payload through an injector that sends nothing.
func takenFixture(t *testing.T) (*Gateway, *transition, splice.Params, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	g := New(&config.Config{}, nil)
	g.engine = splice.NewTable()
	g.queues = &nfq.Set{}
	g.inject = &injector{fd4: -1, fd6: -1}
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			MaxWnd: 64000, MSS: 1448, Timestamps: true, TSval: 700},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1000, RcvNxt: 5000, SndWnd: 64000, RcvWnd: 64000,
			MaxWnd: 64000, MSS: 1448, Timestamps: true, TSval: 900},
	}
	tr := newTransition(k, 0, phaseDraining, nil)
	return g, tr, p, c, s
}

// take hands a packet to a draining transition, as the queue's reader
// does.
func take(t *testing.T, g *Gateway, tr *transition, b []byte) {
	t.Helper()
	var p splice.Packet
	if p.Parse(b) != splice.OK {
		t.Fatal("parse")
	}
	tr.mu.Lock()
	d := tr.drain(g, &p, &nfq.Packet{Data: b}, p.KeyOf())
	tr.mu.Unlock()
	if d != nfq.AcceptModified {
		t.Fatalf("a data segment while draining: %v, want its ACK information to the socket", d)
	}
}

// TestTakenOverForgedAck: payload that arrives while a splice drains is
// taken over whatever the socket makes of the segment, and released
// through the engine with the sender's latest acknowledgment (freshen).
// A forged segment with an acknowledgment the socket refused (RFC 5961:
// far below what it sent) had it replaced by a valid one, so a blind
// attacker needed only a sequence number in the window. Released first,
// it taught the engine its timestamp clock: a TSval far ahead of the
// client's put every later real segment behind the server's TS.Recent,
// and PAWS dropped them all (the direction stalled for good), and its
// payload reached the server. It must be dropped, as the socket dropped
// it.
func TestTakenOverForgedAck(t *testing.T) {
	g, tr, p, c, s := takenFixture(t)
	forgedAck := uint32(splice.Seq(5000).Sub(1_000_000)) // far below what the client's socket sent
	take(t, g, tr, tsDataPacket(c, s, 1000, forgedAck, 0x70000000, 0, []byte("evil")))
	e, err := g.engine.Add(1, &p, 1)
	if err != nil {
		t.Fatal(err)
	}
	tr.phase = phaseFrozen
	g.release(tr, e, &p)
	info := e.Snapshot().Info(splice.C2S)
	if info.TSLearned || info.HighestSeq != 1000 {
		t.Errorf("a forged segment taken over while draining went through the engine: highest sequence %d (want 1000), clock learned %v (TSval %#x)",
			info.HighestSeq, info.TSLearned, info.TSval)
	}
	if n := g.counters.verdicts[splice.Forward].Load(); n != 0 {
		t.Errorf("%d taken-over segments forwarded, want 0", n)
	}
}

// TestTakenOverOldAckFreshened: a segment taken over early in a long
// drain acknowledges much less than the gateway's socket sent by the
// capture (more than the client's window: the drain wrote 200 KB), yet
// the socket accepted it. It goes on, with the latest acknowledgment,
// and so does one with a recent acknowledgment.
func TestTakenOverOldAckFreshened(t *testing.T) {
	g, tr, p, c, s := takenFixture(t)
	tr.outq0[splice.C2S], tr.written[splice.C2S] = 3000, 200_000
	early := uint32(splice.Seq(5000).Sub(150_000))
	take(t, g, tr, tsDataPacket(c, s, 1000, early, 600, 0, []byte("early")))
	take(t, g, tr, tsDataPacket(c, s, 1005, 5000, 601, 0, []byte("late")))
	e, err := g.engine.Add(1, &p, 1)
	if err != nil {
		t.Fatal(err)
	}
	tr.phase = phaseFrozen
	g.release(tr, e, &p)
	if info := e.Snapshot().Info(splice.C2S); !info.TSLearned || info.HighestSeq != 1009 {
		t.Errorf("after the client's taken-over segments: highest sequence %d (want 1009), clock learned %v", info.HighestSeq, info.TSLearned)
	}
	if n := g.counters.verdicts[splice.Forward].Load(); n != 2 {
		t.Errorf("%d taken-over segments forwarded, want 2", n)
	}
	// The floor: the socket's snd_una when the splice began (5000 less
	// the 203,000 bytes sent or queued since) less the client's largest
	// window.
	if got, want := tr.ackFloor(splice.C2S, &p.Client), splice.Seq(5000).Sub(203_000+64000); got != want {
		t.Errorf("floor %d, want %d", got, want)
	}
}
