package gateway

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
	"spliced/splice"
)

// TestPartitionForLeave: leave keeps the flows the program rewrites and
// resets the Go engine's unfinished ones; a flow whose promotion is under
// way is waited for (kept once the program has it), and one still in its
// handoff after the wait is reset with the Go engine's, never counted as
// the program's while it has no map entry (the negative control is the
// handoff left open with no promotion counted: the wait must not block).
func TestPartitionForLeave(t *testing.T) {
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	g := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	g.engine = splice.NewTable()
	add := func(i int) *splicedFlow {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i)}), uint16(10000+i))
		server := netip.MustParseAddrPort("10.2.0.2:80")
		f := proxy.NewFlow("leave", "forward", client, server)
		if !g.flows.Admit(f) { // gives the flow its ID
			t.Fatal("flow table full")
		}
		f.SetServerLeg(client, server)
		p := splice.Params{
			Client: splice.Conn{Local: server, Remote: client, SndNxt: 1, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000, MSS: 1448},
			Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000, MSS: 1448},
		}
		e, err := g.engine.Add(f.ID, &p, time.Now().UnixNano())
		if err != nil {
			t.Fatal(err)
		}
		g.addSpliced(f, e, 0, &p)
		return g.spliced[f.ID]
	}
	put := func(splice.State) error { return nil }
	onEngine := add(1)
	offloaded := add(2)
	if err := offloaded.entry.Offload(put); err != nil {
		t.Fatal(err)
	}
	// A promotion under way that completes while leave waits.
	promoted := add(3)
	if err := promoted.entry.BeginOffload(); err != nil {
		t.Fatal(err)
	}
	g.promotionsRunning.Add(1)
	waiting := make(chan struct{})
	go func() {
		<-waiting
		if err := promoted.entry.CompleteOffload(put); err != nil {
			t.Error(err)
		}
		g.promotionsRunning.Add(-1)
	}()
	// A handoff nobody completes (its promotion counted as over).
	stuck := add(4)
	if err := stuck.entry.BeginOffload(); err != nil {
		t.Fatal(err)
	}
	close(waiting)
	goEngine, kept := g.partitionForLeave(time.Minute)
	if kept != 2 {
		t.Errorf("kept %d flows for the program, want 2 (the offloaded one and the one promoted during the wait)", kept)
	}
	reset := map[*splicedFlow]bool{}
	for _, sf := range goEngine {
		reset[sf] = true
	}
	if len(goEngine) != 2 || !reset[onEngine] || !reset[stuck] {
		t.Errorf("reset %d flows (Go engine's: %v, stuck in its handoff: %v), want exactly those two", len(goEngine), reset[onEngine], reset[stuck])
	}
}
