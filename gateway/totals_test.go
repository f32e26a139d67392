package gateway

import (
	"net/netip"
	"testing"

	"spliced/api"
	"spliced/internal/monotime"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
)

// engineBytes returns the engines' byte totals of a status: proxy c2s,
// s2c, splice c2s, s2c.
func engineBytes(t *testing.T, g *Gateway) [4]uint64 {
	t.Helper()
	var out [4]uint64
	for _, e := range g.Status().Engines {
		switch e.Name {
		case "proxy":
			out[0], out[1] = e.BytesC2S, e.BytesS2C
		case "splice":
			out[2], out[3] = e.BytesC2S, e.BytesS2C
		}
	}
	return out
}

// TestEngineTotalsCountEachByteOnce: the engines' byte totals
// (spliced_bytes_total) count what each engine moved, once, and never
// fall. A flow that ended was counted twice while its proxy removed it
// (its bytes in the ended flows' total and still in the live sum), and
// the total fell back when it was gone; an unsplice moved the bytes the
// engine had moved for the flow to the proxy's total, so the splice
// engine's fell: Prometheus read each fall as a restart and counted the
// whole total again.
func TestEngineTotalsCountEachByteOnce(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	g.queues = &nfq.Set{}
	g.spliceOn.Store(true)
	client, server := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")

	// A proxied flow ends: the forwarder says so, then removes it.
	f1 := proxy.NewFlow("fwd", "forward", netip.MustParseAddrPort("10.1.0.3:40000"), server)
	if g.flows.Admit(f1) != nil {
		t.Fatal("flow table full")
	}
	f1.C2S.Add(100)
	f1.S2C.Add(200)
	if got, want := engineBytes(t, g), [4]uint64{100, 200, 0, 0}; got != want {
		t.Fatalf("a proxied flow: totals %v, want %v", got, want)
	}
	f1.SetState(proxy.StateClosing)
	g.forwarderEvent(proxy.EventClosed, f1, "")
	if got, want := engineBytes(t, g), [4]uint64{100, 200, 0, 0}; got != want {
		t.Errorf("the flow closed, not yet removed: totals %v, want %v", got, want)
	}
	g.flows.Remove(f1)
	if got, want := engineBytes(t, g), [4]uint64{100, 200, 0, 0}; got != want {
		t.Errorf("the flow removed: totals %v, want %v", got, want)
	}

	// A flow proxied for 10 bytes each way, spliced for 1000 from the
	// server, then given back to its proxy.
	f2 := proxy.NewFlow("fwd", "forward", client, server)
	if g.flows.Admit(f2) != nil {
		t.Fatal("flow table full")
	}
	f2.C2S.Add(10)
	f2.S2C.Add(10)
	f2.SetServerLeg(client, server)
	k := [2]splice.Key{splice.KeyFrom(client, server), splice.KeyFrom(server, client)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1000, RcvNxt: 5000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := g.engine.Add(f2.ID, &p, monotime.Now())
	if err != nil {
		t.Fatal(err)
	}
	g.addSpliced(f2, e, 0, &p)
	f2.SetState(proxy.StateSpliced)
	h := &packetHandler{g: g}
	if d := h.handle(&nfq.Packet{Data: dataPacket(server, client, 5000, 1000, make([]byte, 1000), false)}); d != nfq.AcceptModified {
		t.Fatalf("the server's data: %v, want it forwarded", d)
	}
	if got, want := engineBytes(t, g), [4]uint64{110, 210, 0, 1000}; got != want {
		t.Fatalf("spliced: totals %v, want %v", got, want)
	}
	// Unsplice's point of no return: the engine lets go of the flow,
	// whose counters take what the engine moved.
	g.splicedMu.Lock()
	delete(g.spliced, f2.ID)
	g.splicedMu.Unlock()
	g.engine.Delete(e)
	g.foldUnspliced(f2, e.Stats())
	f2.SetState(proxy.StateProxied)
	if f2.S2C.Load() != 1010 {
		t.Errorf("the flow's own count: %d bytes from the server, want 1010", f2.S2C.Load())
	}
	if got, want := engineBytes(t, g), [4]uint64{110, 210, 0, 1000}; got != want {
		t.Errorf("unspliced: totals %v, want %v", got, want)
	}
	f2.C2S.Add(5) // proxied again
	f2.SetState(proxy.StateClosing)
	g.forwarderEvent(proxy.EventClosed, f2, "")
	g.flows.Remove(f2)
	if got, want := engineBytes(t, g), [4]uint64{115, 210, 0, 1000}; got != want {
		t.Errorf("ended: totals %v, want %v", got, want)
	}
	var st api.Status = g.Status()
	if st.Engines[1].PacketsS2C != 1 {
		t.Errorf("splice engine packets s2c %d, want 1 (the flow's, which ended)", st.Engines[1].PacketsS2C)
	}
}

// TestTotalsFloor: a total read while a flow is between the live sum
// and the ended flows' total falls short; the totals reported never
// fall.
func TestTotalsFloor(t *testing.T) {
	var tt totals
	for i, c := range []struct{ in, want uint64 }{{5, 5}, {3, 5}, {5, 5}, {9, 9}, {0, 9}} {
		if got := tt.floor(totalSpliceC2S, c.in); got != c.want {
			t.Errorf("step %d: floor(%d) = %d, want %d", i, c.in, got, c.want)
		}
	}
	if got := tt.floor(totalProxyC2S, 1); got != 1 {
		t.Errorf("another total: %d, want 1", got)
	}
}
