//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	. "spliced/splice"
)

// fuzzSeeds are packets of the fixture's flow with interesting options
// (the engine's FuzzRewrite seeds, and a few more).
func fuzzSeeds() [][]byte {
	mk := func(v6 bool, opts []byte, flags uint8, payload int) []byte {
		c, s := cAddr4, sAddr4
		if v6 {
			c, s = cAddr6, sAddr6
		}
		return seg{src: c, dst: s, seq: 1000, ack: 0xfffffff0, flags: flags, win: 100, opts: opts, payload: make([]byte, payload)}.bytes()
	}
	return [][]byte{
		mk(false, nil, FlagACK, 0),
		mk(false, tsOpt(1, 2), FlagACK|FlagPSH, 100),
		mk(true, sackOpt(sa(10), sa(20)), FlagACK, 0),
		mk(false, []byte{OptTimestamps, 0}, FlagACK, 1),
		mk(false, []byte{OptTimestamps, 1, 0, 0}, FlagACK, 1),
		mk(false, []byte{OptSACK, 40, 0, 0}, FlagACK, 1),
		mk(false, []byte{OptWindowScale, 3, 15, OptNOP}, FlagACK, 1),
		mk(false, append(tsOpt(1, 2), tsOpt(3, 4)...), FlagACK, 1),
		mk(false, []byte{OptSACK, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0}, FlagACK, 0),
		mk(false, nil, FlagSYN, 0),
		mk(true, nil, FlagRST, 0),
		mk(false, nil, FlagFIN|FlagACK, 10),
		mk(true, append([]byte{OptNOP}, append(tsOpt(7, 8)[2:], sackOpt(sa(1), sa(2))[1:]...)...), FlagACK, 3),
		mk(false, append(tsOpt(1, 2), OptEOL, OptSACK, 10, 1, 2, 3, 4, 5, 6, 7, 8), FlagACK, 0),
		seg{src: cAddr6, dst: sAddr6, seq: 1000, ack: 0xfffffff0, flags: FlagACK, win: 100, opts: tsOpt(1, 2),
			payload: []byte("x"), hopByHop: true}.bytes(),
	}
}

const maxRunData = 3000

// engineCorpus reads the engine's FuzzRewrite corpus (go test fuzz v1
// files of a []byte and a byte).
func engineCorpus(t testing.TB) (pkts [][]byte, modes []byte) {
	dir := filepath.Join("..", "testdata", "fuzz", "FuzzRewrite")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) != 3 || lines[0] != "go test fuzz v1" {
			t.Fatalf("%s: not a corpus file of FuzzRewrite", e.Name())
		}
		pkt, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		m := strings.TrimSuffix(strings.TrimPrefix(lines[2], "byte("), ")")
		var mode byte
		if strings.HasPrefix(m, "'") {
			r, err := strconv.Unquote(m)
			if err != nil || len([]rune(r)) != 1 {
				t.Fatalf("%s: mode %s: %v", e.Name(), m, err)
			}
			mode = byte([]rune(r)[0])
		} else {
			n, err := strconv.ParseUint(m, 0, 8)
			if err != nil {
				t.Fatalf("%s: %v", e.Name(), err)
			}
			mode = byte(n)
		}
		pkts, modes = append(pkts, []byte(pkt)), append(modes, mode)
	}
	if len(pkts) == 0 {
		t.Fatal("empty corpus")
	}
	return pkts, modes
}

// diffOne is the fuzz body: the packet, made one of a fresh flow's, goes
// through both engines three times (the second and third see the state
// the first left, the third after the end-of-flow windows). mode bits: 1
// direction, 4 NAT, 8 keep a broken IPv4 header checksum, 16 the server
// leg without timestamps, 32 without SACK, 64 different window scales.
func diffOne(t *testing.T, b []byte, mode byte) {
	// BPF_PROG_TEST_RUN takes one page of data at most, less the skb's
	// head- and tailroom: bigger packets are the lab's.
	if len(b) > maxRunData {
		return
	}
	var p Packet
	if p.Parse(bytes.Clone(b)) != OK {
		// The program must pass what the engine cannot parse.
		// BPF_PROG_TEST_RUN refuses (EINVAL) a frame whose IPv4 or IPv6
		// header is cut short: runts are out of its reach.
		if len(b) < 40 {
			return
		}
		f := newFixture(t, b[0]>>4 == 6, false)
		if v := f.step(b, C2S, f.start()); v != -1 {
			t.Fatalf("engine verdict %v for a packet it does not parse", Verdict(v))
		}
		return
	}
	f := newFixture(t, p.IsIPv6(), mode&4 != 0, func(pp *Params) {
		pp.Server.Timestamps = mode&16 == 0
		pp.Server.SACK = mode&32 == 0
		if mode&64 != 0 {
			pp.Client.SndWscale, pp.Server.RcvWscale = 2, 9
			pp.Server.SndWscale, pp.Client.RcvWscale = 14, 0
		}
	})
	f.allowPass = true
	d := Dir(mode & 1)
	pkt := bytes.Clone(b)
	var q Packet
	q.Parse(pkt)
	k := f.keys[d]
	// Make the packet one of the flow's, as the table lookup would.
	if q.IsIPv6() {
		copy(q.Src(), k.Src[:])
		copy(q.Dst(), k.Dst[:])
	} else {
		copy(q.Src(), k.Src[12:])
		copy(q.Dst(), k.Dst[12:])
		if mode&8 == 0 {
			q.IPv4().UpdateChecksum()
		}
	}
	q.TCP().SetSrcPort(k.SrcPort)
	q.TCP().SetDstPort(k.DstPort)
	for i, at := range []int64{1, int64(50 * time.Millisecond), int64(time.Second)} {
		if v := f.step(bytes.Clone(q.Bytes()), d, f.start()+at); v < 0 {
			t.Fatalf("round %d: the engine no longer parses the packet", i)
		}
	}
}

// TestDiffFuzzCorpus replays the engine's FuzzRewrite corpus and the
// seeds, in every mode.
func TestDiffFuzzCorpus(t *testing.T) {
	pkts, modes := engineCorpus(t)
	for i, b := range pkts {
		for _, m := range []byte{modes[i], modes[i] ^ 1, modes[i] ^ 4, modes[i] ^ 16, modes[i] ^ 32, modes[i] ^ 64} {
			diffOne(t, b, m)
		}
	}
	for _, b := range fuzzSeeds() {
		for m := range 128 {
			diffOne(t, b, byte(m))
		}
	}
}

// FuzzDiff feeds arbitrary packets to both engines (see diffOne).
func FuzzDiff(f *testing.F) {
	pkts, modes := engineCorpus(f)
	for i, b := range pkts {
		f.Add(b, modes[i])
	}
	for _, b := range fuzzSeeds() {
		f.Add(b, byte(0))
		f.Add(b, byte(1|4|16))
		f.Add(b, byte(64|32))
	}
	f.Fuzz(diffOne)
}

// diffSequence is the body of FuzzDiffSequence: data is read 8 bytes a
// packet, each made relative to the flow's current state, so that most
// packets land in or near the window and the state moves on:
//
//	0: bit 0 direction; 1 FIN; 2 RST; 3 no ACK; 4 PSH; 5 SYN (with 3),
//	   URG (without 3, the pointer 4 times byte 6);
//	   6-7 options: none, timestamps, timestamps and SACK, SACK
//	1-2: sequence number, signed, from the sender's highest sequence
//	3-4: ack, signed, from the other direction's highest sequence
//	5: payload bytes
//	6: window field (times 16), also the timestamps' jitter
//	7: milliseconds since the last packet
//
// mode as for diffOne (bit 1: IPv6).
func diffSequence(t *testing.T, data []byte, mode byte) {
	if len(data) > 8*64 {
		data = data[:8*64]
	}
	v6 := mode&2 != 0
	f := newFixture(t, v6, mode&4 != 0, func(pp *Params) {
		pp.Server.Timestamps = mode&16 == 0
		pp.Server.SACK = mode&32 == 0
		if mode&64 != 0 {
			pp.Client.SndWscale, pp.Server.RcvWscale = 2, 9
			pp.Server.SndWscale, pp.Client.RcvWscale = 14, 0
		}
	})
	f.allowPass = true
	now := int64(0)
	var lastTS [2]uint32
	for ; len(data) >= 8; data = data[8:] {
		b := data[:8]
		d := Dir(b[0] & 1)
		st := f.flow.State()
		s, o := &st.Dirs[d], &st.Dirs[1-d]
		var fl uint8
		if b[0]&2 != 0 {
			fl |= FlagFIN
		}
		if b[0]&4 != 0 {
			fl |= FlagRST
		}
		if b[0]&8 == 0 {
			fl |= FlagACK
		} else if b[0]&32 != 0 {
			fl |= FlagSYN
		}
		if b[0]&16 != 0 {
			fl |= FlagPSH
		}
		seq := uint32(s.SndNxt) + uint32(int32(int16(binary.BigEndian.Uint16(b[1:]))))
		// An ack in the sender's view: the other direction's output space.
		ack := uint32(o.SndNxt) + o.SeqOff + uint32(int32(int16(binary.BigEndian.Uint16(b[3:]))))
		var sg seg
		if d == C2S {
			sg = f.c2s(seq, ack, fl)
		} else {
			sg = f.s2c(seq, ack, fl)
		}
		sg.payload = bytes.Repeat([]byte{b[5]}, int(b[5]))
		sg.win = uint16(b[6]) << 4
		if b[0]&(8|32) == 32 {
			sg.flags |= FlagURG
			sg.urg = uint16(b[6]) << 2
		}
		lastTS[d] += uint32(b[6]&7) + 1
		// The echo of what the other direction's receiver last saw.
		ecr := o.TSval + o.TSOff - uint32(b[6]>>6)
		switch b[0] >> 6 {
		case 1:
			sg.opts = tsOpt(lastTS[d], ecr)
		case 2:
			sg.opts = append(tsOpt(lastTS[d], ecr), sackOpt(ack+uint32(b[5]), ack+2*uint32(b[5]))...)
		case 3:
			sg.opts = sackOpt(ack+1, ack+uint32(b[6])+1, ack+300, ack+400)
		}
		now += int64(b[7]) * ms
		if recording != nil {
			*recording = append(*recording, sent{sg.bytes(), d, f.start() + now})
		}
		if v := f.step(sg.bytes(), d, f.start()+now); v < 0 {
			t.Fatal("the engine did not parse a generated packet")
		}
	}
}

// FuzzDiffSequence runs packet sequences through both engines (see
// diffSequence): the tracker's paths (FINs, their acknowledgment, the
// end-of-flow duplicates, RSTs, timestamp learning in both directions)
// over many packets.
func FuzzDiffSequence(f *testing.F) {
	seqs := [][]byte{
		// client data, server ACK, both FINs, the last ACK, duplicates
		{0x50, 0, 0, 0, 0, 100, 16, 1, 0x51, 0, 0, 0, 0, 0, 16, 1,
			0x02 | 0x40, 0, 0, 0, 0, 0, 16, 1, 0x43, 0, 0, 0, 0, 0, 16, 1,
			0x40, 0, 0, 0, 0, 0, 16, 1, 0x40, 0, 0, 0, 0, 0, 16, 1, 0x41, 0, 0, 0, 0, 0, 16, 200},
		// SACK and timestamps both ways, data each way
		{0x80, 0, 0, 0, 0, 50, 20, 0, 0x81, 0, 0, 0, 0, 60, 20, 0, 0x80, 0xff, 0xf0, 0, 0, 0, 20, 0, 0xc1, 0, 0, 0, 0, 0, 1, 0},
		// RST exactly at the window, and one in it
		{0x40, 0, 0, 0, 0, 10, 16, 0, 0x05, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 10, 0, 0, 0, 0, 0},
		// stale pure ACKs and window probes
		{0x00, 0, 0, 0, 0, 200, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0x00, 0xff, 0x00, 0, 0, 0, 0, 0},
		// urgent pointers on pure ACKs raised and lowered, and on data
		{0x00, 0, 0, 0, 0, 200, 0, 0, 0x21, 0xff, 0x00, 0, 0, 0, 40, 0, 0x20, 0, 50, 0, 0, 0, 10, 0, 0x20, 0, 0, 0, 0, 30, 5, 0},
		// a SYN in the middle
		{0x00, 0, 0, 0, 0, 1, 1, 1, 0x28, 0, 0, 0, 0, 0, 0, 0, 0x00, 0, 1, 0, 0, 1, 1, 1},
	}
	for _, s := range seqs {
		for _, m := range []byte{0, 2, 4, 6, 16, 32, 64, 2 | 4 | 64} {
			f.Add(s, m)
		}
	}
	f.Fuzz(diffSequence)
}

// TestHandOver: a flow handed between the engines at every packet
// (demoted: Flow read back into a splice.Flow; promoted: PutFlow) forwards
// exactly what one engine alone forwards. The sequences are the sequence
// fuzzer's corpus, in every mode.
func TestHandOver(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDiffSequence")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		data, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
		if err != nil {
			t.Fatal(err)
		}
		for _, mode := range []byte{0, 2, 4 | 16, 2 | 32 | 64} {
			handOver(t, []byte(data), mode)
		}
	}
}

// handOver replays a sequence (as diffSequence builds it) through a
// reference engine and, alternately, the program and a second engine
// that takes the flow over from the map and gives it back.
func handOver(t *testing.T, data []byte, mode byte) {
	// diffSequence's packets, recorded.
	var pkts []sent
	recording = &pkts
	diffSequence(t, data, mode)
	recording = nil

	f := newFixture(t, mode&2 != 0, mode&4 != 0, func(pp *Params) {
		pp.Server.Timestamps = mode&16 == 0
		pp.Server.SACK = mode&32 == 0
		if mode&64 != 0 {
			pp.Client.SndWscale, pp.Server.RcvWscale = 2, 9
			pp.Server.SndWscale, pp.Client.RcvWscale = 14, 0
		}
	})
	ref := f.flow // the reference engine: every packet
	for i, sp := range pkts {
		pkt, d, now := sp.pkt, sp.d, sp.at
		want := bytes.Clone(pkt)
		var p Packet
		p.Parse(want)
		wv := ref.Rewrite(&p, d, &f.keys[1-d], now, true)

		got := bytes.Clone(pkt)
		var gv Verdict
		if i%2 == 0 {
			out, _, _, counter := f.run(got, now)
			if counter == CounterPass {
				t.Fatalf("packet %d passed", i)
			}
			gv, got = Verdict(counter), out
		} else {
			// Demote, run the engine, promote.
			st, err := f.dp.Flow(f.id)
			if err != nil {
				t.Fatal(err)
			}
			eng := FlowFromState(st)
			var q Packet
			q.Parse(got)
			gv = eng.Rewrite(&q, d, &f.keys[1-d], now, true)
			if err := f.dp.PutFlow(f.id, f.keys, eng.State()); err != nil {
				t.Fatal(err)
			}
		}
		if gv != wv || (wv == Forward && !bytes.Equal(got, want)) {
			t.Fatalf("packet %d: %v, reference %v; bytes equal %v", i, gv, wv, bytes.Equal(got, want))
		}
	}
	st, err := f.dp.Flow(f.id)
	if err != nil {
		t.Fatal(err)
	}
	if st != ref.State() {
		t.Fatalf("final state differs:\n got %+v\nwant %+v", st, ref.State())
	}
}

// sent is a packet diffSequence sent, its direction and time.
type sent struct {
	pkt []byte
	d   Dir
	at  int64
}

// recording, when set, collects what diffSequence sends.
var recording *[]sent
