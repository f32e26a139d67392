package splice

import (
	"bytes"
	"testing"
	"unsafe"
)

// TestStateSize bounds the per-flow state: the paper's FWD needed under 36
// bytes; ours keeps both directions' offsets, the tracker and what unsplice
// needs in at most 128.
func TestStateSize(t *testing.T) {
	flow, entry := unsafe.Sizeof(Flow{}), unsafe.Sizeof(Entry{})
	t.Logf("per-flow engine state: %d bytes; table entry with both 4-tuples and its lock: %d bytes", flow, entry)
	if flow > 128 {
		t.Fatalf("Flow is %d bytes, budget 128", flow)
	}
	if entry > 320 { // the flow, both tuples, a lock, and counters
		t.Fatalf("Entry is %d bytes, budget 320", entry)
	}
}

// hotPath is what the NFQUEUE loop does per packet: parse, look up, rewrite.
func hotPath(tab *Table, p *Packet, b []byte, csumComplete bool) Verdict {
	if p.Parse(b) != OK {
		return DropMalformed
	}
	e, d, ok := tab.Lookup(p.KeyOf())
	if !ok {
		return DropNoFlow
	}
	return e.Process(p, d, 1, csumComplete)
}

// benchPackets returns a flow table and a client and a server packet with
// the given payload, plus a function restoring them (the rewrite is in
// place and the sequence space must not run away from the window).
func benchSetup(tb testing.TB, payload int, partial bool) (*Table, [2][]byte) {
	f := newFixture(tb, false, true)
	tab := NewTable()
	if _, err := tab.Add(1, &f.p, 0); err != nil {
		tb.Fatal(err)
	}
	c := f.c2s(1000, 0xfffffff0, FlagACK)
	c.opts, c.payload, c.partial = tsOpt(1, 2), make([]byte, payload), partial
	s := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
	s.opts, s.payload, s.partial = tsOpt(3, 4), make([]byte, payload), partial
	return tab, [2][]byte{c.bytes(), s.bytes()}
}

// TestHotPathAllocatesNothing proves the per-packet path allocates nothing,
// for small and GSO-sized packets, complete and partial checksums.
func TestHotPathAllocatesNothing(t *testing.T) {
	for _, size := range []int{1, 1460, 65000} {
		for _, partial := range []bool{false, true} {
			tab, pkts := benchSetup(t, size, partial)
			orig := [2][]byte{bytes.Clone(pkts[0]), bytes.Clone(pkts[1])}
			var p Packet
			allocs := testing.AllocsPerRun(200, func() {
				for d := range 2 {
					copy(pkts[d], orig[d])
					if v := hotPath(tab, &p, pkts[d], !partial); v != Forward {
						t.Fatalf("verdict %v", v)
					}
				}
			})
			if allocs != 0 {
				t.Errorf("payload %d partial=%v: %v allocations per packet pair, want 0", size, partial, allocs)
			}
		}
	}
}

func benchmarkHotPath(b *testing.B, size int, partial bool, d Dir) {
	tab, pkts := benchSetup(b, size, partial)
	orig := bytes.Clone(pkts[d])
	var p Packet
	b.ReportAllocs()
	b.SetBytes(int64(len(orig)))
	b.ResetTimer()
	for b.Loop() {
		copy(pkts[d], orig) // the rewrite is in place
		if v := hotPath(tab, &p, pkts[d], !partial); v != Forward {
			b.Fatalf("verdict %v", v)
		}
	}
}

func BenchmarkRewrite1ByteC2S(b *testing.B)       { benchmarkHotPath(b, 1, false, C2S) }
func BenchmarkRewrite1ByteS2C(b *testing.B)       { benchmarkHotPath(b, 1, false, S2C) }
func BenchmarkRewrite1460C2S(b *testing.B)        { benchmarkHotPath(b, 1460, false, C2S) }
func BenchmarkRewrite1460S2C(b *testing.B)        { benchmarkHotPath(b, 1460, false, S2C) }
func BenchmarkRewriteGSO64KC2S(b *testing.B)      { benchmarkHotPath(b, 65000, true, C2S) }
func BenchmarkRewriteGSO64KS2C(b *testing.B)      { benchmarkHotPath(b, 65000, true, S2C) }
func BenchmarkRewrite64KCompleteC2S(b *testing.B) { benchmarkHotPath(b, 65000, false, C2S) }

// FuzzParse: Parse never panics, and what it accepts has consistent
// lengths.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		if p.Parse(b) != OK {
			return
		}
		tcp := p.TCP()
		if tcp.HeaderLen() < 20 || p.PayloadLen() < 0 || len(p.Segment()) != tcp.HeaderLen()+p.PayloadLen() {
			t.Fatalf("inconsistent parse")
		}
		_ = p.KeyOf()
	})
}

// FuzzRewrite runs the engine on arbitrary packets in both directions and
// both checksum modes. Invariants: no panic; a dropped packet and the flow
// are unchanged; a forwarded packet keeps its length, and its checksum is
// valid exactly when it was valid before (incremental) or always (full).
func FuzzRewrite(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s, byte(0))
		f.Add(s, byte(3))
	}
	f.Fuzz(func(t *testing.T, b []byte, mode byte) {
		var p Packet
		if p.Parse(b) != OK {
			return
		}
		fx := newFixture(t, p.IsIPv6(), mode&4 != 0)
		d := Dir(mode & 1)
		complete := mode&2 == 0
		// Make the packet one of the flow's, as the table lookup would.
		k := fx.e.Keys[d]
		p.setAddrs(&k.Src, &k.Dst)
		p.TCP().SetSrcPort(k.SrcPort)
		p.TCP().SetDstPort(k.DstPort)
		validBefore := segmentValid(&p)
		in := bytes.Clone(p.Bytes())
		before := fx.e.Snapshot()
		out := fx.e.Keys[1-d].Reverse()
		v := fx.e.Process(&p, d, 1, complete)
		if v != Forward {
			if !bytes.Equal(in, p.Bytes()) || fx.e.Snapshot() != before {
				t.Fatalf("verdict %v changed the packet or the flow", v)
			}
			return
		}
		if len(p.Bytes()) != len(in) {
			t.Fatal("length changed")
		}
		var q Packet
		if q.Parse(p.Bytes()) != OK {
			t.Fatal("rewritten packet no longer parses")
		}
		if k := q.KeyOf(); k != out {
			t.Fatalf("output tuple %v, want %v", k, out)
		}
		if valid := segmentValid(&q); valid != (validBefore || !complete) {
			t.Fatalf("checksum valid=%v after rewrite (before: %v, complete=%v)", valid, validBefore, complete)
		}
		if !q.IsIPv6() && refFold(refSum(q.Bytes()[:q.IPv4().HeaderLen()], 0)) != 0xffff && fx.e.flow.d[d].flags&dirAddrs != 0 {
			t.Fatal("IPv4 header checksum invalid after an address change")
		}
	})
}

func segmentValid(p *Packet) bool {
	seg := p.Segment()
	return refFold(refSum(seg, refPseudo(p.Src(), p.Dst(), len(seg)))) == 0xffff
}

// fuzzSeeds are packets of the fixture's flow with interesting options.
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
		mk(false, []byte{OptTimestamps, 0}, FlagACK, 1),                       // length 0
		mk(false, []byte{OptTimestamps, 1, 0, 0}, FlagACK, 1),                 // length 1
		mk(false, []byte{OptSACK, 40, 0, 0}, FlagACK, 1),                      // overlong
		mk(false, []byte{OptWindowScale, 3, 15, OptNOP}, FlagACK, 1),          // wscale > 14
		mk(false, append(tsOpt(1, 2), tsOpt(3, 4)...), FlagACK, 1),            // duplicate TS
		mk(false, []byte{OptSACK, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0}, FlagACK, 0), // SACK of a bad size
		mk(false, nil, FlagSYN, 0),
		mk(true, nil, FlagRST, 0),
		mk(false, nil, FlagFIN|FlagACK, 10),
	}
}
