package gateway

import (
	"net/netip"
	"slices"
	"testing"

	"spliced/config"
	"spliced/splice"
)

// TestLiveDivert: the table a start or a repair installs carries the
// divert entries of every flow that needs them, each once: spliced
// flows, flows still being spliced (a flow the old table's TPROXY rule
// handed to a listener before the start installed the new table), and
// unspliced flows whose entries are kept; an unsplicing flow, both
// spliced and in transition, counts once.
func TestLiveDivert(t *testing.T) {
	g := New(&config.Config{}, nil)
	keys := func(n uint16) [2]splice.Key {
		c, s := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), 40000+n), netip.MustParseAddrPort("10.2.0.2:80")
		return [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	}
	p := splice.Params{
		Client: splice.Conn{Local: keys(1)[0].DstAddrPort(), Remote: keys(1)[0].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: keys(1)[1].DstAddrPort(), Remote: keys(1)[1].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := splice.NewTable().Add(1, &p, 0)
	if err != nil {
		t.Fatal(err)
	}
	g.spliced[1] = &splicedFlow{entry: e, queue: 0}
	g.transitions.add(newTransition(keys(1), 0, phaseUnsplicing, e)) // unsplicing
	g.transitions.add(newTransition(keys(2), 1, phaseDraining, nil)) // being spliced
	g.passthrough[3] = newTransition(keys(3), 1, phaseAborted, nil)  // unspliced, entries kept
	got := g.liveDivert()
	k1, k2, k3 := keys(1), keys(2), keys(3)
	want := map[uint16][]splice.Key{0: {k1[0], k1[1]}, 1: {k2[0], k2[1], k3[0], k3[1]}}
	for q := range want {
		slices.SortFunc(got[q], cmpKey)
		slices.SortFunc(want[q], cmpKey)
		if !slices.Equal(got[q], want[q]) {
			t.Errorf("queue %d: %v, want %v", q, got[q], want[q])
		}
	}
	if len(got) != len(want) {
		t.Errorf("queues %v, want %v", got, want)
	}
}

func cmpKey(a, b splice.Key) int {
	if a.SrcAddrPort() != b.SrcAddrPort() {
		return a.SrcAddrPort().Compare(b.SrcAddrPort())
	}
	return a.DstAddrPort().Compare(b.DstAddrPort())
}
