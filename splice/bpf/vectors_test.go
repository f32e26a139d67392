//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	. "spliced/splice"
)

// The engine's test vectors (splice/rewrite_test.go), replayed through the
// differential harness: every packet goes through the program and the
// engine, and harness.step fails on any difference in verdict, bytes,
// mark or state. The expected verdicts are the engine's own tests' (so a
// vector still tests what it was written for); the checks of the output
// fields themselves are the engine's tests' business.

// offsets of the fixture
const (
	dC2S = uint32(0x7ffffff0 - 1000)
	dS2C = uint32(0xfffffff0 - 0xffffff00)
)

func sa(off uint32) uint32 { return uint32(0xfffffff0) + off }

const ms = int64(time.Millisecond)

// at runs a packet at the fixture's start time plus at.
func (f *fixture) at(s seg, d Dir, at int64) Verdict {
	f.t.Helper()
	v := f.step(s.bytes(), d, f.start()+at)
	if v < 0 {
		f.t.Fatal("the engine did not parse a fixture packet")
	}
	return Verdict(v)
}

// fixtureStart is when a fixture's flow is spliced (unix nanoseconds).
const fixtureStart = 1_700_000_000_000_000_000

func (f *fixture) start() int64 { return fixtureStart }

func (f *fixture) want(got, want Verdict, what string) {
	f.t.Helper()
	if got != want {
		f.t.Fatalf("%s: %v, want %v", what, got, want)
	}
}

func each(t *testing.T, fn func(t *testing.T, v6, nat bool)) {
	for _, v6 := range []bool{false, true} {
		for _, nat := range []bool{false, true} {
			t.Run(fmt.Sprintf("v6=%v/nat=%v", v6, nat), func(t *testing.T) { fn(t, v6, nat) })
		}
	}
}

func TestDiffSeqAckPorts(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		s := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
		s.payload = bytes.Repeat([]byte("a"), 100)
		f.want(f.at(s, C2S, 1), Forward, "client data")
		s = f.s2c(0xffffff00, 0x7ffffff0+100, FlagACK)
		s.payload = bytes.Repeat([]byte("b"), 0x200)
		f.want(f.at(s, S2C, 2), Forward, "server data across the wrap")
	})
}

func TestDiffSACK(t *testing.T) {
	cases := []struct {
		name   string
		ack    uint32
		blocks []uint32
	}{
		{"plain", 0xfffffff0, []uint32{sa(1000), sa(2000)}},
		{"around the wrap", 0xfffffff0, []uint32{0x10, 0x100, 0xfffffffa, 0x8}},
		{"D-SACK below ack", sa(0x100), []uint32{0xfffffff0, sa(0x10), sa(0x200), sa(0x300)}},
		{"three blocks", sa(0x100), []uint32{1, 2, 3, 4, 5, 6}},
		{"four blocks", 0xfffffff0, []uint32{1, 2, 3, 4, 5, 6, 7, 8}},
	}
	for _, c := range cases {
		each(t, func(t *testing.T, v6, nat bool) {
			f := newFixture(t, v6, nat)
			srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			srv.payload = make([]byte, 0x400)
			f.want(f.at(srv, S2C, 1), Forward, "server data")
			s := f.c2s(1000, c.ack, FlagACK)
			s.opts = sackOpt(c.blocks...)
			if len(c.blocks) < 8 {
				s.opts = append(tsOpt(1, 2), s.opts...)
			}
			f.want(f.at(s, C2S, 2), Forward, c.name)
			// The same without the NOP padding: the SACK option at an
			// odd offset, its edges in the other byte lane of the sum.
			s.opts = append([]byte{OptNOP}, sackOpt(c.blocks...)[2:]...)
			f.want(f.at(s, C2S, 3), Forward, c.name+" unaligned")
		})
	}
}

func TestDiffWindowScale(t *testing.T) {
	cases := []struct {
		name            string
		clientWS, srvWS uint8
		gwToC, gwToS    uint8
		fields          []uint16 // one packet each, in order
		dir             Dir
		clientWnd       uint32 // the client's window before the splice (0: the fixture's)
	}{
		{"7 to 14 rounds down", 7, 7, 7, 14, []uint16{500}, C2S, 0},
		{"7 to 14 below a unit is 0", 7, 7, 7, 14, []uint16{100}, C2S, 0},
		{"7 to 14 never 0 from a small buffer", 7, 7, 7, 14, []uint16{100}, C2S, 100 << 7},
		// A unit offered after the splice counts too.
		{"7 to 14 unit learned", 7, 7, 7, 14, []uint16{100, 200, 100}, C2S, 100 << 7},
		{"14 to 0 clamps", 7, 14, 0, 7, []uint16{500}, S2C, 0},
		{"0 to 0 unchanged", 0, 0, 0, 0, []uint16{1234}, C2S, 0},
		{"zero stays zero", 2, 2, 2, 9, []uint16{0}, C2S, 0},
		{"2 to 9", 2, 9, 9, 2, []uint16{40000}, S2C, 0},
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
			for i, field := range c.fields {
				var s seg
				if c.dir == C2S {
					s = f.c2s(1000, 0xfffffff0, FlagACK)
				} else {
					s = f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
				}
				s.win = field
				f.want(f.at(s, c.dir, int64(2*i+1)), Forward, fmt.Sprintf("%s, window %d", c.name, field))
				// And again: maxWin grew from the first.
				f.want(f.at(s, c.dir, int64(2*i+2)), Forward, fmt.Sprintf("%s, window %d again", c.name, field))
			}
		})
	}
}

func TestDiffTimestamps(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		step := func(s seg, d Dir, val, ecr uint32) {
			t.Helper()
			s.opts = tsOpt(val, ecr)
			f.want(f.at(s, d, 1), Forward, "timestamps")
		}
		const j = 1 << 30
		step(f.c2s(1000, 0xfffffff0, FlagACK), C2S, 100, 4990)
		step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7000, 900000)
		step(f.c2s(1000, 0xfffffff0, FlagACK), C2S, 110, j+7000)
		step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7005, j+110)
		step(f.s2c(0xffffff00, 0x7ffffff0, FlagACK), S2C, 7006, 900001)
		// Unaligned: the option right after one NOP (TSval at an odd
		// offset), and after three.
		for _, pad := range [][]byte{{OptNOP}, {OptNOP, OptNOP, OptNOP}} {
			s := f.c2s(1000, 0xfffffff0, FlagACK)
			s.opts = append(append([]byte(nil), pad...), tsOpt(120, j+7006)[2:]...)
			f.want(f.at(s, C2S, 2), Forward, "unaligned timestamps")
		}
	})
}

// TestDiffPAWSJumpOffsets: the learned offset and the jump for TS clocks
// spread over the whole space (the engine's TestPAWSJump, through the
// program's learning at the first packet).
func TestDiffPAWSJumpOffsets(t *testing.T) {
	for i := range 64 {
		tsval := uint32(i) * (1<<32/64 + 7)
		f := newFixture(t, i%2 == 1, false, func(p *Params) { p.Server.TSval = tsval * 3 })
		s := f.c2s(1000, 0xfffffff0, FlagACK)
		s.opts = tsOpt(tsval, 1)
		f.want(f.at(s, C2S, 1), Forward, "first timestamps")
		r := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
		r.opts = tsOpt(77, tsval+f.flow.State().Dirs[C2S].TSOff-1000)
		f.want(f.at(r, S2C, 2), Forward, "echo")
	}
}

func TestDiffOneLegOptions(t *testing.T) {
	cases := []struct {
		name         string
		noTS, noSACK bool
	}{
		{"server without timestamps", true, false},
		{"server without SACK", false, true},
		{"server with both", false, false},
		{"server with neither", true, true},
	}
	for _, c := range cases {
		each(t, func(t *testing.T, v6, nat bool) {
			f := newFixture(t, v6, nat, func(p *Params) {
				p.Server.Timestamps, p.Server.SACK = !c.noTS, !c.noSACK
			})
			srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			srv.payload = make([]byte, 100)
			srv.opts = tsOpt(5, 6)
			f.want(f.at(srv, S2C, 1), Forward, "server data")
			s := f.c2s(1000, 0xfffffff0, FlagACK)
			unknown := []byte{30, 6, 1, 2, 3, 4}
			s.opts = append(append(append(tsOpt(1, 2), sackOpt(sa(10), sa(20))...), unknown...), OptNOP, OptNOP)
			f.want(f.at(s, C2S, 2), Forward, c.name)
		})
	}
}

// TestDiffChecksums: IPv4 options, payload sizes odd and even. (The
// engine's test uses 65000-byte payloads; BPF_PROG_TEST_RUN takes at most
// about a page, and cannot mark a packet CHECKSUM_PARTIAL.) IPv6
// hop-by-hop and destination options headers are walked; a routing
// header is one the program passes to the engine.
func TestDiffChecksums(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		seq := uint32(1000)
		for _, n := range []int{1, 2, 3, 1399, 1400} {
			s := f.c2s(seq, 0xfffffff0, FlagACK)
			s.payload = make([]byte, n)
			for i := range s.payload {
				s.payload[i] = byte(i*7 + n)
			}
			s.opts = tsOpt(uint32(n), 2)
			if !v6 {
				s.ipOpts = []byte{1, 1, 1, 0}
			}
			f.want(f.at(s, C2S, 1), Forward, fmt.Sprintf("%d bytes", n))
			seq += uint32(n)
		}
		if v6 {
			s := f.c2s(seq, 0xfffffff0, FlagACK)
			s.hopByHop = true
			s.payload = []byte("x")
			f.want(f.at(s, C2S, 2), Forward, "hop-by-hop")
			// Hop-by-hop, then destination options of 16 bytes.
			s.hopByHop = false
			s.ext = []byte{60, 0, 1, 4, 0, 0, 0, 0, 6, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
			s.extNext = 0
			f.want(f.at(s, C2S, 3), Forward, "hop-by-hop and destination options")
			// A routing header goes to the queue untouched, where the
			// engine refuses it (Unsupported: the gateway drops it).
			s.ext = []byte{6, 0, 0, 0, 0, 0, 0, 0}
			s.extNext = 43
			if v := f.step(s.bytes(), C2S, f.start()+4); v != -1 {
				t.Fatalf("routing header: verdict %d, want passed and refused by the engine", v)
			}
			if f.passes != 1 {
				t.Fatalf("passes %d, want 1", f.passes)
			}
		}
	})
}

func TestDiffForgedSegments(t *testing.T) {
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
		{"RST|ACK in window", func(f *fixture) seg { return f.c2s(1000, 0xfffffff0, FlagRST|FlagACK) }, C2S, Forward},
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
		{"no ACK flag", func(f *fixture) seg { return f.c2s(1000, 0x12345678, FlagPSH) }, C2S, DropAck},
	}
	for _, c := range cases {
		each(t, func(t *testing.T, v6, nat bool) {
			f := newFixture(t, v6, nat)
			f.want(f.at(c.seg(f.fixture()), c.dir, 1), c.want, c.name)
		})
	}
}

func (f *fixture) fixture() *fixture { return f }

func TestDiffTrackerFIN(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
		fin.payload = []byte("bye")
		f.want(f.at(fin, C2S, 1), Forward, "client FIN")
		f.want(f.at(f.s2c(0xffffff00, 1004+dC2S, FlagACK|FlagFIN), S2C, 2), Forward, "server FIN")
		f.want(f.at(f.c2s(1004, sa(1), FlagACK), C2S, 3), Forward, "last ACK")
		if !f.flow.Finished() {
			t.Fatal("not finished")
		}
		later := int64(time.Second)
		f.want(f.at(f.s2c(0xffffff00, 1004+dC2S, FlagACK|FlagFIN), S2C, later), DropDuplicate, "FIN again")
		f.want(f.at(f.s2c(0xffffff00, 1004+dC2S, FlagACK|FlagFIN), S2C, later), Forward, "FIN once more")
	})
}

func TestDiffTailLossProbeOfFIN(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
		fin.payload = []byte("bye")
		f.want(f.at(fin, C2S, 0), Forward, "FIN")
		probe := f.c2s(1002, 0xfffffff0, FlagACK|FlagFIN)
		probe.payload = []byte("e")
		f.want(f.at(probe, C2S, 3*ms), DropDuplicate, "probe")
		f.want(f.at(probe, C2S, 20*ms), DropDuplicate, "probe")
		f.want(f.at(probe, C2S, 99*ms), DropDuplicate, "probe at the edge")
		f.want(f.at(probe, C2S, 100*ms), Forward, "probe after the window")
		more := f.c2s(1004, 0xfffffff0, FlagACK|FlagFIN)
		more.payload = []byte("!")
		f.want(f.at(more, C2S, 101*ms), Forward, "FIN with new data")
	})
}

func TestDiffDuplicateFinalACK(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		steps := []struct {
			name string
			s    seg
			d    Dir
			at   int64
			want Verdict
		}{
			{"client FIN", f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN), C2S, 0, Forward},
			{"server FIN, acking the client's", f.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN), S2C, 1 * ms, Forward},
			{"ACK of the server's FIN", f.c2s(1001, 0xfffffff1, FlagACK), C2S, 2 * ms, Forward},
			{"duplicate", f.c2s(1001, 0xfffffff1, FlagACK), C2S, 3 * ms, DropDuplicate},
			{"another duplicate", f.c2s(1001, 0xfffffff1, FlagACK), C2S, 4 * ms, DropDuplicate},
			{"server's duplicate ACK", f.s2c(0xffffff01, 0x7ffffff1, FlagACK), S2C, 5 * ms, DropDuplicate},
			{"a RST still passes", f.c2s(1001, 0, FlagRST), C2S, 6 * ms, Forward},
			{"ACK after the window", f.c2s(1001, 0xfffffff1, FlagACK), C2S, 500 * ms, Forward},
		}
		for _, st := range steps {
			f.want(f.at(st.s, st.d, st.at), st.want, st.name)
		}
		g := newFixture(t, v6, nat)
		g.at(g.c2s(1000, 0xfffffff0, FlagACK|FlagFIN), C2S, 0)
		g.at(g.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN), S2C, ms)
		g.at(g.c2s(1001, 0xfffffff1, FlagACK), C2S, 2*ms)
		g.want(g.at(g.c2s(1001, 0xfffffff1, FlagACK), C2S, 300*ms), Forward, "ACK after the RTO")
		h := newFixture(t, v6, nat)
		h.at(h.c2s(1000, 0xfffffff0, FlagACK|FlagFIN), C2S, 0)
		h.want(h.at(h.s2c(0xffffff00, 0x7ffffff1, FlagACK), S2C, ms), Forward, "ACK of one FIN")
		h.want(h.at(h.s2c(0xffffff00, 0x7ffffff1, FlagACK), S2C, 2*ms), Forward, "half-closed duplicate")
	})
}

// TestDiffLateFinalACK is splice's TestLateFinalACK on both engines.
func TestDiffLateFinalACK(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		serverFIN := f.s2c(0xffffff00, 0x7ffffff1, FlagACK|FlagFIN)
		lastACK := f.c2s(1001, 0xfffffff1, FlagACK)
		f.want(f.at(f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN), C2S, 0), Forward, "client FIN")
		f.want(f.at(serverFIN, S2C, ms), Forward, "server FIN")
		f.want(f.at(serverFIN, S2C, 400*ms), Forward, "server FIN again")
		f.want(f.at(serverFIN, S2C, 1200*ms), Forward, "server FIN once more")
		f.want(f.at(lastACK, C2S, 1800*ms), Forward, "late ACK")
		f.want(f.at(lastACK, C2S, 1801*ms), DropDuplicate, "duplicate ACK")
		f.want(f.at(lastACK, C2S, 1802*ms), DropDuplicate, "another duplicate ACK")
		f.want(f.at(serverFIN, S2C, 1850*ms), DropDuplicate, "repeat that crossed the ACK")
		f.want(f.at(serverFIN, S2C, 2300*ms), DropDuplicate, "first repeat after the end")
		f.want(f.at(serverFIN, S2C, 2800*ms), Forward, "next repeat")
		f.want(f.at(lastACK, C2S, 2801*ms), Forward, "ACK of it")
	})
}

func TestDiffStalePureAckSeqRaised(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
		srv.payload = make([]byte, 0x200)
		f.want(f.at(srv, S2C, 1), Forward, "server data")
		cli := f.c2s(1000, sa(0x200), FlagACK)
		cli.payload = make([]byte, 0x100)
		f.want(f.at(cli, C2S, 2), Forward, "client data")
		f.want(f.at(f.s2c(0xffffff00+0x80, 0x7ffffff0+0x100, FlagACK), S2C, 3), Forward, "stale pure ACK")
		s := f.s2c(0xffffff00+0x80, 0x7ffffff0+0x100, FlagACK)
		s.win = 900
		f.want(f.at(s, S2C, 4), Forward, "stale window update")
		s = f.s2c(0xffffff00+0x80, 0x7ffffff0, FlagACK)
		s.payload = make([]byte, 10)
		f.want(f.at(s, S2C, 5), Forward, "retransmission")
		f.want(f.at(f.s2c(0xffffff00+0x80, 0x7ffffff0, FlagRST), S2C, 6), DropRST, "stale RST before the window")
	})
}

func TestDiffWindowProbe(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		cli := f.c2s(1000, sa(0), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.want(f.at(cli, C2S, 1), Forward, "client data")
		srv := f.s2c(0xffffff00, 0x7ffffff0+0x300, FlagACK)
		srv.win = 0
		f.want(f.at(srv, S2C, 2), Forward, "zero window")
		for range 3 {
			f.want(f.at(f.c2s(1000+0x300-1, sa(0), FlagACK), C2S, 3), Forward, "probe")
		}
		f.want(f.at(f.c2s(1500, 0xfffffff0, FlagACK), C2S, 4), Forward, "pure ACK ahead")
		f.want(f.at(f.c2s(1000+0x300+40, 0xfffffff0, FlagACK), C2S, 5), Forward, "pure ACK beyond the data forwarded")
		fin := f.c2s(1000+0x300+40, 0xfffffff0, FlagACK|FlagFIN)
		f.want(f.at(fin, C2S, 6), Forward, "FIN beyond the data forwarded")
	})
}

// TestDiffPassesUntouched: packets the program leaves to the engine come
// out unchanged and unmarked, and change nothing in the map.
func TestDiffPassesUntouched(t *testing.T) {
	f := newFixture(t, false, false)
	f.allowPass = true
	two := f.c2s(1000, 0xfffffff0, FlagACK)
	two.opts = append(tsOpt(1, 2), tsOpt(3, 4)...)
	sacks := f.c2s(1000, 0xfffffff0, FlagACK)
	sacks.opts = append(sackOpt(sa(0), sa(0)), sackOpt(sa(0), sa(0))...)
	nops := f.c2s(1000, 0xfffffff0, FlagACK)
	nops.opts = bytes.Repeat([]byte{OptNOP}, 16)
	for _, s := range []seg{two, sacks, nops} {
		n := f.passes
		f.at(s, C2S, 1)
		if f.passes != n+1 {
			t.Fatalf("options % x: not passed", s.opts)
		}
	}
	// No flow: another tuple.
	other := f.c2s(1000, 0xfffffff0, FlagACK)
	other.src = cAddr4
	other.dst = gAddr4
	b := other.bytes()
	out, ret, mark, counter := f.run(b, f.start())
	if counter != CounterPass || ret != RetNext || mark != 0 || !bytes.Equal(out, b) {
		t.Fatalf("packet of no flow: counter %d ret %#x mark %#x", counter, ret, mark)
	}
	// A bad IPv4 header checksum (the engine would recompute it in NAT).
	b = f.c2s(1000, 0xfffffff0, FlagACK).bytes()
	b[10] ^= 0xff
	f.step(b, C2S, f.start())
	// Not TCP, a fragment, a short header.
	for _, mod := range []func([]byte){
		func(b []byte) { b[9] = 17 },
		func(b []byte) { b[6] = 0x20 },  // more fragments
		func(b []byte) { b[32] = 0x40 }, // data offset 16
	} {
		b := f.c2s(1000, 0xfffffff0, FlagACK).bytes()
		mod(b)
		IPv4(b).UpdateChecksum()
		if v := f.step(b, C2S, f.start()); v != -1 {
			t.Fatalf("engine verdict %v for an unparsable packet", Verdict(v))
		}
	}
}

// TestDiffSegmentBeyondWindow: the engine's
// TestSegmentBeyondWindowKeepsRetransmissions: a segment from the
// window's edge to beyond it grows the receiver's largest window, and the
// sender's next data at the acknowledged point still passes.
func TestDiffSegmentBeyondWindow(t *testing.T) {
	const win = 1 << 20
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat, func(p *Params) { p.Client.RcvWnd, p.Server.SndWnd = win, win })
		forged := f.c2s(1000+win, 0xfffffff0, FlagACK)
		forged.payload = make([]byte, 1460)
		f.want(f.at(forged, C2S, 1), Forward, "segment at the window's edge")
		next := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
		next.payload = make([]byte, 100)
		f.want(f.at(next, C2S, 2), Forward, "the next data at the acknowledged point")
	})
}

// TestDiffRSTAtTheFIN: the engine's TestRSTAtTheFINAfterItsAck.
func TestDiffRSTAtTheFIN(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		f.want(f.at(f.c2s(999, 0xfffffff0, FlagRST), C2S, 1), DropRST, "a RST before the window, no FIN sent")
		fin := f.c2s(1000, 0xfffffff0, FlagACK|FlagFIN)
		fin.payload = []byte("bye")
		f.want(f.at(fin, C2S, 2), Forward, "client FIN")
		f.want(f.at(f.s2c(0xffffff00, 1004+dC2S, FlagACK), S2C, 3), Forward, "the server's ACK of the FIN")
		f.want(f.at(f.c2s(1003, 0, FlagRST), C2S, 4), Forward, "a RST at the FIN after its ACK")
		if !f.flow.Finished() {
			t.Fatal("the flow did not end")
		}
	})
	// The engine's TestRSTAtAForgedFIN: a FIN the stream went on past.
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		f.want(f.at(f.c2s(1000+30000, 0xfffffff0, FlagACK|FlagFIN), C2S, 1), Forward, "a forged FIN in the window")
		for seq := uint32(1000); seq < 41000; seq += 1000 {
			d := f.c2s(seq, 0xfffffff0, FlagACK)
			d.payload = make([]byte, 1000)
			f.want(f.at(d, C2S, 2), Forward, "the client's data")
			f.want(f.at(f.s2c(0xffffff00, seq+1000+dC2S, FlagACK), S2C, 3), Forward, "the server's ACK")
		}
		f.want(f.at(f.c2s(1000+30000, 0, FlagRST), C2S, 4), DropRST, "a RST at the forged FIN")
		if f.flow.Finished() {
			t.Fatal("a RST at a forged FIN ended the flow")
		}
	})
}

// TestDiffUrgentPointOfMovedAck: the engine's
// TestPureAckMovedKeepsUrgentPoint (a pure ACK whose sequence number
// moves keeps its urgent point, or loses the flag).
func TestDiffUrgentPointOfMovedAck(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		srv := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
		srv.payload = make([]byte, 0x200)
		f.want(f.at(srv, S2C, 1), Forward, "server data")
		cli := f.c2s(1000, sa(0x200), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.want(f.at(cli, C2S, 2), Forward, "client data")
		for _, urg := range []uint16{0x200, 0x181, 0x180, 0x100, 0} {
			s := f.s2c(0xffffff00+0x80, 0x7ffffff0, FlagACK|FlagURG)
			s.urg = urg
			f.want(f.at(s, S2C, 3), Forward, fmt.Sprintf("raised pure ACK, urgent pointer %#x", urg))
		}
		for _, urg := range []uint16{10, 0xffff - 40, 0xffff - 39, 0xffff} {
			s := f.c2s(1000+0x300+40, sa(0x200), FlagACK|FlagURG|FlagPSH)
			s.urg = urg
			f.want(f.at(s, C2S, 4), Forward, fmt.Sprintf("lowered pure ACK, urgent pointer %#x", urg))
		}
		data := f.c2s(1000+0x300, sa(0x200), FlagACK|FlagURG)
		data.payload, data.urg = make([]byte, 40), 7
		f.want(f.at(data, C2S, 5), Forward, "urgent data")
	})
}

// TestDiffFINBehindTheAcknowledged: the engine's
// TestFINBehindTheAcknowledgedIsNoFIN (a FIN at or before what its
// receiver acknowledged is no FIN).
func TestDiffFINBehindTheAcknowledged(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat)
		srv0 := uint32(0xffffff00)
		cli := f.c2s(1000, sa(0), FlagACK)
		cli.payload = make([]byte, 0x300)
		f.want(f.at(cli, C2S, 1), Forward, "client data")
		srv := f.s2c(srv0, 0x7ffffff0+0x300, FlagACK)
		srv.payload = make([]byte, 0x300)
		f.want(f.at(srv, S2C, 2), Forward, "server data")
		f.want(f.at(f.c2s(1000+0x300, sa(0x300), FlagACK), C2S, 3), Forward, "client ACK")
		f.want(f.at(f.c2s(1000+0x100, sa(0x300), FlagACK|FlagFIN), C2S, 4), Forward, "client FIN behind")
		f.want(f.at(f.s2c(srv0+0x2ff, 0x7ffffff0+0x300, FlagACK|FlagFIN), S2C, 5), Forward, "server FIN ending at the acknowledged")
		f.want(f.at(f.c2s(1000+0x300, sa(0x300), FlagACK), C2S, 6), Forward, "client ACK")
		f.want(f.at(f.s2c(srv0+0x300, 0x7ffffff0+0x300, FlagACK), S2C, 7), Forward, "server ACK")
		f.want(f.at(f.c2s(1000+0x300, sa(0x300), FlagACK|FlagFIN), C2S, 8), Forward, "client FIN")
		f.want(f.at(f.s2c(srv0+0x300, 0x7ffffff0+0x301, FlagACK|FlagFIN), S2C, 9), Forward, "server FIN")
		f.want(f.at(f.c2s(1000+0x301, sa(0x301), FlagACK), C2S, 10), Forward, "last ACK")
	})
}

// TestDiffInexactRST: the engine's TestInexactRSTChangesNothing. A RST
// in the window but not at rcv_nxt changes no state in either engine
// (its payload, FIN, ACK, window, timestamps), and a second RST at the
// end of the first does not end the flow.
func TestDiffInexactRST(t *testing.T) {
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
			each(t, func(t *testing.T, v6, nat bool) {
				f := newFixture(t, v6, nat)
				data := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
				data.payload = make([]byte, 100)
				f.want(f.at(data, S2C, 1), Forward, "the server's data")
				before := f.flow.State()
				s := c.seg(f)
				f.want(f.at(s, C2S, 2), Forward, "a RST in the window")
				after := f.flow.State()
				after.LastSeen = before.LastSeen
				if after != before {
					t.Errorf("a RST in the window, not at rcv_nxt, changed the flow's state:\n%+v\n%+v", before, after)
				}
				f.at(f.c2s(uint32(Seq(s.seq).Add(uint32(len(s.payload))+uint32(s.flags&FlagFIN))), 0, FlagRST), C2S, 3)
				if f.flow.Finished() {
					t.Error("a RST at the end of a forged RST ended the flow")
				}
				real := f.c2s(1000, 0xfffffff0, FlagACK)
				real.opts = tsOpt(101, 4990)
				f.want(f.at(real, C2S, 4), Forward, "the client's real packet")
			})
		})
	}
}

// TestDiffWindowGrowthCapped: the engine's TestWindowGrowthCapped, from
// a flow whose forged segments grew the server's largest window to
// within 2,000 bytes of the largest window there is: segments at the
// edge take it to there and no further, in both engines.
func TestDiffWindowGrowthCapped(t *testing.T) {
	each(t, func(t *testing.T, v6, nat bool) {
		f := newFixture(t, v6, nat, func(p *Params) {
			p.Client.SndWscale, p.Client.RcvWscale, p.Server.SndWscale, p.Server.RcvWscale = 14, 14, 14, 14
		})
		st := f.flow.State()
		c := &st.Dirs[C2S]
		c.MaxWin = 0xffff<<14 - 2000
		c.SndNxt = c.AckSeen.Add(c.MaxWin)
		f.flow = FlowFromState(st)
		if err := f.dp.PutFlow(f.id, f.keys, st); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			c := f.flow.State().Dirs[C2S]
			forged := f.c2s(uint32(c.AckSeen.Add(c.MaxWin)), 0xfffffff0, FlagACK)
			forged.payload = make([]byte, 1400)
			f.want(f.at(forged, C2S, int64(i+1)), Forward, "a forged segment at the window's edge")
		}
		if w := f.flow.State().Dirs[C2S].MaxWin; w != 0xffff<<14 {
			t.Errorf("the server's largest window is %d, want %d", w, 0xffff<<14)
		}
		real := f.c2s(1000, 0xfffffff0, FlagACK|FlagPSH)
		real.payload = make([]byte, 1448)
		f.want(f.at(real, C2S, 4), Forward, "the client's next data")
		f.want(f.at(f.s2c(0xffffff00, 1000+1448+dC2S, FlagACK), S2C, 5), Forward, "the server's ACK of it")
	})
}

// TestDiffECNAcrossLegs: a direction whose sender negotiated ECN and
// whose receiver did not goes Not-ECT (the IPv4 header checksum updated,
// with IPv4 options too); a CE mark there goes to the queue, where the
// engine drops it. Where the legs agree, the field passes as it came.
func TestDiffECNAcrossLegs(t *testing.T) {
	for _, legs := range [][2]bool{{true, false}, {false, true}, {true, true}} {
		each(t, func(t *testing.T, v6, nat bool) {
			f := newFixture(t, v6, nat, func(p *Params) { p.Client.ECN, p.Server.ECN = legs[0], legs[1] })
			seq := [2]uint32{1000, 0xffffff00}
			for i, ecn := range []uint8{2, 1, 3, 2} {
				for _, d := range []Dir{C2S, S2C} {
					var s seg
					if d == C2S {
						s = f.c2s(seq[d], 0xfffffff0, FlagACK)
					} else {
						s = f.s2c(seq[d], 0x7ffffff0, FlagACK)
					}
					s.payload = bytes.Repeat([]byte{byte(i)}, 100)
					s.ecn = ecn
					if !v6 && i == 3 {
						s.ipOpts = []byte{1, 1, 1, 0}
					}
					strip := legs[d] && !legs[1-d]
					want := Forward
					if strip && ecn == ECNCE {
						want = DropCE
						f.allowPass = true
					}
					f.want(f.at(s, d, int64(i+1)), want, fmt.Sprintf("legs %v %v ECN %d", legs, d, ecn))
					f.allowPass = false
					if want == Forward {
						seq[d] += 100
					}
				}
			}
		})
	}
}

// TestDiffIPv4MappedIPv6: an IPv6 packet between IPv4-mapped addresses
// (::ffff:10.1.0.2 to ::ffff:10.2.0.2) has the key of the IPv4 flow
// between those addresses (keys hold IPv4 addresses mapped), but it is
// no packet of that flow: Linux drops an IPv6 packet from such a source
// (ip6_rcv_core), and the divert sets hold each family's own tuples.
// Neither engine may act on it: a RST exactly in the IPv4 flow's window,
// forged as IPv6 (past an IPv4 source check on the way), must leave the
// flow open and its state untouched.
func TestDiffIPv4MappedIPv6(t *testing.T) {
	for _, nat := range []bool{false, true} {
		t.Run(fmt.Sprintf("nat=%v", nat), func(t *testing.T) {
			f := newFixture(t, false, nat)
			mapped := func(a netip.AddrPort) netip.AddrPort {
				return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
			}
			rst := f.c2s(1000, 0, FlagRST)
			rst.src, rst.dst = mapped(rst.src), mapped(rst.dst)
			data := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
			data.payload = []byte("x")
			data.src, data.dst = mapped(data.src), mapped(data.dst)
			for _, s := range []struct {
				seg seg
				d   Dir
			}{{rst, C2S}, {data, S2C}} {
				n := f.passes
				if v := f.step(s.seg.bytes(), s.d, f.start()+1); v != -1 {
					t.Fatalf("%v: engine verdict %v for an IPv6 packet of IPv4-mapped addresses", s.d, Verdict(v))
				}
				if f.passes != n+1 {
					t.Fatalf("%v: the program did not pass it", s.d)
				}
			}
			if f.flow.Finished() || f.state().RST {
				t.Fatal("an IPv6 RST of IPv4-mapped addresses ended the IPv4 flow")
			}
			f.want(f.at(f.c2s(1000, 0xfffffff0, FlagACK), C2S, 2), Forward, "the flow's own IPv4 ACK")
		})
	}
}
