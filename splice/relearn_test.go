package splice

import (
	"encoding/binary"
	"testing"
)

// TestRelearn: a flow adopted from an old record of its state (the ends
// moved megabytes on since) forwards the ends' packets, relearns each
// direction's tracking state from the receiver's first acknowledgment,
// and checks strictly from then on. Without Relearn the same packets
// are dropped.
func TestRelearn(t *testing.T) {
	const cMoved, sMoved = 10_000_000, 5_000_000 // bytes each end sent since the record
	clientData := func(f *fixture, off uint32) []byte {
		s := f.c2s(1000+off, uint32(Seq(0xfffffff0).Add(sMoved)), FlagACK)
		s.payload = []byte("x")
		return s.bytes()
	}
	serverData := func(f *fixture, off uint32) []byte {
		s := f.s2c(uint32(Seq(0xffffff00).Add(off)), 0x7ffffff0+cMoved+1, FlagACK)
		s.payload = []byte("y")
		return s.bytes()
	}

	stale := newFixture(t, false, false)
	if v := stale.run(t, clientData(stale, cMoved), C2S, true); v != DropSeq {
		t.Fatalf("old record without Relearn: %v, want %v", v, DropSeq)
	}

	f := newFixture(t, false, false)
	e, err := NewTable().AdoptRelearn(1, f.e.Keys, snapState(f.e), 7)
	if err != nil {
		t.Fatal(err)
	}
	f.e = e
	for d := range 2 {
		if w := e.Snapshot().d[d].maxWin; w != 0xffff<<7 {
			t.Errorf("%v: largest window %d after adoption, want %d", Dir(d), w, 0xffff<<7)
		}
	}
	if snap := e.Snapshot(); !snap.Relearning(C2S) || !snap.Relearning(S2C) || snap.LastSeen() != 7 || e.Offloaded() {
		t.Fatalf("adopted: relearning %v/%v, last seen %d, offloaded %v", snap.Relearning(C2S), snap.Relearning(S2C), snap.LastSeen(), e.Offloaded())
	}
	// Behind the record: still dropped.
	if v := f.run(t, f.c2s(uint32(Seq(1000).Sub(20_000_000)), 0xfffffff0, FlagACK).bytes(), C2S, true); v != DropSeq {
		t.Fatalf("data behind the record: %v, want %v", v, DropSeq)
	}
	// The client's new data, acknowledging what the server sent since.
	if v := f.run(t, clientData(f, cMoved), C2S, true); v != Forward {
		t.Fatalf("client data after the record: %v, want %v", v, Forward)
	}
	snap := e.Snapshot()
	if !snap.Relearning(C2S) || snap.Relearning(S2C) || snap.Info(S2C).HighestAck != Seq(0xffffff00).Add(sMoved) {
		t.Fatalf("after the client's ACK: relearning %v/%v, s2c %+v", snap.Relearning(C2S), snap.Relearning(S2C), snap.Info(S2C))
	}
	// The server's direction is current again: data beyond the client's
	// window is dropped, data at its rcv_nxt passes.
	if v := f.run(t, serverData(f, sMoved+20_000_000), S2C, true); v != DropSeq {
		t.Fatalf("server data beyond the relearned window: %v, want %v", v, DropSeq)
	}
	if v := f.run(t, serverData(f, sMoved), S2C, true); v != Forward {
		t.Fatalf("server data at the client's rcv_nxt: %v, want %v", v, Forward)
	}
	snap = e.Snapshot()
	if snap.Relearning(C2S) || snap.Info(C2S).HighestAck != Seq(1000+cMoved+1) {
		t.Fatalf("after the server's ACK: relearning c2s %v, c2s %+v", snap.Relearning(C2S), snap.Info(C2S))
	}
	if v := f.run(t, clientData(f, cMoved+1+20_000_000), C2S, true); v != DropSeq {
		t.Fatalf("client data beyond the relearned window: %v, want %v", v, DropSeq)
	}
	// Lossless through State.
	if g := FlowFromState(snapState(e)); g != snap {
		t.Fatalf("state round trip: %+v != %+v", g, snap)
	}
	st := snapState(e)
	st.Relearn = [2]bool{true, false}
	if g := FlowFromState(st); !g.Relearning(C2S) || g.Relearning(S2C) {
		t.Fatal("State.Relearn not carried")
	}
}

func snapState(e *Entry) State {
	f := e.Snapshot()
	return f.State()
}

// TestRelearnAcrossAHole: the earlier daemon forwarded the client's data
// past the record, but one segment of it never reached the server, which
// holds the rest out of order and says so in SACK blocks. When the client
// retransmits the missing segment, the server acknowledges everything at
// once, far beyond what the adopted flow saw forwarded. That ACK must pass
// (dropped, the client never learns the data arrived, retransmits the
// same segment for ever and the flow stalls: seen in the 1000-flow restart
// test); the direction stays relearning until an ACK shows no hole.
func TestRelearnAcrossAHole(t *testing.T) {
	const moved = 3_000_000 // client bytes the earlier daemon forwarded past the record
	hole := Seq(1000).Add(moved - 3000)
	end := Seq(1000).Add(moved)
	f := newFixture(t, false, false)
	e, err := NewTable().AdoptRelearn(1, f.e.Keys, snapState(f.e), 7)
	if err != nil {
		t.Fatal(err)
	}
	f.e = e
	seqOff := uint32(0x7ffffff0 - 1000) // the client's data on the server's leg
	sack := func(left, right Seq) []byte {
		o := []byte{OptNOP, OptNOP, OptSACK, 10, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(o[4:], uint32(left)+seqOff)
		binary.BigEndian.PutUint32(o[8:], uint32(right)+seqOff)
		return o
	}
	// The server's duplicate ACK of the hole, with the block it holds.
	dup := f.s2c(0xffffff00, uint32(hole)+seqOff, FlagACK)
	dup.opts = sack(hole.Add(1000), end)
	if v := f.run(t, dup.bytes(), S2C, true); v != Forward {
		t.Fatalf("the server's duplicate ACK: %v, want %v", v, Forward)
	}
	if !e.Snapshot().Relearning(C2S) {
		t.Fatal("an ACK with a hole behind its SACK block ended the relearning")
	}
	// The client retransmits the missing segment.
	re := f.c2s(uint32(hole), 0xfffffff0, FlagACK)
	re.payload = make([]byte, 1000)
	if v := f.run(t, re.bytes(), C2S, true); v != Forward {
		t.Fatalf("the retransmission: %v, want %v", v, Forward)
	}
	// The server now has everything and acknowledges it.
	all := f.s2c(0xffffff00, uint32(end)+seqOff, FlagACK)
	if v := f.run(t, all.bytes(), S2C, true); v != Forward {
		t.Fatalf("the server's ACK of all it holds: %v, want %v", v, Forward)
	}
	snap := e.Snapshot()
	if snap.Relearning(C2S) || snap.Info(C2S).HighestAck != end || snap.Info(C2S).HighestSeq != end {
		t.Fatalf("after the ACK of everything: relearning %v, c2s %+v", snap.Relearning(C2S), snap.Info(C2S))
	}
	// Current again: an ACK of data nobody sent is dropped.
	beyond := f.s2c(0xffffff00, uint32(end.Add(100_000))+seqOff, FlagACK)
	if v := f.run(t, beyond.bytes(), S2C, true); v != DropAck {
		t.Fatalf("an ACK beyond the data: %v, want %v", v, DropAck)
	}
}

// TestRelearnForgedFarAhead: while an adopted flow relearns, a blind
// attacker's packet on its tuple far ahead of the record (1 GiB on both
// numbers) lies beyond anything the ends can have sent: nothing was
// forwarded while no daemon ran, so each sender went at most a window
// past what reached it, and the earlier daemon forwarded at most a
// second's worth (relearnSlack) past the record. It is dropped and
// changes nothing. Before, any sequence and acknowledgment number
// within 2^31 of the record passed (one guess in four): such a pure ACK
// was forwarded and ended the relearning at the forged numbers, after
// which the client's real data was dropped (drop_seq) and the server's
// real ACK too (drop_ack): the flow was dead.
func TestRelearnForgedFarAhead(t *testing.T) {
	gib := uint32(1 << 30)                       // a variable: the sums wrap modulo 2^32
	const cMoved, sMoved = 10_000_000, 5_000_000 // what the ends really sent since the record
	f := newFixture(t, false, false)
	e, err := NewTable().AdoptRelearn(1, f.e.Keys, snapState(f.e), 7)
	if err != nil {
		t.Fatal(err)
	}
	f.e = e
	adopted := e.Snapshot()
	data := func(s seg) []byte {
		s.payload = []byte("forged")
		return s.bytes()
	}
	for _, tc := range []struct {
		name string
		b    []byte
		d    Dir
		want Verdict
	}{
		{"the client's pure ACK, both numbers ahead", f.c2s(1000+gib, 0xfffffff0+gib, FlagACK).bytes(), C2S, DropSeq},
		{"the server's pure ACK, both numbers ahead", f.s2c(0xffffff00+gib, 0x7ffffff0+gib, FlagACK).bytes(), S2C, DropSeq},
		{"the client's pure ACK, its ACK ahead", f.c2s(1000, 0xfffffff0+gib, FlagACK).bytes(), C2S, DropAck},
		{"the server's pure ACK, its ACK ahead", f.s2c(0xffffff00, 0x7ffffff0+gib, FlagACK).bytes(), S2C, DropAck},
		{"the client's data ahead", data(f.c2s(1000+gib, 0xfffffff0, FlagACK)), C2S, DropSeq},
		{"the server's data ahead", data(f.s2c(0xffffff00+gib, 0x7ffffff0, FlagACK)), S2C, DropSeq},
		{"the client's RST ahead", f.c2s(1000+gib, 0, FlagRST).bytes(), C2S, DropRST},
		{"the server's RST ahead", f.s2c(0xffffff00+gib, 0, FlagRST).bytes(), S2C, DropRST},
	} {
		if v := f.run(t, tc.b, tc.d, true); v != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, v, tc.want)
		}
		if snap := e.Snapshot(); snap != adopted {
			t.Fatalf("%s changed the flow: %+v, want %+v", tc.name, snap, adopted)
		}
	}

	// The ends' real packets relearn the flow as before.
	cd := f.c2s(1000+cMoved, uint32(Seq(0xfffffff0).Add(sMoved)), FlagACK)
	cd.payload = []byte("x")
	if v := f.run(t, cd.bytes(), C2S, true); v != Forward {
		t.Fatalf("the client's real data: %v, want %v", v, Forward)
	}
	sd := f.s2c(uint32(Seq(0xffffff00).Add(sMoved)), 0x7ffffff0+cMoved+1, FlagACK)
	sd.payload = []byte("y")
	if v := f.run(t, sd.bytes(), S2C, true); v != Forward {
		t.Fatalf("the server's real data and ACK: %v, want %v", v, Forward)
	}
	snap := e.Snapshot()
	if snap.Relearning(C2S) || snap.Relearning(S2C) || snap.Info(C2S).HighestAck != Seq(1000+cMoved+1) || snap.Info(S2C).HighestAck != Seq(0xffffff00).Add(sMoved) {
		t.Fatalf("after the real packets: relearning %v/%v, c2s %+v, s2c %+v", snap.Relearning(C2S), snap.Relearning(S2C), snap.Info(C2S), snap.Info(S2C))
	}
}

// TestRelearnReach: a relearning direction's packets pass up to the
// furthest its sender can have sent (a window past the record's
// acknowledgment, and the earlier daemon's last second, relearnSlack),
// and its receiver's acknowledgment as far; one byte beyond, they are
// dropped.
func TestRelearnReach(t *testing.T) {
	adopt := func() *fixture {
		f := newFixture(t, false, false)
		e, err := NewTable().AdoptRelearn(1, f.e.Keys, snapState(f.e), 7)
		if err != nil {
			t.Fatal(err)
		}
		f.e = e
		return f
	}
	reach := uint32(0xffff<<7 + relearnSlack) // the fixture's scales are 7
	for _, tc := range []struct {
		beyond     uint32
		seqV, ackV Verdict
	}{{0, Forward, Forward}, {1, DropSeq, DropAck}} {
		f := adopt()
		if v := f.run(t, f.c2s(1000+reach+tc.beyond, 0xfffffff0, FlagACK).bytes(), C2S, true); v != tc.seqV {
			t.Errorf("the client's ACK %d beyond the reach: %v, want %v", tc.beyond, v, tc.seqV)
		}
		f = adopt()
		if v := f.run(t, f.s2c(0xffffff00, 0x7ffffff0+reach+tc.beyond, FlagACK).bytes(), S2C, true); v != tc.ackV {
			t.Errorf("the server's acknowledgment %d beyond the reach: %v, want %v", tc.beyond, v, tc.ackV)
		}
	}
	// Clamped below 2^31 ahead of the lower bounds: with the largest
	// window scale, a packet just at the record's lower bound passes.
	var s dirState
	s.sndNxt, s.ackSeen, s.maxWin = 5000, 5000, maxWindow
	if top, lower := s.relearnTop(), s.sndNxt.Sub(maxWindow); !lower.LessThan(top) || lower.Size(top) >= 1<<31 {
		t.Fatalf("reach %#x from the lower bound %#x: not below 2^31", lower.Size(top), uint32(lower))
	}
}
