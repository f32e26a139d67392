package splice

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
)

// offsets of the fixture (see newFixture)
const (
	dC2S = uint32(0x7ffffff0 - 1000)       // Server.SndNxt - Client.RcvNxt
	dS2C = uint32(0xfffffff0 - 0xffffff00) // Client.SndNxt - Server.RcvNxt
)

// sa is a sequence number of the gateway's client-side send space, which
// starts just before the wrap.
func sa(off uint32) uint32 { return uint32(0xfffffff0) + off }

func TestRewriteSeqAckPorts(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, nat := range []bool{false, true} {
			t.Run(fmt.Sprintf("v6=%v/nat=%v", v6, nat), func(t *testing.T) {
				f := newFixture(t, v6, nat)
				// Client data: seq at the client connection's rcv_nxt, acking
				// everything the gateway sent it.
				s := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
				s.payload = bytes.Repeat([]byte("a"), 100)
				b := s.bytes()
				if v := f.run(t, b, C2S, true); v != Forward {
					t.Fatalf("verdict %v", v)
				}
				tcp := decoded(t, b)
				if tcp.Seq != 0x7ffffff0 || tcp.Ack != 0xffffff00 {
					t.Errorf("c2s seq/ack = %#x/%#x, want %#x/%#x", tcp.Seq, tcp.Ack, 0x7ffffff0, 0xffffff00)
				}
				if tcp.SrcPort != layers.TCPPort(f.up.Port()) || tcp.DstPort != 80 {
					t.Errorf("c2s ports %d->%d, want %d->80", tcp.SrcPort, tcp.DstPort, f.up.Port())
				}
				checkAddrs(t, b, f.up.Addr(), f.s.Addr())

				// Server data crossing the wrap, acking the client's 100 bytes.
				s = f.s2c(0xffffff00, 0x7ffffff0+100, FlagACK)
				s.payload = bytes.Repeat([]byte("b"), 0x200)
				b = s.bytes()
				if v := f.run(t, b, S2C, true); v != Forward {
					t.Fatalf("verdict %v", v)
				}
				tcp = decoded(t, b)
				if tcp.Seq != 0xfffffff0 || tcp.Ack != 1100 {
					t.Errorf("s2c seq/ack = %#x/%d, want 0xfffffff0/1100", tcp.Seq, tcp.Ack)
				}
				if tcp.SrcPort != 80 || tcp.DstPort != layers.TCPPort(f.c.Port()) {
					t.Errorf("s2c ports %d->%d", tcp.SrcPort, tcp.DstPort)
				}
				checkAddrs(t, b, f.s.Addr(), f.c.Addr())
				info := f.e.Snapshot().Info(S2C)
				if info.HighestSeq != Seq(0xffffff00).Add(0x200) {
					t.Errorf("s2c highest seq %#x", info.HighestSeq)
				}
				if f.e.Snapshot().Info(C2S).HighestAck != 1100 {
					t.Errorf("c2s highest ack %d", f.e.Snapshot().Info(C2S).HighestAck)
				}
			})
		}
	}
}

func checkAddrs(t *testing.T, b []byte, src, dst netip.Addr) {
	t.Helper()
	var p Packet
	p.Parse(b)
	gs, _ := netip.AddrFromSlice(p.Src())
	gd, _ := netip.AddrFromSlice(p.Dst())
	if gs != src || gd != dst {
		t.Errorf("addresses %v -> %v, want %v -> %v", gs, gd, src, dst)
	}
}

func TestRewriteSACK(t *testing.T) {
	cases := []struct {
		name   string
		ack    uint32
		blocks []uint32
	}{
		{"plain", 0xfffffff0, []uint32{sa(1000), sa(2000)}},
		{"around the wrap", 0xfffffff0, []uint32{0x10, 0x100, 0xfffffffa, 0x8}},
		{"D-SACK below ack", sa(0x100), []uint32{0xfffffff0, sa(0x10), sa(0x200), sa(0x300)}},
		{"four blocks", 0xfffffff0, []uint32{1, 2, 3, 4, 5, 6, 7, 8}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false, false)
			// The server has sent enough for these acks to be valid.
			srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			srv.payload = make([]byte, 0x400)
			f.run(t, srv.bytes(), S2C, true)

			s := f.c2s(1000, c.ack, FlagACK)
			s.opts = sackOpt(c.blocks...)
			if len(c.blocks) < 8 { // four blocks leave no room for timestamps
				s.opts = append(tsOpt(1, 2), s.opts...)
			}
			b := s.bytes()
			if v := f.run(t, b, C2S, true); v != Forward {
				t.Fatalf("verdict %v", v)
			}
			tcp := decoded(t, b)
			o, ok := findOpt(tcp, layers.TCPOptionKindSACK)
			if !ok || len(o.OptionData) != 4*len(c.blocks) {
				t.Fatalf("SACK option missing or resized: %+v", tcp.Options)
			}
			for i, want := range c.blocks {
				if got := binary.BigEndian.Uint32(o.OptionData[4*i:]); got != want-dS2C {
					t.Errorf("block edge %d = %#x, want %#x", i, got, want-dS2C)
				}
			}
		})
	}
}

func TestRewriteWindowScale(t *testing.T) {
	cases := []struct {
		name            string
		clientWS, srvWS uint8 // shifts of the client's and the server's windows
		gwToC, gwToS    uint8 // shifts the gateway advertised on each leg
		field           uint16
		dir             Dir
		want            uint16
		// The window the client offered the gateway before the splice
		// (0: the fixture's, far above a unit of 2^14).
		clientWnd uint32
	}{
		{"7 to 14 rounds down", 7, 7, 7, 14, 500, C2S, 500 << 7 >> 14, 0},
		// The client offered 16 KiB or more before: it will again.
		{"7 to 14 below a unit is 0", 7, 7, 7, 14, 100, C2S, 0, 0},
		// The client never offered a unit: 0 would stop the flow.
		{"7 to 14 never 0 from a small buffer", 7, 7, 7, 14, 100, C2S, 1, 100 << 7},
		{"14 to 0 clamps", 7, 14, 0, 7, 500, S2C, 0xffff, 0},
		{"0 to 0 unchanged", 0, 0, 0, 0, 1234, C2S, 1234, 0},
		{"zero stays zero", 2, 2, 2, 9, 0, C2S, 0, 0},
		{"2 to 9", 2, 9, 9, 2, 40000, S2C, 40000 << 9 >> 9, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false, false, func(p *Params) {
				p.Client.SndWscale, p.Client.RcvWscale = c.clientWS, c.gwToC
				p.Server.SndWscale, p.Server.RcvWscale = c.srvWS, c.gwToS
				if c.clientWnd != 0 {
					p.Client.SndWnd = c.clientWnd
				}
			})
			var s seg
			if c.dir == C2S {
				s = f.c2s(1000, 0xfffffff0, FlagACK)
			} else {
				s = f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			}
			s.win = c.field
			b := s.bytes()
			if v := f.run(t, b, c.dir, true); v != Forward {
				t.Fatalf("verdict %v", v)
			}
			if got := uint16(decoded(t, b).Window); got != c.want {
				t.Errorf("window %d, want %d", got, c.want)
			}
		})
	}
}

// TestRewriteWindowUnitLearned: a sender whose window was below a unit
// of the output shift at the splice gets 1 for a window below a unit
// until it offers a whole unit, and 0 from then on.
func TestRewriteWindowUnitLearned(t *testing.T) {
	f := newFixture(t, false, false, func(p *Params) {
		p.Client.SndWscale, p.Client.RcvWscale = 7, 7
		p.Server.SndWscale, p.Server.RcvWscale = 7, 14
		p.Client.SndWnd = 100 << 7
	})
	for i, c := range []struct{ field, want uint16 }{{100, 1}, {200, 200 << 7 >> 14}, {100, 0}, {0, 0}, {300, 300 << 7 >> 14}, {100, 0}} {
		s := f.c2s(1000, 0xfffffff0, FlagACK)
		s.win = c.field
		b := s.bytes()
		if v := f.run(t, b, C2S, true); v != Forward {
			t.Fatalf("packet %d: verdict %v", i, v)
		}
		if got := uint16(decoded(t, b).Window); got != c.want {
			t.Errorf("packet %d, window field %d: %d, want %d", i, c.field, got, c.want)
		}
	}
}

func TestRewriteTimestamps(t *testing.T) {
	f := newFixture(t, false, false)
	ts := func(b []byte) (uint32, uint32) {
		o, ok := findOpt(decoded(t, b), layers.TCPOptionKindTimestamps)
		if !ok {
			t.Fatal("timestamps option missing")
		}
		return binary.BigEndian.Uint32(o.OptionData), binary.BigEndian.Uint32(o.OptionData[4:])
	}
	step := func(s seg, d Dir, val, ecr, wantVal, wantEcr uint32) {
		t.Helper()
		s.opts = tsOpt(val, ecr)
		b := s.bytes()
		if v := f.run(t, b, d, true); v != Forward {
			t.Fatalf("verdict %v", v)
		}
		if gv, ge := ts(b); gv != wantVal || ge != wantEcr {
			t.Errorf("%v TS %d/%d -> %d/%d, want %d/%d", d, val, ecr, gv, ge, wantVal, wantEcr)
		}
	}
	// First client packet: TSval continues the server leg's clock
	// (900000) plus the PAWS jump, which here puts it 2^30 ahead of the
	// client's own clock; TSecr echoes the gateway's old socket and cannot
	// be mapped yet: 0.
	const j = 1 << 30
	step(f.c2s(1000, 0xfffffff0, FlagACK), C2S, 100, 4990, j+100, 0)
	// First server packet: continues the client leg's clock (5000) plus
	// the jump; its echo of 900000 is the old socket's clock: 0.
	step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7000, 900000, j+7000, 0)
	// Both learned: echoes of jumped values map back; offsets stay.
	step(f.c2s(1000, 0xfffffff0, FlagACK), C2S, 110, j+7000, j+110, 7000)
	step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7005, j+110, j+7005, 110)
	// A late echo of the old clock still maps to nothing.
	step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7006, 900001, j+7006, 0)
	info := f.e.Snapshot().Info(C2S)
	if !info.TSLearned || info.TSval != 110 || info.TSecr != j+7000 {
		t.Errorf("tracked c2s timestamps %+v", info)
	}
}

// TestPAWSJump: the jump is always one a receiver accepts (forward, less
// than 2^31 ticks), and it leaves the sender's raw TSvals at least 2^30
// ticks behind the receiver's TS.Recent whenever one jump can.
func TestPAWSJump(t *testing.T) {
	behind := 0
	const n = 1 << 16
	for i := range n {
		cont := uint32(i) * (1<<32/n + 7) // a spread over the whole space
		j := pawsJump(cont)
		if j > maxPAWSJump {
			t.Fatalf("cont %d: jump %d is more than a receiver accepts", cont, j)
		}
		// The output clock is the raw clock plus cont+j: a raw TSval lies
		// that far behind what the receiver last saw.
		d := int32(cont + j)
		switch {
		case int32(cont) >= pawsTarget:
			if j != 0 || d != int32(cont) {
				t.Fatalf("cont %d already far ahead: jump %d", cont, j)
			}
		case int32(cont) >= pawsTarget-maxPAWSJump:
			if d != pawsTarget {
				t.Fatalf("cont %d: raw TSvals %d behind, want %d", cont, d, pawsTarget)
			}
		default:
			if j != maxPAWSJump {
				t.Fatalf("cont %d: jump %d, want the largest", cont, j)
			}
		}
		if d >= 2 {
			behind++
		}
	}
	// Only the band the jump cannot reach leaves raw TSvals ahead.
	if frac := float64(behind) / n; frac < 0.93 {
		t.Errorf("raw TSvals fail PAWS for only %.1f%% of offsets", 100*frac)
	}
}

// TestRewriteOneLegOptions: options the receiving leg never negotiated
// become NOPs; everything else stays byte-identical.
func TestRewriteOneLegOptions(t *testing.T) {
	cases := []struct {
		name     string
		noTS     bool
		noSACK   bool
		wantTS   bool
		wantSACK bool
	}{
		{"server without timestamps", true, false, false, true},
		{"server without SACK", false, true, true, false},
		{"server with both", false, false, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false, false, func(p *Params) {
				p.Server.Timestamps, p.Server.SACK = !c.noTS, !c.noSACK
			})
			srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			srv.payload = make([]byte, 100)
			f.run(t, srv.bytes(), S2C, true)

			s := f.c2s(1000, 0xfffffff0, FlagACK)
			unknown := []byte{30, 6, 1, 2, 3, 4} // an option the engine does not know
			s.opts = append(append(append(tsOpt(1, 2), sackOpt(sa(10), sa(20))...), unknown...), OptNOP, OptNOP)
			in := s.bytes()
			b := append([]byte(nil), in...)
			if v := f.run(t, b, C2S, true); v != Forward {
				t.Fatalf("verdict %v", v)
			}
			tcp := decoded(t, b)
			_, hasTS := findOpt(tcp, layers.TCPOptionKindTimestamps)
			_, hasSACK := findOpt(tcp, layers.TCPOptionKindSACK)
			if hasTS != c.wantTS || hasSACK != c.wantSACK {
				t.Errorf("TS present %v (want %v), SACK present %v (want %v)", hasTS, c.wantTS, hasSACK, c.wantSACK)
			}
			// The unknown option sits at the same place, unchanged.
			off := 20 + 20 + len(tsOpt(1, 2)) + len(sackOpt(0, 0))
			if !bytes.Equal(b[off:off+len(unknown)], unknown) {
				t.Errorf("unknown option changed: % x", b[off:off+len(unknown)])
			}
			if len(b) != len(in) {
				t.Errorf("packet length changed %d -> %d", len(in), len(b))
			}
		})
	}
}

// TestRewriteChecksumPaths: a CHECKSUM_PARTIAL packet (GSO from NFQUEUE)
// gets a full checksum, a complete one an incremental update; both are
// valid, with IPv4 options and an IPv6 hop-by-hop header too.
func TestRewriteChecksumPaths(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, partial := range []bool{false, true} {
			t.Run(fmt.Sprintf("v6=%v/partial=%v", v6, partial), func(t *testing.T) {
				f := newFixture(t, v6, true)
				s := f.c2s(1000, 0xfffffff0, FlagACK)
				s.payload = make([]byte, 65000)
				for i := range s.payload {
					s.payload[i] = byte(i * 7)
				}
				s.opts = tsOpt(1, 2)
				s.partial = partial
				if v6 {
					s.hopByHop = true
				} else {
					s.ipOpts = []byte{1, 1, 1, 0} // NOP NOP NOP EOL
				}
				b := s.bytes()
				if v := f.run(t, b, C2S, !partial); v != Forward {
					t.Fatalf("verdict %v", v)
				}
				decoded(t, b)
			})
		}
	}
}

// TestForgedSegments: each forged segment gets its verdict, and a dropped
// packet changes neither its bytes nor the flow.
func TestForgedSegments(t *testing.T) {
	cases := []struct {
		name string
		seg  func(f *fixture) seg
		dir  Dir
		want Verdict
	}{
		{"SYN", func(f *fixture) seg { return f.c2s(1000, 0, FlagSYN) }, C2S, DropSYN},
		{"SYN-ACK", func(f *fixture) seg { return f.s2c(0xffffff00, 0x7ffffff0, FlagSYN|FlagACK) }, S2C, DropSYN},
		{"RST out of window", func(f *fixture) seg { return f.c2s(1000+10_000_000, 0, FlagRST) }, C2S, DropRST},
		{"RST before the window", func(f *fixture) seg { return f.c2s(999, 0, FlagRST) }, C2S, DropRST},
		{"RST exactly in window", func(f *fixture) seg { return f.c2s(1000, 0, FlagRST) }, C2S, Forward},
		{"RST in window from the server", func(f *fixture) seg { return f.s2c(0xffffff00+10, 0, FlagRST) }, S2C, Forward},
		{"RST exactly in window from the server", func(f *fixture) seg { return f.s2c(0xffffff00, 0, FlagRST) }, S2C, Forward},
		{"data beyond the window", func(f *fixture) seg {
			s := f.c2s(1000+64000+1, 0xfffffff0, FlagACK)
			s.payload = []byte("x")
			return s
		}, C2S, DropSeq},
		{"data far behind", func(f *fixture) seg {
			s := f.c2s(uint32(Seq(1000).Sub(200000)), 0xfffffff0, FlagACK)
			s.payload = []byte("x")
			return s
		}, C2S, DropSeq},
		{"ack of unsent data", func(f *fixture) seg { return f.c2s(1000, sa(1), FlagACK) }, C2S, DropAck},
		{"server acks unsent data", func(f *fixture) seg { return f.s2c(0xffffff00, 0x7ffffff0+1, FlagACK) }, S2C, DropAck},
		{"ack far too old", func(f *fixture) seg { return f.c2s(1000, 0xfffffff0-1_000_000, FlagACK) }, C2S, DropAck},
		{"data at the window edge", func(f *fixture) seg {
			s := f.c2s(1000+64000, 0xfffffff0, FlagACK)
			s.payload = []byte("x")
			return s
		}, C2S, Forward},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false, false)
			before := f.e.Snapshot()
			in := c.seg(f).bytes()
			b := append([]byte(nil), in...)
			v := f.run(t, b, c.dir, true)
			if v != c.want {
				t.Fatalf("verdict %v, want %v", v, c.want)
			}
			if v != Forward {
				if !bytes.Equal(b, in) {
					t.Errorf("a dropped packet was modified")
				}
				if f.e.Snapshot() != before {
					t.Errorf("a dropped packet changed the flow state")
				}
				return
			}
			decoded(t, b)
			// Only a RST at exactly the receiver's rcv_nxt ends the flow;
			// any other in the window draws a challenge ACK (RFC 5961).
			exact := strings.HasPrefix(c.name, "RST exactly")
			if s := c.seg(f); s.flags&FlagRST != 0 && f.e.Snapshot().Finished() != exact {
				t.Errorf("flow finished %v after a RST at %d, want %v", f.e.Snapshot().Finished(), s.seq, exact)
			}
		})
	}
}

func TestTrackerFIN(t *testing.T) {
	f := newFixture(t, false, false)
	fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
	fin.payload = []byte("bye")
	f.run(t, fin.bytes(), C2S, true)
	if fl := f.e.Snapshot(); !fl.FINSeen(C2S) || fl.Finished() {
		t.Fatal("client FIN not tracked")
	}
	// Server acks the FIN (client seq 1000+3 bytes+FIN = 1004, in its space
	// + dC2S) and sends its own.
	f.run(t, f.s2c(0xffffff00, 1004+dC2S, FlagACK|FlagFIN).bytes(), S2C, true)
	if f.e.Snapshot().Finished() {
		t.Fatal("finished before the server's FIN was acked")
	}
	f.run(t, f.c2s(1004, sa(1), FlagACK).bytes(), C2S, true)
	if !f.e.Snapshot().Finished() {
		t.Fatal("both FINs acked, flow not finished")
	}
	fl := f.e.Snapshot()
	if !fl.Idle(1+int64(10e9), int64(10e9)) || fl.Idle(2, int64(10e9)) {
		t.Error("idle tracking wrong")
	}
	// Retransmissions of the server's FIN, already acked, well after it
	// went through: the first is dropped (no duplicate ACK to provoke a
	// reset), a second one passes (the sender evidently lost the ACK).
	later := int64(time.Second)
	for i, want := range []Verdict{DropDuplicate, Forward} {
		if v := f.runAt(t, f.s2c(0xffffff00, 1004+dC2S, FlagACK|FlagFIN).bytes(), S2C, true, later); v != want {
			t.Errorf("retransmitted FIN #%d: %v, want %v", i+1, v, want)
		}
	}
}

// TestTailLossProbeOfFIN: a repeat of a FIN that went through moments ago
// (a tail loss probe while the original is on its way) is dropped, however
// often; one after the retransmission timeout passes.
func TestTailLossProbeOfFIN(t *testing.T) {
	f := newFixture(t, false, false)
	fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
	fin.payload = []byte("bye")
	if v := f.runAt(t, fin.bytes(), C2S, true, 0); v != Forward {
		t.Fatalf("FIN: %v", v)
	}
	probe := f.c2s(1002, 0xfffffff0, FlagACK|FlagFIN) // the last byte and the FIN again
	probe.payload = []byte("e")
	for _, at := range []time.Duration{3 * time.Millisecond, 20 * time.Millisecond} {
		if v := f.runAt(t, probe.bytes(), C2S, true, int64(at)); v != DropDuplicate {
			t.Errorf("probe at %v: %v, want drop_duplicate", at, v)
		}
	}
	if v := f.runAt(t, probe.bytes(), C2S, true, int64(300*time.Millisecond)); v != Forward {
		t.Errorf("retransmission after the RTO: %v, want forward", v)
	}
	// A FIN with new data is no repeat.
	more := f.c2s(1004, 0xfffffff0, FlagACK|FlagFIN)
	more.payload = []byte("!")
	if v := f.runAt(t, more.bytes(), C2S, true, int64(4*time.Millisecond)); v != Forward {
		t.Errorf("FIN with new data: %v, want forward", v)
	}
}

// TestDuplicateFinalACK: once both FINs are acknowledged, duplicate ACKs
// of the last FIN (drawn by spurious retransmissions) are dropped for a
// short while, so the closed sender does not answer them with resets; a
// later one, answering a FIN retransmitted after a real loss, passes.
func TestDuplicateFinalACK(t *testing.T) {
	f := newFixture(t, false, false)
	ms := int64(time.Millisecond)
	steps := []struct {
		name string
		b    []byte
		d    Dir
		at   int64
		want Verdict
	}{
		{"client FIN", f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN).bytes(), C2S, 0, Forward},
		{"server FIN, acking the client's", f.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN).bytes(), S2C, 1 * ms, Forward},
		{"ACK of the server's FIN", f.c2s(1001, 0xfffffff1, FlagACK).bytes(), C2S, 2 * ms, Forward},
		{"duplicate", f.c2s(1001, 0xfffffff1, FlagACK).bytes(), C2S, 3 * ms, DropDuplicate},
		{"another duplicate", f.c2s(1001, 0xfffffff1, FlagACK).bytes(), C2S, 4 * ms, DropDuplicate},
		{"server's duplicate ACK", f.s2c(0xffffff01, 0x7ffffff1, FlagACK).bytes(), S2C, 5 * ms, DropDuplicate},
		{"a RST still passes", f.c2s(1001, 0, FlagRST).bytes(), C2S, 6 * ms, Forward},
	}
	for _, st := range steps {
		if v := f.runAt(t, st.b, st.d, true, st.at); v != st.want {
			t.Errorf("%s: %v, want %v", st.name, v, st.want)
		}
	}
	g := newFixture(t, false, false)
	g.runAt(t, g.c2s(1000, 0xfffffff0, FlagACK|FlagFIN).bytes(), C2S, true, 0)
	g.runAt(t, g.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN).bytes(), S2C, true, ms)
	g.runAt(t, g.c2s(1001, 0xfffffff1, FlagACK).bytes(), C2S, true, 2*ms)
	if v := g.runAt(t, g.c2s(1001, 0xfffffff1, FlagACK).bytes(), C2S, true, 300*ms); v != Forward {
		t.Errorf("ACK of a FIN retransmitted after the RTO: %v, want forward", v)
	}
	h := newFixture(t, false, false)
	h.runAt(t, h.c2s(1000, 0xfffffff0, FlagACK|FlagFIN).bytes(), C2S, true, 0)
	if v := h.runAt(t, h.s2c(0xffffff00, 0x7ffffff1, FlagACK).bytes(), S2C, true, ms); v != Forward {
		t.Errorf("ACK of one FIN only: %v, want forward", v)
	}
	if v := h.runAt(t, h.s2c(0xffffff00, 0x7ffffff1, FlagACK).bytes(), S2C, true, 2*ms); v != Forward {
		t.Errorf("duplicate ACK while the flow is half-closed: %v, want forward", v)
	}
}

// TestLateFinalACK: the ACK of the last FIN waits in a slow queue for
// seconds while its sender's FIN retransmissions pass (each draws a
// duplicate ACK from the receiver, now in TIME_WAIT). When the late ACK
// finishes the flow, the duplicate ACKs queued behind it are dropped: the
// sender's socket just closed and would answer each with a reset. So is a
// FIN repeat that crossed the ACK; later repeats and their ACKs pass as
// after a timely ACK (the first after the end is dropped, the next goes).
func TestLateFinalACK(t *testing.T) {
	f := newFixture(t, false, false)
	ms := int64(time.Millisecond)
	serverFIN := f.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN)
	lastACK := f.c2s(1001, 0xfffffff1, FlagACK)
	steps := []struct {
		name string
		s    seg
		d    Dir
		at   int64
		want Verdict
	}{
		{"client FIN", f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN), C2S, 0, Forward},
		{"server FIN, acking the client's", serverFIN, S2C, 1 * ms, Forward},
		{"server FIN again (its ACK is late)", serverFIN, S2C, 400 * ms, Forward},
		{"server FIN once more", serverFIN, S2C, 1200 * ms, Forward},
		{"the late ACK of the server's FIN", lastACK, C2S, 1800 * ms, Forward},
		{"duplicate ACK drawn by the first repeat", lastACK, C2S, 1801 * ms, DropDuplicate},
		{"duplicate ACK drawn by the second repeat", lastACK, C2S, 1802 * ms, DropDuplicate},
		{"a repeat that crossed the ACK", serverFIN, S2C, 1850 * ms, DropDuplicate},
		{"a repeat after the RTO, the first after the end", serverFIN, S2C, 2300 * ms, DropDuplicate},
		{"the next repeat", serverFIN, S2C, 2800 * ms, Forward},
		{"the ACK that answers it", lastACK, C2S, 2801 * ms, Forward},
	}
	for _, st := range steps {
		if v := f.runAt(t, st.s.bytes(), st.d, true, st.at); v != st.want {
			t.Errorf("%s: %v, want %v", st.name, v, st.want)
		}
	}
}

// TestPureAckDoesNotAdvanceHighestSeq: unsplice relies on the highest
// sequence sent advancing only with data or FIN; a pure ACK carries the
// sender's snd_nxt, which may cover data the gateway holds back.
func TestPureAckDoesNotAdvanceHighestSeq(t *testing.T) {
	f := newFixture(t, false, false)
	f.run(t, f.c2s(1500, 0xfffffff0, FlagACK).bytes(), C2S, true)
	if got := f.e.Snapshot().Info(C2S).HighestSeq; got != 1000 {
		t.Fatalf("highest seq %d after a pure ACK, want 1000", got)
	}
}

func TestParse(t *testing.T) {
	good := newFixtureSeg(false).bytes()
	cases := []struct {
		name string
		b    []byte
		want Status
	}{
		{"ipv4", good, OK},
		{"ipv6", newFixtureSeg(true).bytes(), OK},
		{"ipv6 hop-by-hop", func() []byte { s := newFixtureSeg(true); s.hopByHop = true; return s.bytes() }(), OK},
		{"ipv4 options", func() []byte { s := newFixtureSeg(false); s.ipOpts = []byte{1, 1, 1, 1}; return s.bytes() }(), OK},
		{"empty", nil, Malformed},
		{"truncated ip", good[:19], Malformed},
		{"truncated tcp", func() []byte {
			b := append([]byte(nil), good[:30]...)
			binary.BigEndian.PutUint16(b[2:], 30)
			return b
		}(), Malformed},
		{"total length beyond data", func() []byte {
			b := append([]byte(nil), good...)
			binary.BigEndian.PutUint16(b[2:], uint16(len(b)+1))
			return b
		}(), Malformed},
		{"tcp data offset beyond packet", func() []byte {
			b := append([]byte(nil), good...)
			b[20+12] = 0xf0
			return b
		}(), Malformed},
		{"tcp data offset below 5", func() []byte {
			b := append([]byte(nil), good...)
			b[20+12] = 0x40
			return b
		}(), Malformed},
		{"fragment", func() []byte {
			b := append([]byte(nil), good...)
			b[6] = 0x20 // MF
			return b
		}(), Unsupported},
		{"udp", func() []byte {
			b := append([]byte(nil), good...)
			b[9] = 17
			return b
		}(), Unsupported},
		{"ipv6 fragment header", func() []byte {
			b := newFixtureSeg(true).bytes()
			b[6] = 44
			return b
		}(), Unsupported},
		{"ipv6 routing header", func() []byte {
			// Routing header (43) with segments left: the fixed header's
			// destination is not the final one.
			b := newFixtureSeg(true).bytes()
			ext := []byte{6, 0, 0, 1, 0, 0, 0, 0}
			b = append(b[:40], append(ext, b[40:]...)...)
			b[6] = 43
			binary.BigEndian.PutUint16(b[4:], binary.BigEndian.Uint16(b[4:])+8)
			return b
		}(), Unsupported},
		{"ipv6 from an IPv4-mapped address", func() []byte {
			// Its key is the IPv4 flow's between the same addresses.
			s := newFixtureSeg(true)
			s.src = netip.AddrPortFrom(netip.AddrFrom16(cAddr4.Addr().As16()), cAddr4.Port())
			return s.bytes()
		}(), Unsupported},
		{"ipv6 to an IPv4-mapped address", func() []byte {
			s := newFixtureSeg(true)
			s.dst = netip.AddrPortFrom(netip.AddrFrom16(sAddr4.Addr().As16()), sAddr4.Port())
			return s.bytes()
		}(), Unsupported},
		{"ipv6 jumbo", func() []byte {
			b := newFixtureSeg(true).bytes()
			b[4], b[5] = 0, 0
			return b
		}(), Unsupported},
		{"version 5", func() []byte {
			b := append([]byte(nil), good...)
			b[0] = 0x55
			return b
		}(), Malformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var p Packet
			if got := p.Parse(c.b); got != c.want {
				t.Fatalf("Parse = %v, want %v", got, c.want)
			}
		})
	}
}

func newFixtureSeg(v6 bool) seg {
	if v6 {
		return seg{src: cAddr6, dst: sAddr6, seq: 1, flags: FlagACK, payload: []byte("hi")}
	}
	return seg{src: cAddr4, dst: sAddr4, seq: 1, flags: FlagACK, payload: []byte("hi")}
}

func TestTableBothDirections(t *testing.T) {
	f := newFixture(t, false, true)
	tab := NewTable()
	e, err := tab.Add(7, &f.p, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Add(8, &f.p, 0); err == nil {
		t.Fatal("a second flow with the same tuples was accepted")
	}
	for _, c := range []struct {
		k Key
		d Dir
	}{{KeyFrom(cAddr4, sAddr4), C2S}, {KeyFrom(sAddr4, gAddr4), S2C}} {
		got, d, ok := tab.Lookup(c.k)
		if !ok || got != e || d != c.d {
			t.Errorf("lookup %v: %v %v %v", c.k, got, d, ok)
		}
	}
	if _, _, ok := tab.Lookup(KeyFrom(sAddr4, cAddr4)); ok {
		t.Error("the reverse of a client tuple must not match (it is the gateway's own output)")
	}
	tab.Delete(e)
	if tab.Len() != 0 {
		t.Error("delete left keys")
	}
}

// TestStalePureAckSeqRaised: a pure ACK whose sequence number is further
// behind what the receiver already acknowledged than a window probe gets
// the receiver's rcv_nxt, so the receiver does not drop it as out of
// window with the acknowledgment and window it carries; data segments
// keep their sequence number.
func TestStalePureAckSeqRaised(t *testing.T) {
	f := newFixture(t, false, false)
	// The client acks 0x200 bytes of server data: the server's receiver
	// (the client) is at 0xffffff00+0x200 in the server's space.
	srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
	srv.payload = make([]byte, 0x200)
	f.run(t, srv.bytes(), S2C, true)
	cli := f.c2s(1000, sa(0x200), FlagACK)
	cli.payload = make([]byte, 0x100)
	f.run(t, cli.bytes(), C2S, true)

	// A pure ACK from the server with a stale sequence number that
	// acknowledges the client's data.
	b := f.s2c(0xffffff00+0x80, 0x7ffffff0+0x100, FlagACK).bytes()
	if v := f.run(t, b, S2C, true); v != Forward {
		t.Fatalf("verdict %v", v)
	}
	if got, want := decoded(t, b).Seq, uint32(Seq(0xffffff00).Add(0x200+dS2C)); got != want {
		t.Errorf("stale pure ACK seq %#x, want the receiver's rcv_nxt %#x", got, want)
	}
	// One that opens the window, with the same acknowledgment.
	s := f.s2c(0xffffff00+0x80, 0x7ffffff0+0x100, FlagACK)
	s.win = 900
	b = s.bytes()
	f.run(t, b, S2C, true)
	if got, want := decoded(t, b).Seq, uint32(Seq(0xffffff00).Add(0x200+dS2C)); got != want {
		t.Errorf("stale window update seq %#x, want the receiver's rcv_nxt %#x", got, want)
	}
	// A retransmission with data keeps its sequence number.
	s = f.s2c(0xffffff00+0x80, 0x7ffffff0, FlagACK)
	s.payload = make([]byte, 10)
	b = s.bytes()
	f.run(t, b, S2C, true)
	if got, want := decoded(t, b).Seq, uint32(Seq(0xffffff00+0x80).Add(dS2C)); got != want {
		t.Errorf("retransmission seq %#x, want %#x", got, want)
	}
}

// TestWindowProbeKeepsItsSequence: a window probe or keepalive (a pure
// ACK exactly one byte behind what the receiver acknowledged) keeps its
// sequence number, so the receiver answers it with its
// window. Moved into the window it would be accepted in silence, and a
// sender whose window-opening ACK was lost would probe for ever.
func TestWindowProbeKeepsItsSequence(t *testing.T) {
	for _, nat := range []bool{false, true} {
		f := newFixture(t, false, nat)
		cli := f.c2s(1000, sa(0), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.run(t, cli.bytes(), C2S, true)
		// The server acknowledges everything and closes its window.
		srv := f.s2c(0xffffff00, 0x7ffffff0+0x300, FlagACK)
		srv.win = 0
		f.run(t, srv.bytes(), S2C, true)
		// The client probes: snd_una-1, the ack and window it sent before.
		for range 3 {
			b := f.c2s(1000+0x300-1, sa(0), FlagACK).bytes()
			if v := f.run(t, b, C2S, true); v != Forward {
				t.Fatalf("nat %v: probe verdict %v", nat, v)
			}
			if got, want := decoded(t, b).Seq, uint32(Seq(1000+0x300-1).Add(dC2S)); got != want {
				t.Fatalf("nat %v: probe seq %#x, want %#x (one behind the server's rcv_nxt)", nat, got, want)
			}
		}
	}
}

// TestPureAckBeyondForwardedGoesBack: a pure ACK whose sequence number
// lies beyond the data forwarded (the sender's next request held for an
// unsplice) goes out at the end of what was forwarded. Forwarded as it
// came, its receiver would take it as the latest window update (snd_wl1),
// ignore the window updates of the socket an unsplice rebuilds at the data
// forwarded, and with a closed window stall for ever.
func TestPureAckBeyondForwardedGoesBack(t *testing.T) {
	for _, nat := range []bool{false, true} {
		f := newFixture(t, false, nat)
		cli := f.c2s(1000, sa(0), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.run(t, cli.bytes(), C2S, true)
		// 40 bytes of the client's next request were not forwarded; its
		// pure ACKs carry the sequence number after them.
		b := f.c2s(1000+0x300+40, sa(0), FlagACK).bytes()
		if v := f.run(t, b, C2S, true); v != Forward {
			t.Fatalf("nat %v: verdict %v", nat, v)
		}
		if got, want := decoded(t, b).Seq, uint32(Seq(1000+0x300).Add(dC2S)); got != want {
			t.Fatalf("nat %v: pure ACK seq %#x, want %#x (the end of the data forwarded)", nat, got, want)
		}
		// Data keeps its sequence number: it is what it is.
		data := f.c2s(1000+0x300+40, sa(0), FlagACK)
		data.payload = make([]byte, 10)
		b = data.bytes()
		f.run(t, b, C2S, true)
		if got, want := decoded(t, b).Seq, uint32(Seq(1000+0x300+40).Add(dC2S)); got != want {
			t.Fatalf("nat %v: data seq %#x, want %#x", nat, got, want)
		}
	}
}

// TestProgressClock: a direction's progress clock starts when data goes
// out while none was outstanding and moves when the receiver acknowledges
// new data; retransmissions and duplicate ACKs leave it alone, so data
// outstanding long after it is a stall.
func TestProgressClock(t *testing.T) {
	f := newFixture(t, false, false)
	progress := func() int64 { return f.e.Stats()[C2S].ProgressAt }
	if progress() != 0 {
		t.Fatalf("progress at %d after the splice at 0", progress())
	}
	data := f.c2s(1000, sa(0), FlagACK)
	data.payload = make([]byte, 100)
	f.runAt(t, data.bytes(), C2S, true, 10)
	if got := progress(); got != 10 {
		t.Fatalf("first data at 10: progress at %d", got)
	}
	if !f.e.Snapshot().Outstanding(C2S) {
		t.Fatal("data forwarded and not acknowledged is not outstanding")
	}
	more := f.c2s(1100, sa(0), FlagACK)
	more.payload = make([]byte, 100)
	f.runAt(t, more.bytes(), C2S, true, 20)
	f.runAt(t, data.bytes(), C2S, true, 30) // a retransmission
	f.runAt(t, f.s2c(0xffffff00, 0x7ffffff0, FlagACK).bytes(), S2C, true, 40)
	if got := progress(); got != 10 {
		t.Fatalf("more data, a retransmission and a duplicate ACK moved progress to %d", got)
	}
	f.runAt(t, f.s2c(0xffffff00, 0x7ffffff0+100, FlagACK).bytes(), S2C, true, 50)
	if got := progress(); got != 50 {
		t.Fatalf("an ACK of new data at 50: progress at %d", got)
	}
	f.runAt(t, f.s2c(0xffffff00, 0x7ffffff0+200, FlagACK).bytes(), S2C, true, 60)
	if f.e.Snapshot().Outstanding(C2S) {
		t.Fatal("everything acknowledged is still outstanding")
	}
	if got := f.e.Stats()[C2S].LastVerdict; got != Forward {
		t.Fatalf("last verdict %v", got)
	}
}

// TestPureAckMovedKeepsUrgentPoint: a pure ACK whose sequence number the
// engine moves (a stale one raised to the receiver's rcv_nxt, one beyond
// the data forwarded lowered to its end) keeps naming the same urgent
// byte. The urgent pointer is an offset from the sequence number: left
// as it came, it named a byte as many bytes later (earlier), which the
// receiver took out of the stream as the urgent byte (telnet's interrupt,
// FTP's abort) while the real one stayed inline. A point the receiver
// has already, or one the field cannot reach, goes with the flag: the
// data segments before the urgent byte name it again.
func TestPureAckMovedKeepsUrgentPoint(t *testing.T) {
	// urgent point of a decoded segment, in its own sequence space
	point := func(b []byte) (uint32, bool) {
		tcp := decoded(t, b)
		return tcp.Seq + uint32(tcp.Urgent), tcp.URG
	}
	for _, nat := range []bool{false, true} {
		// Raised: the client acknowledged 0x200 bytes of server data; a
		// pure ACK of the server at 0x80 moves to 0x200.
		f := newFixture(t, false, nat)
		srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
		srv.payload = make([]byte, 0x200)
		f.run(t, srv.bytes(), S2C, true)
		cli := f.c2s(1000, sa(0x200), FlagACK)
		f.run(t, cli.bytes(), C2S, true)
		for _, tc := range []struct {
			urg  uint16
			keep bool
		}{{0x200, true}, {0x181, true}, {0x180, false}, {0x100, false}} {
			s := f.s2c(0xffffff00+0x80, 0x7ffffff0, FlagACK|FlagURG)
			s.urg = tc.urg
			b := s.bytes()
			if v := f.run(t, b, S2C, true); v != Forward {
				t.Fatalf("nat %v urg %#x: verdict %v", nat, tc.urg, v)
			}
			at, urg := point(b)
			if want := uint32(Seq(0xffffff00 + 0x80 + uint32(tc.urg)).Add(dS2C)); tc.keep && (!urg || at != want) {
				t.Errorf("nat %v raised, urg %#x: urgent point %#x (URG %v), want %#x", nat, tc.urg, at, urg, want)
			}
			if tc.keep {
				continue
			}
			if tcp := decoded(t, b); tcp.URG || tcp.Urgent != 0 {
				t.Errorf("nat %v raised, urg %#x: URG %v pointer %#x for a point the receiver has, want none",
					nat, tc.urg, tcp.URG, tcp.Urgent)
			}
		}

		// Lowered: 40 bytes after the 0x300 forwarded were not; the
		// client's pure ACK at 0x300+40 moves back to 0x300.
		f = newFixture(t, false, nat)
		cli = f.c2s(1000, sa(0), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.run(t, cli.bytes(), C2S, true)
		for _, tc := range []struct {
			urg  uint16
			keep bool
		}{{10, true}, {0xffff - 40, true}, {0xffff - 39, false}} {
			s := f.c2s(1000+0x300+40, sa(0), FlagACK|FlagURG)
			s.urg = tc.urg
			b := s.bytes()
			if v := f.run(t, b, C2S, true); v != Forward {
				t.Fatalf("nat %v urg %#x: verdict %v", nat, tc.urg, v)
			}
			at, urg := point(b)
			if want := uint32(Seq(1000 + 0x300 + 40 + uint32(tc.urg)).Add(dC2S)); tc.keep && (!urg || at != want) {
				t.Errorf("nat %v lowered, urg %#x: urgent point %#x (URG %v), want %#x", nat, tc.urg, at, urg, want)
			}
			if tcp := decoded(t, b); !tc.keep && (tcp.URG || tcp.Urgent != 0) {
				t.Errorf("nat %v lowered, urg %#x: URG %v pointer %#x beyond the field's reach, want none",
					nat, tc.urg, tcp.URG, tcp.Urgent)
			}
		}
		// Data keeps its sequence number and so its pointer.
		data := f.c2s(1000+0x300, sa(0), FlagACK|FlagURG)
		data.payload, data.urg = make([]byte, 40), 7
		b := data.bytes()
		f.run(t, b, C2S, true)
		if at, urg := point(b); !urg || at != uint32(Seq(1000+0x300+7).Add(dC2S)) {
			t.Errorf("nat %v: data's urgent point %#x (URG %v)", nat, at, urg)
		}
	}
}
