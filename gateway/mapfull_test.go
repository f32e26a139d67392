package gateway

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"spliced/internal/monotime"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
	"spliced/splice/bpf"
	"spliced/testnet"
)

// lockedBuffer is a log destination for several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// fillFlowMaps fills the flow maps of dp (65,536 flows) with flows of
// IDs from 1<<40 on.
func fillFlowMaps(t *testing.T, dp *bpf.Datapath) {
	t.Helper()
	server := netip.MustParseAddrPort("10.3.0.2:80")
	for i := range 1 << 16 {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 4, byte(i >> 8), byte(i)}), 40000)
		keys := [2]splice.Key{splice.KeyFrom(client, server), splice.KeyFrom(server, client)}
		if err := dp.PutFlow(1<<40+uint64(i), keys, splice.State{LastSeen: monotime.Now()}); err != nil {
			t.Fatalf("flow %d of 65536: %v", i, err)
		}
	}
}

// splicedFlowFor builds spliced flow id in g's engine and spliced flows.
func splicedFlowFor(t *testing.T, g *Gateway, id uint64) *splicedFlow {
	t.Helper()
	c := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(id >> 8), byte(id)}), 40000)
	s := netip.MustParseAddrPort("10.2.0.2:80")
	k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := g.engine.Add(id, &p, monotime.Now())
	if err != nil {
		t.Fatal(err)
	}
	f := &proxy.Flow{ID: id, Service: "svc", Proxy: "forward"}
	f.SetState(proxy.StateSpliced)
	sf := &splicedFlow{flow: f, entry: e, splicedAt: monotime.Now()}
	g.splicedMu.Lock()
	g.spliced[id] = sf
	g.splicedMu.Unlock()
	return sf
}

// TestFlowMapsFull: past the 65,536 flows the program's maps hold, a
// splice on the bpf datapath stays on the Go engine (counted as a failed
// promotion, nothing of it left in the maps), and on the nfqueue datapath
// it is spliced without a record for restarts. An operator who raised
// limits.max_flows past the maps gets one warning a minute for each,
// not one per splice: a line per new flow flooded the log of a busy
// router.
func TestFlowMapsFull(t *testing.T) {
	testnet.Privileged(t)
	var logs lockedBuffer
	g := quietGateway(t)
	g.log = slog.New(slog.NewTextHandler(&logs, nil))
	g.engine = splice.NewTable()
	g.spliceOn.Store(true)
	g.queues = &nfq.Set{}

	dp, err := bpf.Load(bpf.Options{})
	if err != nil {
		t.Fatalf("load the bpf datapath: %v", err)
	}
	defer dp.Close()
	fillFlowMaps(t, dp)
	g.kpath = &kernelPath{dp: dp}
	const flows = 20
	for id := uint64(1); id <= flows; id++ {
		sf := splicedFlowFor(t, g, id)
		g.promote(sf)
		if sf.entry.Offloaded() {
			t.Fatalf("flow %d promoted into full maps", id)
		}
		if _, err := dp.Flow(id); err == nil {
			t.Errorf("flow %d: an element left in the flows map", id)
		}
	}
	if n := g.kpath.promoteFailures.Load(); n != flows {
		t.Errorf("%d failed promotions counted, want %d", n, flows)
	}
	if n := strings.Count(logs.String(), "promote to the bpf datapath failed"); n != 1 {
		t.Errorf("%d warnings for %d failed promotions, want 1:\n%s", n, flows, logs.String())
	}

	// The nfqueue datapath's record of spliced flows: the same maps.
	g.kpath = nil
	g.store = dp
	for id := uint64(flows + 1); id <= 2*flows; id++ {
		sf := splicedFlowFor(t, g, id)
		g.storeFlow(sf)
		if sf.stored.Load() {
			t.Fatalf("flow %d recorded in full maps", id)
		}
	}
	if n := strings.Count(logs.String(), "record a spliced flow for restarts"); n != 1 {
		t.Errorf("%d warnings for %d flows not recorded, want 1:\n%s", n, flows, logs.String())
	}
	if n := strings.Count(logs.String(), bpf.ErrFull.Error()); n != 2 {
		t.Errorf("%d of the warnings say the maps are full, want 2:\n%s", n, logs.String())
	}
}
