package gateway

import (
	"testing"
	"time"

	"spliced/internal/monotime"
	"spliced/splice"
	"spliced/splice/bpf"
)

// idleOffloadedFlow loads the program's maps (the bpf datapath's, or the
// nfqueue datapath's record: the same maps) and adopts a flow from them
// whose last packet came now, as the bpf datapath's.
func idleOffloadedFlow(t *testing.T, g *Gateway, id uint64) (*bpf.Datapath, bpf.PinnedFlow, *splicedFlow) {
	t.Helper()
	dp, err := bpf.Load(bpf.Options{})
	if err != nil {
		t.Fatalf("load the bpf datapath: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	pf := futureFlow(t, id)
	pf.State.LastSeen = monotime.Now()
	pf.State.Dirs[splice.C2S].FINAt, pf.State.Dirs[splice.S2C].FINAt = 0, 0
	if err := dp.PutFlow(pf.ID, pf.Keys, pf.State); err != nil {
		t.Fatal(err)
	}
	sf, err := g.adoptOne(pf, time.Now(), 1, 0, false, g.engine)
	if err != nil {
		t.Fatal(err)
	}
	return dp, pf, sf
}

// TestReapReadsOffloadedFlowsEverySecond: the reaper reads the state of
// the flows on the bpf datapath at most once a second (offloadSyncEvery),
// not at each of its rounds.
func TestReapReadsOffloadedFlowsEverySecond(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	dp, pf, sf := idleOffloadedFlow(t, g, 5)
	g.kpath = &kernelPath{dp: dp}
	defer func() { g.kpath = nil }()
	start := time.Now()
	g.reap(start)
	// The flow's next packet, in the program's map.
	st := pf.State
	st.LastSeen += 1000
	if err := dp.PutFlow(pf.ID, pf.Keys, st); err != nil {
		t.Fatal(err)
	}
	g.reap(start.Add(250 * time.Millisecond))
	if got := sf.entry.Snapshot().LastSeen(); got == st.LastSeen {
		t.Error("the reaper read the program's state again within a second")
	}
	// A millisecond more: monotime.Of reads the clock twice, and two
	// times exactly a second apart may convert to a few ns less.
	g.reap(start.Add(offloadSyncEvery + time.Millisecond))
	if got := sf.entry.Snapshot().LastSeen(); got != st.LastSeen {
		t.Errorf("a second later the view's last packet is %d, want the program's %d", got, st.LastSeen)
	}
}

// TestSyncStoredSkipsUnchangedFlows: the nfqueue datapath's record of a
// flow is written again only when the flow moved since (a map update per
// flow and second, for every idle flow, was most of the daemon's idle
// CPU).
func TestSyncStoredSkipsUnchangedFlows(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	record, pf, sf := idleOffloadedFlow(t, g, 6)
	g.store = record
	sf.stored.Store(true)
	start := time.Now()
	g.syncStored(start)
	marker := pf.State
	marker.Dirs[splice.C2S].MaxWin = 12345
	if err := record.PutState(pf.ID, marker); err != nil {
		t.Fatal(err)
	}
	g.syncStored(start.Add(2 * storeSync))
	if got, err := record.Flow(pf.ID); err != nil || got.Dirs[splice.C2S].MaxWin != 12345 {
		t.Fatalf("the record of a flow that did not move was written again: %+v, %v", got.Dirs[splice.C2S], err)
	}
	// The flow moves (here through its view: it is the bpf datapath's).
	st := pf.State
	st.LastSeen += 1000
	sf.entry.SetSnapshot(st, monotime.Now())
	g.syncStored(start.Add(4 * storeSync))
	if got, err := record.Flow(pf.ID); err != nil || got.LastSeen != st.LastSeen || got.Dirs[splice.C2S].MaxWin == 12345 {
		t.Errorf("the record of a flow that moved: last seen %d, want %d (%v)", got.LastSeen, st.LastSeen, err)
	}
}
