package gateway

import (
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/proxy"
	"spliced/splice"
)

// promotedFlowBytes bounds what the daemon holds per flow promoted to the
// bpf datapath (Go heap, after a collection): the proxy's flow, its
// entries in the flow table, the engine's entry and table slots, the
// gateway's record and its map slot. The program's map elements (the
// kernel's, measured by make bench) come on top. Measured on amd64 with go1.26:
// 1,056 bytes; 1,675 before the gateway's record was made compact
// (commit 561c628, the same test). What is left is mostly the proxy's
// flow (320 bytes), the engine's entry (320) and the engine table's two
// slots: a promoted flow keeps its Go engine entry (see datapath.go).
const promotedFlowBytes = 1200

// TestPromotedFlowMemory builds thousands of spliced flows as Splice and
// promote leave them on the bpf datapath (without the kernel: the
// offload writes nothing) and measures the Go heap they hold.
func TestPromotedFlowMemory(t *testing.T) {
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Limits.MaxFlows = 1 << 20
	const n = 4000
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	g := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	g.engine = splice.NewTable()
	now := time.Now()
	for i := range n {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), uint16(10000+i))
		server := netip.MustParseAddrPort("10.2.0.2:80")
		f := proxy.NewFlow("mem", "forward", client, server)
		if g.flows.Admit(f) != nil {
			t.Fatal("flow table full")
		}
		f.SetServerLeg(client, server)
		// What the forwarder leaves: a resume function that holds the flow.
		f.SetResume(func(c, u *net.TCPConn) { _ = f.ID })
		p := splice.Params{
			Client: splice.Conn{Local: server, Remote: client, SndNxt: splice.Seq(i), RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000,
				SndWscale: 7, RcvWscale: 7, MSS: 1448, SACK: true, Timestamps: true, TSval: 5000},
			Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000,
				SndWscale: 7, RcvWscale: 7, MSS: 1448, SACK: true, Timestamps: true, TSval: 900000},
		}
		e, err := g.engine.Add(f.ID, &p, monotime.Of(now))
		if err != nil {
			t.Fatal(err)
		}
		g.addSpliced(f, e, uint16(i%2), &p)
		if err := e.Offload(func(splice.State) error { return nil }); err != nil {
			t.Fatal(err)
		}
		f.SplicedAt.Store(monotime.Of(now))
		f.SetState(proxy.StateSpliced)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
	t.Logf("%d promoted flows: %.0f bytes each (proxy.Flow %d, splice.Entry %d, splicedFlow %d; struct sizes before size classes)",
		n, per, unsafe.Sizeof(proxy.Flow{}), unsafe.Sizeof(splice.Entry{}), unsafe.Sizeof(splicedFlow{}))
	if per > promotedFlowBytes {
		t.Errorf("a promoted flow holds %.0f bytes of Go heap, more than %d", per, promotedFlowBytes)
	}
	// Everything still reachable: the flows are in the tables.
	if g.flows.Len() != n || g.engine.Len() != n || len(g.spliced) != n {
		t.Fatalf("flows %d, engine %d, spliced %d; want %d", g.flows.Len(), g.engine.Len(), len(g.spliced), n)
	}
	runtime.KeepAlive(g)
}
