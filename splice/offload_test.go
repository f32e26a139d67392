package splice

import (
	"errors"
	"testing"
)

// TestEntryOffload: while a flow is offloaded the engine refuses its
// packets and changes nothing; Offload hands over the state every
// processed packet left, Reclaim takes another datapath's state back
// (counting the stream bytes it moved), and a failed put or get leaves
// the flow where it was.
func TestEntryOffload(t *testing.T) {
	f := newFixture(t, false, true)
	e := f.e
	data := func(seq uint32, n int) []byte {
		s := f.c2s(seq, 0xfffffff0, FlagACK)
		s.opts, s.payload = tsOpt(10, 900000), make([]byte, n)
		return s.bytes()
	}
	var p Packet
	if p.Parse(data(1000, 100)) != OK {
		t.Fatal("parse")
	}
	if v, ok := e.TryProcess(&p, C2S, 1, true); !ok || v != Forward {
		t.Fatalf("TryProcess before offload: %v %v", v, ok)
	}
	if err := e.Offload(func(State) error { return errors.New("no") }); err == nil || e.Offloaded() {
		t.Fatalf("a failed put offloaded the flow (%v)", err)
	}
	var handed State
	if err := e.Offload(func(s State) error { handed = s; return nil }); err != nil || !e.Offloaded() {
		t.Fatalf("offload: %v", err)
	}
	if handed != stateOf(e) || handed.Dirs[C2S].SndNxt != 1100 {
		t.Fatalf("handed state %+v, want the engine's with snd_nxt 1100", handed.Dirs[C2S])
	}
	if err := e.Offload(func(State) error { return nil }); err == nil {
		t.Fatal("offloaded twice")
	}
	before := e.Snapshot()
	if p.Parse(data(1100, 100)) != OK {
		t.Fatal("parse")
	}
	if _, ok := e.TryProcess(&p, C2S, 2, true); ok {
		t.Fatal("TryProcess processed a packet of an offloaded flow")
	}
	if e.Snapshot() != before {
		t.Fatal("a refused packet changed the state")
	}
	// The other datapath forwarded 300 more bytes.
	moved := handed
	moved.Dirs[C2S].SndNxt = 1400
	e.SetSnapshot(moved, 3)
	if st := e.Stats(); st[C2S].Bytes != 400 {
		t.Fatalf("bytes after the snapshot: %d, want 400", st[C2S].Bytes)
	}
	if _, err := e.Reclaim(func() (State, error) { return State{}, errors.New("no") }, 4); err == nil || !e.Offloaded() {
		t.Fatalf("a failed get reclaimed the flow (%v)", err)
	}
	moved.Dirs[C2S].SndNxt = 1500
	if demoted, err := e.Reclaim(func() (State, error) { return moved, nil }, 5); err != nil || !demoted || e.Offloaded() {
		t.Fatalf("reclaim: %v", err)
	}
	if stateOf(e) != moved || e.Stats()[C2S].Bytes != 500 {
		t.Fatalf("after reclaim: state %+v bytes %d", stateOf(e).Dirs[C2S], e.Stats()[C2S].Bytes)
	}
	e.SetSnapshot(handed, 6) // ignored: the engine runs the flow again
	if stateOf(e) != moved {
		t.Fatal("SetSnapshot changed a flow the engine runs")
	}
	if p.Parse(data(1500, 100)) != OK {
		t.Fatal("parse")
	}
	if v, ok := e.TryProcess(&p, C2S, 7, true); !ok || v != Forward || e.HighestSeq(C2S) != 1600 {
		t.Fatalf("TryProcess after reclaim: %v %v, highest %d", v, ok, e.HighestSeq(C2S))
	}
}

func stateOf(e *Entry) State {
	f := e.Snapshot()
	return f.State()
}

// TestTableAdopt: a flow adopted from another datapath's state is in the
// table under both keys, offloaded (its packets refused) until Reclaim,
// which gives the engine that state; a key already taken refuses it.
func TestTableAdopt(t *testing.T) {
	f := newFixture(t, false, true)
	st := stateOf(f.e)
	tab := NewTable()
	e, err := tab.Adopt(7, f.e.Keys, st, 1)
	if err != nil {
		t.Fatal(err)
	}
	if !e.Offloaded() || stateOf(e) != st || tab.Len() != 1 {
		t.Fatalf("adopted: offloaded %v, state equal %v, len %d", e.Offloaded(), stateOf(e) == st, tab.Len())
	}
	for d, k := range f.e.Keys {
		if got, dir, ok := tab.Lookup(k); !ok || got != e || dir != Dir(d) {
			t.Fatalf("lookup %v: %v %v %v", k, got, dir, ok)
		}
	}
	var p Packet
	s := f.c2s(1000, 0xfffffff0, FlagACK)
	s.opts, s.payload = tsOpt(10, 900000), make([]byte, 100)
	if p.Parse(s.bytes()) != OK {
		t.Fatal("parse")
	}
	if _, ok := e.TryProcess(&p, C2S, 2, true); ok {
		t.Fatal("an adopted flow's packet was processed before Reclaim")
	}
	if _, err := e.Reclaim(func() (State, error) { return st, nil }, 3); err != nil || e.Offloaded() {
		t.Fatalf("reclaim: %v", err)
	}
	if v, ok := e.TryProcess(&p, C2S, 4, true); !ok || v != Forward {
		t.Fatalf("after reclaim: %v %v", v, ok)
	}
	if _, err := tab.Adopt(8, f.e.Keys, st, 5); err == nil {
		t.Fatal("adopted a flow whose tuples belong to another")
	}
	if _, err := NewTable().Adopt(9, [2]Key{f.e.Keys[0], f.e.Keys[0]}, st, 5); err == nil {
		t.Fatal("adopted a flow with one tuple for both directions")
	}
}

// TestEntryPinRefusesOffload: a pinned flow (an unsplice is taking it
// back) is never offloaded, and put is not even called; Unpin allows it
// again.
func TestEntryPinRefusesOffload(t *testing.T) {
	e := newFixture(t, false, false).e
	e.Pin()
	called := false
	if err := e.Offload(func(State) error { called = true; return nil }); !errors.Is(err, ErrPinned) || called || e.Offloaded() {
		t.Fatalf("offload of a pinned flow: err %v, put called %v, offloaded %v", err, called, e.Offloaded())
	}
	e.Unpin()
	if err := e.Offload(func(State) error { return nil }); err != nil || !e.Offloaded() {
		t.Fatalf("offload after Unpin: %v", err)
	}
}

// TestEntryHandoff: between BeginOffload and CompleteOffload the engine
// refuses the flow's packets and changes nothing, so the state handed
// over is the one its last packet left. Reclaim never waits for the
// handoff (one may run on the queue reader the handoff waits for): a
// pinned flow (an unsplice) is the engine's already, the pin turns the
// handoff back, put is never called, and the engine processes the
// flow's packets again; an unpinned one is nobody's yet (ErrHandoff),
// the handoff ends offloaded, and a Reclaim then takes it back.
func TestEntryHandoff(t *testing.T) {
	for _, pin := range []bool{true, false} {
		f := newFixture(t, false, true)
		e := f.e
		data := func(seq uint32) *Packet {
			s := f.c2s(seq, 0xfffffff0, FlagACK)
			s.opts, s.payload = tsOpt(10, 900000), make([]byte, 100)
			var p Packet
			if p.Parse(s.bytes()) != OK {
				t.Fatal("parse")
			}
			return &p
		}
		want := stateOf(e)
		if err := e.BeginOffload(); err != nil {
			t.Fatal(err)
		}
		if err := e.BeginOffload(); !errors.Is(err, ErrOffloaded) {
			t.Fatalf("a second handoff during the first: %v", err)
		}
		before := e.Snapshot()
		if _, ok := e.TryProcess(data(1000), C2S, 1, true); ok || !e.Offloaded() || !e.HandingOff() {
			t.Fatalf("during the handoff: processed %v, offloaded %v", ok, e.Offloaded())
		}
		if e.Snapshot() != before {
			t.Fatal("a refused packet changed the state")
		}
		if pin {
			e.Pin()
		}
		get := func() (State, error) { return want, nil }
		demoted, err := e.Reclaim(get, 2)
		if pin && (demoted || err != nil) || !pin && (demoted || !errors.Is(err, ErrHandoff)) {
			t.Fatalf("pin %v: Reclaim during the handoff: demoted %v, %v", pin, demoted, err)
		}
		if _, ok := e.TryProcess(data(1000), C2S, 2, true); ok {
			t.Fatal("the engine processed a packet before the handoff ended")
		}
		called := false
		err = e.CompleteOffload(func(s State) error {
			called = true
			if s != want {
				t.Error("the handed state is not the engine's")
			}
			return nil
		})
		if pin && (!errors.Is(err, ErrPinned) || called || e.Offloaded()) || !pin && (err != nil || !called || !e.Offloaded()) {
			t.Fatalf("pin %v: CompleteOffload: %v, put called %v, offloaded %v", pin, err, called, e.Offloaded())
		}
		if !pin {
			if demoted, err := e.Reclaim(get, 3); !demoted || err != nil || e.Offloaded() {
				t.Fatalf("Reclaim after the handoff: demoted %v, %v", demoted, err)
			}
		}
		if v, ok := e.TryProcess(data(1000), C2S, 4, true); !ok || v != Forward {
			t.Fatalf("pin %v: the engine does not take the flow's packets again: %v %v", pin, v, ok)
		}
		if err := e.CompleteOffload(func(State) error { return nil }); err == nil {
			t.Fatal("CompleteOffload without BeginOffload")
		}
	}
}

// TestEntryHandoffGone: a flow deleted from its table (retired) during a
// handoff is not handed over (ErrGone: nobody would retire it from the
// other datapath), and one deleted before is not even begun.
func TestEntryHandoffGone(t *testing.T) {
	f := newFixture(t, false, true)
	tab := NewTable()
	e, err := tab.Add(7, &f.p, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.BeginOffload(); err != nil {
		t.Fatal(err)
	}
	tab.Delete(e)
	called := false
	if err := e.CompleteOffload(func(State) error { called = true; return nil }); !errors.Is(err, ErrGone) || called || e.Offloaded() {
		t.Fatalf("handoff of a deleted flow: err %v, put called %v, offloaded %v", err, called, e.Offloaded())
	}
	if err := e.Offload(func(State) error { called = true; return nil }); !errors.Is(err, ErrGone) || called {
		t.Fatalf("offload of a deleted flow: err %v, put called %v", err, called)
	}
}
