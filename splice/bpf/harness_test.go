//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"

	"spliced/splice"
)

// The differential harness: a flow lives twice, once as a splice.Flow
// and once in the program's maps, and every packet goes through both,
// the engine with Flow.Rewrite (complete checksum) and the program with
// BPF_PROG_TEST_RUN, at the same (fake) time. After each packet the
// verdicts, the output bytes, the mark and the whole tracking state must
// agree. A packet the program passes on (CounterPass) must come out
// untouched with the map unchanged; the engine then handles it, as the
// queue would, and its state is written back to the map, the way a
// demotion and a promotion would hand it over.
//
// BPF_PROG_TEST_RUN builds a linear skb with CHECKSUM_NONE and no GSO:
// it cannot set ip_summed or gso_type, so the CHECKSUM_PARTIAL and GSO
// paths (where the helpers leave the non-pseudo-header part of the
// checksum alone) are out of reach here and need the lab.

var ethSrc = []byte{0x02, 0, 0, 0, 0, 1}
var ethDst = []byte{0x02, 0, 0, 0, 0, 2}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loading BPF programs needs root")
	}
}

// loaded is one program load for the whole test binary (loading and
// verifying takes tens of milliseconds); each harness uses its own flow
// id, and resets the counters it reads by differences.
// A failed load is kept too: the verifier takes seconds to refuse the
// program, and the fuzz targets' thousands of seed inputs each tried
// again until the package's timeout (10 minutes).
var (
	loaded  *Datapath
	loadErr error
)

func datapath(t testing.TB) *Datapath {
	t.Helper()
	requireRoot(t)
	if loaded == nil && loadErr == nil {
		loaded, loadErr = Load(Options{fakeClock: true})
	}
	if loadErr != nil {
		t.Fatal(loadErr)
	}
	return loaded
}

var nextID uint64

type harness struct {
	t      testing.TB
	dp     *Datapath
	id     uint64
	keys   [2]splice.Key
	flow   splice.Flow
	passes int // packets the program passed on
	// allowPass: a pass is acceptable (fuzzing); otherwise a pass fails
	// the test unless the packet is one the engine does not parse.
	allowPass bool
}

func newHarness(t testing.TB, p *splice.Params, now int64) *harness {
	t.Helper()
	dp := datapath(t)
	f, err := splice.NewFlow(p, now)
	if err != nil {
		t.Fatal(err)
	}
	nextID++
	h := &harness{t: t, dp: dp, id: nextID, keys: p.Keys(), flow: f}
	if err := dp.PutFlow(h.id, h.keys, f.State()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.DeleteFlow(h.id, h.keys); err != nil {
			t.Error(err)
		}
	})
	return h
}

// frame prepends an Ethernet header.
func frame(ip []byte) []byte {
	typ := uint16(0x0800)
	if len(ip) > 0 && ip[0]>>4 == 6 {
		typ = 0x86dd
	}
	b := append(append(append([]byte(nil), ethDst...), ethSrc...), byte(typ>>8), byte(typ))
	return append(b, ip...)
}

// run is the program's half: the packet's bytes after the program, its
// return code, the mark it set, and the counter that moved.
func (h *harness) run(ip []byte, now int64) (out []byte, ret uint32, mark uint32, counter int) {
	h.t.Helper()
	if err := h.dp.setNow(now); err != nil {
		h.t.Fatal(err)
	}
	before, err := h.dp.Counters()
	if err != nil {
		h.t.Fatal(err)
	}
	in := frame(ip)
	dataOut := make([]byte, len(in)+256)
	ctxIn := make([]byte, 12) // len, pkt_type, mark: all 0
	ctxOut := make([]byte, 512)
	ret, err = h.dp.Program().Run(&ebpf.RunOptions{Data: in, DataOut: dataOut, Context: ctxIn, ContextOut: ctxOut})
	if err != nil {
		h.t.Fatal(err)
	}
	after, err := h.dp.Counters()
	if err != nil {
		h.t.Fatal(err)
	}
	counter = -1
	for i := range after {
		if after[i] != before[i] {
			if counter >= 0 || after[i] != before[i]+1 {
				h.t.Fatalf("counters moved %v -> %v", before, after)
			}
			counter = i
		}
	}
	if counter < 0 {
		h.t.Fatalf("no counter moved")
	}
	if !bytes.Equal(dataOut[:14], in[:14]) {
		h.t.Fatalf("Ethernet header changed")
	}
	return dataOut[14:len(in)], ret, binary.NativeEndian.Uint32(ctxOut[8:]), counter
}

// step feeds one packet of direction d to both engines and compares.
// It returns the engine's verdict (or -1 when the engine does not parse
// the packet).
func (h *harness) step(pkt []byte, d splice.Dir, now int64) int {
	h.t.Helper()
	eng := bytes.Clone(pkt)
	var p splice.Packet
	st := p.Parse(eng)
	stateBefore := h.state()
	if st == splice.OK && p.KeyOf() != h.keys[d] {
		h.t.Fatalf("packet %v is not of direction %v (%v)", p.KeyOf(), d, h.keys[d])
	}

	out, ret, mark, counter := h.run(pkt, now)

	if counter == CounterPass {
		h.passes++
		if ret != RetNext || mark != 0 || !bytes.Equal(out, pkt) {
			h.t.Fatalf("passed packet: ret %#x mark %#x, changed=%v", ret, mark, !bytes.Equal(out, pkt))
		}
		if s := h.state(); s != stateBefore {
			h.t.Fatalf("passed packet changed the map state:\n%s", cmp.Diff(stateBefore, s))
		}
		if st != splice.OK {
			return -1
		}
		if !h.allowPass {
			h.t.Fatalf("the program passed a packet the engine parses (% x)", pkt)
		}
		// The queue and the Go engine take it; hand the result back.
		v := h.flow.Rewrite(&p, d, &h.keys[1-d], now, true)
		if err := h.dp.PutFlow(h.id, h.keys, h.flow.State()); err != nil {
			h.t.Fatal(err)
		}
		return int(v)
	}
	if st != splice.OK {
		h.t.Fatalf("the program handled a packet the engine does not parse (%v): counter %d", st, counter)
	}
	v := h.flow.Rewrite(&p, d, &h.keys[1-d], now, true)
	if counter != int(v) {
		h.t.Fatalf("program verdict %d, engine %v (%d)\npacket % x", counter, v, v, pkt)
	}
	if v == splice.Forward {
		if ret != RetNext || mark&DefaultMark == 0 {
			h.t.Fatalf("forwarded: ret %#x mark %#x", ret, mark)
		}
		if !bytes.Equal(out, p.Bytes()) {
			h.t.Fatalf("output differs\nprogram % x\nengine  % x\ninput   % x", out, p.Bytes(), pkt)
		}
	} else if ret != RetDrop {
		h.t.Fatalf("verdict %v: ret %#x, want drop", v, ret)
	}
	if got, want := h.state(), h.flow.State(); got != want {
		h.t.Fatalf("state after %v differs (-program +engine):\n%s", v, cmp.Diff(got, want))
	}
	return int(v)
}

func (h *harness) state() splice.State {
	h.t.Helper()
	s, err := h.dp.Flow(h.id)
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

// seg describes a test packet (as splice's own tests build them).
type seg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	win      uint16
	urg      uint16 // the urgent pointer
	opts     []byte // raw TCP options; padded with EOL to a multiple of 4
	payload  []byte
	ipOpts   []byte // IPv4 options (multiple of 4)
	hopByHop bool   // IPv6: an 8-byte hop-by-hop header before TCP
	ext      []byte // IPv6: raw extension headers before TCP (instead)
	extNext  byte   // the first of them
	ttl      uint8  // the TTL or hop limit; 0 is 64
	ecn      uint8  // the ECN field (RFC 3168)
}

func (s seg) bytes() []byte {
	ttl := s.ttl
	if ttl == 0 {
		ttl = 64
	}
	opts := append([]byte(nil), s.opts...)
	for len(opts)%4 != 0 {
		opts = append(opts, splice.OptEOL)
	}
	tcp := make([]byte, 20+len(opts)+len(s.payload))
	binary.BigEndian.PutUint16(tcp[0:], s.src.Port())
	binary.BigEndian.PutUint16(tcp[2:], s.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], s.seq)
	binary.BigEndian.PutUint32(tcp[8:], s.ack)
	tcp[12] = byte((20 + len(opts)) / 4 << 4)
	tcp[13] = s.flags
	binary.BigEndian.PutUint16(tcp[14:], s.win)
	binary.BigEndian.PutUint16(tcp[18:], s.urg)
	copy(tcp[20:], opts)
	copy(tcp[20+len(opts):], s.payload)
	src, dst := s.src.Addr().AsSlice(), s.dst.Addr().AsSlice()
	binary.BigEndian.PutUint16(tcp[16:], splice.TCPChecksum(src, dst, tcp))
	if s.src.Addr().Is4() {
		hl := 20 + len(s.ipOpts)
		ip := make([]byte, hl, hl+len(tcp))
		ip[0] = 0x40 | byte(hl/4)
		ip[1] = s.ecn
		binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(tcp)))
		ip[6] = 0x40 // DF
		ip[8] = ttl
		ip[9] = 6
		copy(ip[12:], src)
		copy(ip[16:], dst)
		copy(ip[20:], s.ipOpts)
		splice.IPv4(ip).UpdateChecksum()
		return append(ip, tcp...)
	}
	var ext []byte
	next := byte(6)
	if s.hopByHop {
		ext = []byte{6, 0, 1, 4, 0, 0, 0, 0}
		next = 0
	}
	if s.ext != nil {
		ext, next = s.ext, s.extNext
	}
	ip := make([]byte, 40, 40+len(ext)+len(tcp))
	ip[0] = 0x60
	ip[1] = s.ecn << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(tcp)))
	ip[6] = next
	ip[7] = ttl
	copy(ip[8:], src)
	copy(ip[24:], dst)
	return append(append(ip, ext...), tcp...)
}

func tsOpt(val, ecr uint32) []byte {
	b := []byte{splice.OptNOP, splice.OptNOP, splice.OptTimestamps, 10, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[4:], val)
	binary.BigEndian.PutUint32(b[8:], ecr)
	return b
}

func sackOpt(blocks ...uint32) []byte {
	b := []byte{splice.OptNOP, splice.OptNOP, splice.OptSACK, byte(2 + 4*len(blocks))}
	for _, v := range blocks {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

// The test topology and flow, as in splice's tests: sequence numbers near
// the wrap, equal window scales and timestamps on both legs unless an
// option changes them.
var (
	cAddr4 = netip.MustParseAddrPort("10.1.0.2:40000")
	sAddr4 = netip.MustParseAddrPort("10.2.0.2:80")
	gAddr4 = netip.MustParseAddrPort("10.2.0.1:50000")
	cAddr6 = netip.MustParseAddrPort("[fd00:1::2]:40000")
	sAddr6 = netip.MustParseAddrPort("[fd00:2::2]:80")
	gAddr6 = netip.MustParseAddrPort("[fd00:2::1]:50000")
)

type fixture struct {
	*harness
	p    splice.Params
	c, s netip.AddrPort // client and server
	up   netip.AddrPort // upstream local: what the server sees
}

type fixOpt func(*splice.Params)

func newFixture(t testing.TB, v6, nat bool, opts ...fixOpt) *fixture {
	t.Helper()
	c, s, g := cAddr4, sAddr4, gAddr4
	if v6 {
		c, s, g = cAddr6, sAddr6, gAddr6
	}
	up := netip.AddrPortFrom(c.Addr(), 40001) // transparent, other port
	if nat {
		up = g
	}
	p := splice.Params{
		Client: splice.Conn{Local: s, Remote: c, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 5000},
		Server: splice.Conn{Local: up, Remote: s, SndNxt: 0x7ffffff0, RcvNxt: 0xffffff00, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 900000},
	}
	for _, o := range opts {
		o(&p)
	}

	return &fixture{harness: newHarness(t, &p, fixtureStart), p: p, c: c, s: s, up: up}
}

func (f *fixture) c2s(seq, ack uint32, flags uint8) seg {
	return seg{src: f.c, dst: f.s, seq: seq, ack: ack, flags: flags, win: 500}
}

func (f *fixture) s2c(seq, ack uint32, flags uint8) seg {
	return seg{src: f.s, dst: f.up, seq: seq, ack: ack, flags: flags, win: 500}
}
