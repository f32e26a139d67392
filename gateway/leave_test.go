package gateway

import (
	"io"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/proxy"
	"spliced/splice"
)

// TestPartitionForLeave: leave keeps the flows the program rewrites and
// resets the Go engine's unfinished ones, and a flow still in its handoff
// (no map entry yet) goes with the Go engine's, never counted as the
// program's. The negative control, by hand: counting a handoff as
// offloaded (Offloaded alone) fails it.
func TestPartitionForLeave(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	add := func(i int) *splicedFlow {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i)}), uint16(10000+i))
		server := netip.MustParseAddrPort("10.2.0.2:80")
		f := proxy.NewFlow("leave", "forward", client, server)
		if g.flows.Admit(f) != nil { // gives the flow its ID
			t.Fatal("flow table full")
		}
		f.SetServerLeg(client, server)
		p := splice.Params{
			Client: splice.Conn{Local: server, Remote: client, SndNxt: 1, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000, MSS: 1448},
			Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000, MSS: 1448},
		}
		e, err := g.engine.Add(f.ID, &p, monotime.Now())
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
	// A handoff nobody completes (a transition leave gave up on).
	stuck := add(3)
	if err := stuck.entry.BeginOffload(); err != nil {
		t.Fatal(err)
	}
	goEngine, kept := g.partitionForLeave()
	if kept != 1 {
		t.Errorf("kept %d flows for the program, want 1 (the offloaded one)", kept)
	}
	reset := map[*splicedFlow]bool{}
	for _, sf := range goEngine {
		reset[sf] = true
	}
	if len(goEngine) != 2 || !reset[onEngine] || !reset[stuck] {
		t.Errorf("reset %d flows (Go engine's: %v, stuck in its handoff: %v), want exactly those two", len(goEngine), reset[onEngine], reset[stuck])
	}
}

// TestPartitionForLeaveRecorded: on the nfqueue datapath, leave (SIGUSR2)
// keeps the flows in the record for the next daemon, and resets those
// the record lacks (its write failed): nobody would continue them.
func TestPartitionForLeaveRecorded(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	var flows []*splicedFlow
	for i := range 3 {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i + 1)}), uint16(10000+i))
		server := netip.MustParseAddrPort("10.2.0.2:80")
		f := proxy.NewFlow("leave", "forward", client, server)
		if g.flows.Admit(f) != nil {
			t.Fatal("flow table full")
		}
		f.SetServerLeg(client, server)
		p := splice.Params{
			Client: splice.Conn{Local: server, Remote: client, SndNxt: 1, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000, MSS: 1448},
			Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000, MSS: 1448},
		}
		e, err := g.engine.Add(f.ID, &p, monotime.Now())
		if err != nil {
			t.Fatal(err)
		}
		g.addSpliced(f, e, 0, &p)
		flows = append(flows, g.spliced[f.ID])
	}
	flows[0].stored.Store(true)
	flows[1].stored.Store(true)
	goEngine, kept := g.partitionForLeave()
	if kept != 2 {
		t.Errorf("kept %d recorded flows, want 2", kept)
	}
	if len(goEngine) != 1 || goEngine[0] != flows[2] {
		t.Errorf("reset %d flows, want the one not recorded", len(goEngine))
	}
}

// TestAwaitNone: leave's wait for transitions returns once the last one
// ends, and gives up (false) when one never does.
func TestAwaitNone(t *testing.T) {
	var n atomic.Int32
	n.Add(2)
	go func() {
		n.Add(-1)
		n.Add(-1)
	}()
	if !awaitNone(&n, time.Minute) {
		t.Fatal("gave up with no transition left")
	}
	n.Add(1)
	if awaitNone(&n, 10*time.Millisecond) || n.Load() != 1 {
		t.Fatal("a transition that never ends was not waited out")
	}
}

// TestRunTransitionCounts: a transition counts until its work returns.
func TestRunTransitionCounts(t *testing.T) {
	g := quietGateway(t)
	release := make(chan struct{})
	started := make(chan struct{})
	g.runTransition(func() {
		close(started)
		<-release
	})
	<-started
	if n := g.transitionsRunning.Load(); n != 1 {
		t.Errorf("%d transitions running during one, want 1", n)
	}
	close(release)
	if !awaitNone(&g.transitionsRunning, time.Minute) {
		t.Error("the transition stayed counted after it returned")
	}
}

// quietGateway is a gateway with the default configuration that logs
// nowhere, for unit tests of its bookkeeping; its transition workers end
// with the test.
func quietGateway(t *testing.T) *Gateway {
	t.Helper()
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	g := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(g.workers.Close)
	return g
}
