package splice

import (
	"encoding/binary"
	"testing"

	"github.com/google/gopacket/layers"
)

// TestSegmentBeyondWindowKeepsRetransmissions: a segment that starts at
// the right edge of the window (accepted, as conntrack accepts it) but
// ends beyond it, forged or corrupted (a receiver drops it), must not
// raise the lower bound of the checks above what the receiver still
// waits for. Before, it moved sndNxt a payload past the window, and
// every later segment of the sender that ended within that payload's
// length of the acknowledged point (its next data, or the retransmission
// of a lost segment) was dropped as too old: the direction stalled for
// ever. conntrack grows the receiver's largest window by the excess
// (tcp_in_window, td_maxwin) for this reason.
func TestSegmentBeyondWindowKeepsRetransmissions(t *testing.T) {
	const win = 1 << 20 // a window above minWindow, as window scaling gives
	f := newFixture(t, false, false, func(p *Params) {
		p.Client.RcvWnd, p.Server.SndWnd = win, win
	})
	forged := f.c2s(1000+win, 0xfffffff0, FlagACK)
	forged.payload = make([]byte, 1460)
	if v := f.run(t, forged.bytes(), C2S, true); v != Forward {
		t.Fatalf("segment at the window's edge: %v, want forward (as before)", v)
	}
	for _, n := range []int{1, 100, 1448} {
		s := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
		s.payload = make([]byte, n)
		if v := f.run(t, s.bytes(), C2S, true); v != Forward {
			t.Errorf("the client's next %d bytes at the acknowledged point: %v, want forward", n, v)
		}
	}
}

// TestForgedTSvalBeforeFirstPacket: the engine learns a direction's
// timestamp offset from the first packet that passes its checks. A
// packet without the ACK flag needed only a sequence number in a window
// of about maxWin+66000 (a receiver in a synchronized state drops it
// unread, RFC 9293 3.10.7.4). A forged one, before the sender's first
// packet after the splice, with a TSval about 2^31-2^28 ahead of the
// sender's clock, set an offset that put every later real TSval behind
// the receiver's TS.Recent: PAWS dropped them all, the direction stalled
// for ever. Such packets are now dropped, so a forger must also hit an
// acceptable acknowledgment.
func TestForgedTSvalBeforeFirstPacket(t *testing.T) {
	f := newFixture(t, false, false)
	forged := f.c2s(1000, 0, 0) // no ACK flag
	forged.opts = tsOpt(100+0x78000000, 0)
	forged.payload = []byte("x")
	if v := f.run(t, forged.bytes(), C2S, true); v != DropAck {
		t.Fatalf("a segment without ACK: %v, want %v", v, DropAck)
	}
	real := f.c2s(1000, 0xfffffff0, FlagACK)
	real.opts = tsOpt(101, 4990)
	b := real.bytes()
	if v := f.run(t, b, C2S, true); v != Forward {
		t.Fatalf("the client's real packet: %v", v)
	}
	o, _ := findOpt(decoded(t, b), layers.TCPOptionKindTimestamps)
	out := binary.BigEndian.Uint32(o.OptionData)
	// The server's TS.Recent is its old peer's clock: the gateway's
	// upstream socket, 900000 at the capture.
	if int32(out-900000) < 0 {
		t.Errorf("the client's real TSval leaves as %d, %d ticks behind the server's TS.Recent (900000): PAWS drops it", out, int32(900000-out))
	}
}

// TestRSTAtTheFINAfterItsAck: a receiver that received its peer's FIN
// (CLOSE_WAIT, LAST_ACK, CLOSING) accepts a RST one before its rcv_nxt,
// at the FIN's own sequence number, as some stacks send it (Linux:
// tcp_reset_check). The engine dropped it as before the window once the
// FIN was acknowledged: the receiver never learned of the reset, and
// the flow stayed in the table until its idle timeout. A RST there
// before any FIN stays refused.
func TestRSTAtTheFINAfterItsAck(t *testing.T) {
	f := newFixture(t, false, false)
	if v := f.run(t, f.c2s(999, 0xfffffff0, FlagRST).bytes(), C2S, true); v != DropRST {
		t.Fatalf("a RST before the window, no FIN sent: %v, want %v", v, DropRST)
	}
	fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
	fin.payload = []byte("bye")
	if v := f.run(t, fin.bytes(), C2S, true); v != Forward {
		t.Fatalf("the client's FIN: %v", v)
	}
	if v := f.run(t, f.s2c(0xffffff00, 0x7ffffff0+4, FlagACK).bytes(), S2C, true); v != Forward {
		t.Fatalf("the server's ACK of the FIN: %v", v)
	}
	if v := f.run(t, f.c2s(1003, 0, FlagRST).bytes(), C2S, true); v != Forward {
		t.Fatalf("a RST at the FIN's sequence number after the server acknowledged it: %v, want forward", v)
	}
	if !f.e.Snapshot().Finished() {
		t.Error("the flow did not end with a RST its receiver accepts")
	}
}

// TestRSTAtAForgedFIN: a forged FIN that passed the checks (a sequence
// number in the window, an acceptable ACK) records a FIN at a place the
// attacker chose, and the real stream goes on past it. A RST there is
// not one a receiver accepts (its rcv_nxt lies elsewhere) and must not
// end the flow: else after one forged FIN a second forged packet, at a
// number the attacker knows, would take the flow out of the table.
func TestRSTAtAForgedFIN(t *testing.T) {
	f := newFixture(t, false, false)
	if v := f.run(t, f.c2s(1000+30000, 0xfffffff0, FlagACK|FlagFIN).bytes(), C2S, true); v != Forward {
		t.Fatalf("the forged FIN in the window: %v, want forward (as conntrack would)", v)
	}
	for seq := uint32(1000); seq < 41000; seq += 1000 {
		d := f.c2s(seq, 0xfffffff0, FlagACK)
		d.payload = make([]byte, 1000)
		if v := f.run(t, d.bytes(), C2S, true); v != Forward {
			t.Fatalf("the client's data at %d: %v", seq, v)
		}
		if v := f.run(t, f.s2c(0xffffff00, 0x7ffffff0-1000+seq+1000, FlagACK).bytes(), S2C, true); v != Forward {
			t.Fatalf("the server's ACK of %d: %v", seq+1000, v)
		}
	}
	f.run(t, f.c2s(1000+30000, 0, FlagRST).bytes(), C2S, true)
	if f.e.Snapshot().Finished() {
		t.Error("a RST at a forged FIN's sequence number, behind the stream, ended the flow")
	}
}

// TestFINBehindTheAcknowledgedIsNoFIN: a FIN that ends at or before
// what its receiver acknowledged is dropped unread by the receiver
// (tcp_data_queue: the bytes up to there are in; the FIN is taken only
// in order), and no FIN was seen there before: it is forged (a sequence
// number up to a window behind and an acceptable ACK pass the checks).
// The engine took it for the sender's FIN, and the receiver's next ACK
// acknowledged it at once: one such packet each way and the flow counted
// as finished while both ends went on, and it was taken out of the
// table (every later packet dropped, both ends stalled). The FIN that
// really ends the stream still counts.
func TestFINBehindTheAcknowledgedIsNoFIN(t *testing.T) {
	f := newFixture(t, false, false)
	srv0 := uint32(0xffffff00) // the server's sequence number at the splice
	cli := f.c2s(1000, sa(0), FlagACK)
	cli.payload = make([]byte, 0x300)
	srv := f.s2c(srv0, 0x7ffffff0+0x300, FlagACK)
	srv.payload = make([]byte, 0x300)
	for _, p := range []struct {
		s seg
		d Dir
	}{{cli, C2S}, {srv, S2C}, {f.c2s(1000+0x300, sa(0x300), FlagACK), C2S}} {
		if v := f.run(t, p.s.bytes(), p.d, true); v != Forward {
			t.Fatalf("%v: %v", p.d, v)
		}
	}
	// Forged FINs behind what either receiver acknowledged, each way,
	// one ending exactly there, and the ACKs that followed.
	f.run(t, f.c2s(1000+0x100, sa(0x300), FlagACK|FlagFIN).bytes(), C2S, true)
	f.run(t, f.s2c(srv0+0x2ff, 0x7ffffff0+0x300, FlagACK|FlagFIN).bytes(), S2C, true)
	f.run(t, f.c2s(1000+0x300, sa(0x300), FlagACK).bytes(), C2S, true)
	f.run(t, f.s2c(srv0+0x300, 0x7ffffff0+0x300, FlagACK).bytes(), S2C, true)
	snap := f.e.Snapshot()
	if snap.FINSeen(C2S) || snap.FINSeen(S2C) || snap.Finished() {
		t.Fatalf("after forged FINs behind the acknowledged: FIN seen c2s %v s2c %v, finished %v; want no FIN",
			snap.FINSeen(C2S), snap.FINSeen(S2C), snap.Finished())
	}
	// The real ones.
	f.run(t, f.c2s(1000+0x300, sa(0x300), FlagACK|FlagFIN).bytes(), C2S, true)
	f.run(t, f.s2c(srv0+0x300, 0x7ffffff0+0x301, FlagACK|FlagFIN).bytes(), S2C, true)
	f.run(t, f.c2s(1000+0x301, sa(0x301), FlagACK).bytes(), C2S, true)
	if !f.e.Snapshot().Finished() {
		t.Error("both real FINs sent and acknowledged: the flow did not finish")
	}
}

// TestInexactRSTChangesNothing: a RST in the window but not at the
// receiver's rcv_nxt draws a challenge ACK and is otherwise ignored
// (RFC 5961 3.2, Linux's tcp_validate_incoming): the receiver takes
// nothing from it, neither its payload, its FIN, its ACK, its window nor
// its timestamps. A RST needs no ACK to pass the checks, only a
// sequence number in the window, so a blind attacker hits one with odds
// of the window over 2^32. The engine tracked it as any segment: a
// payload (or a FIN) raised sndNxt to a number the attacker chose, and a
// second RST there ended the flow, taking it out of the table while both
// ends went on (a pair of forged RSTs per guess: a thousand pairs for a
// 4 MiB window, where RFC 5961 makes it 2^31 guesses); its window raised
// the other direction's largest window to 1 GiB (the checks' bound); its
// TSval, before the sender's first packet, set the timestamp offset, so
// that PAWS dropped every real packet after it.
func TestInexactRSTChangesNothing(t *testing.T) {
	forged := []struct {
		name string
		seg  func(f *fixture) seg
	}{
		{"payload", func(f *fixture) seg {
			s := f.c2s(1000+30000, 0, FlagRST)
			s.payload = make([]byte, 1000)
			return s
		}},
		{"FIN", func(f *fixture) seg { return f.c2s(1000+30000, 0, FlagRST|FlagFIN) }},
		{"ACK", func(f *fixture) seg { return f.c2s(1000+30000, sa(100), FlagRST|FlagACK) }},
		{"window", func(f *fixture) seg {
			s := f.c2s(1000+30000, 0, FlagRST)
			s.win = 0xffff
			return s
		}},
		{"timestamps", func(f *fixture) seg {
			s := f.c2s(1000+30000, 0, FlagRST)
			s.opts = tsOpt(100+0x78000000, 0)
			return s
		}},
	}
	for _, c := range forged {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false, false)
			data := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			data.payload = make([]byte, 100)
			if v := f.run(t, data.bytes(), S2C, true); v != Forward {
				t.Fatalf("the server's data: %v", v)
			}
			snap := f.e.Snapshot()
			before := snap.State()
			s := c.seg(f)
			if v := f.run(t, s.bytes(), C2S, true); v != Forward {
				t.Fatalf("a RST in the window: %v, want forward (its receiver answers it)", v)
			}
			snap = f.e.Snapshot()
			after := snap.State()
			after.LastSeen = before.LastSeen
			if after != before {
				t.Errorf("a RST in the window, not at rcv_nxt, changed the flow's state:\n%+v\n%+v", before, after)
			}
			// The second RST of the pair, at the end of the first.
			f.run(t, f.c2s(uint32(Seq(s.seq).Add(uint32(len(s.payload))+uint32(s.flags&FlagFIN))), 0, FlagRST).bytes(), C2S, true)
			if f.e.Snapshot().Finished() {
				t.Error("a RST at the end of a forged RST ended the flow")
			}
			real := f.c2s(1000, 0xfffffff0, FlagACK)
			real.opts = tsOpt(101, 4990)
			b := real.bytes()
			if v := f.run(t, b, C2S, true); v != Forward {
				t.Fatalf("the client's real packet: %v", v)
			}
			o, _ := findOpt(decoded(t, b), layers.TCPOptionKindTimestamps)
			if out := binary.BigEndian.Uint32(o.OptionData); int32(out-900000) < 0 {
				t.Errorf("the client's real TSval leaves as %d, behind the server's TS.Recent (900000): PAWS drops it", out)
			}
		})
	}
}

// TestWindowGrowthCapped: a segment that starts at the window's right
// edge and ends beyond it grows the receiver's largest window by the
// excess (TestSegmentBeyondWindowKeepsRetransmissions). Nothing bounded
// the growth: an attacker who sees the flow (it needs an acceptable ACK)
// sent segments of 64 KB at the edge, each one widening the window by
// its length, up to 2^31-1, where sequence arithmetic turns over: the
// lower bound of acceptable ACKs (the acknowledged point less the
// largest window) lay just ahead of the acknowledged point, and every
// ACK of new data was dropped as far too old, so the direction stalled
// (25,000 segments from a 512 MiB window, 33,000 from 64 KB). No
// receiver advertises more than 65535 << 14: growth stops there, and a
// segment's end beyond it raises nothing.
func TestWindowGrowthCapped(t *testing.T) {
	f := newFixture(t, false, false, func(p *Params) {
		p.Client.SndWscale, p.Client.RcvWscale, p.Server.SndWscale, p.Server.RcvWscale = 14, 14, 14, 14
		p.Client.RcvWnd, p.Server.SndWnd = 1<<29, 1<<29
	})
	forged := f.c2s(0, 0xfffffff0, FlagACK)
	forged.payload = make([]byte, 65000)
	tmpl := forged.bytes()
	b := make([]byte, len(tmpl))
	var p Packet
	for i := 0; ; i++ {
		snap := f.e.Snapshot()
		s := snap.State().Dirs[C2S]
		n := min(65000, 1<<31-1-int(s.MaxWin))
		if n <= 0 || i == 30000 {
			break
		}
		copy(b, tmpl)
		// At the right edge, its IP length cut to n bytes of payload;
		// its checksum is not looked at.
		binary.BigEndian.PutUint32(b[20+TCPSeqOffset:], uint32(s.AckSeen.Add(s.MaxWin)))
		binary.BigEndian.PutUint16(b[IPv4TotalLenOffset:], uint16(20+20+n))
		if p.Parse(b) != OK {
			t.Fatal("parse")
		}
		if v := f.e.Process(&p, C2S, 1, true); v != Forward {
			t.Fatalf("forged segment %d at the window's edge (largest window %d): %v, want forward", i, s.MaxWin, v)
		}
	}
	snap := f.e.Snapshot()
	if w := snap.State().Dirs[C2S].MaxWin; w > 0xffff<<14 {
		t.Errorf("the server's largest window grew to %d, beyond any TCP window", w)
	}
	real := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
	real.payload = make([]byte, 1448)
	if v := f.run(t, real.bytes(), C2S, true); v != Forward {
		t.Fatalf("the client's next data at the acknowledged point: %v, want forward", v)
	}
	if v := f.run(t, f.s2c(0xffffff00, 0x7ffffff0+1448, FlagACK).bytes(), S2C, true); v != Forward {
		t.Errorf("the server's ACK of it: %v, want forward", v)
	}
}
