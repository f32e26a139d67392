package gateway

import (
	"sync"

	"spliced/proxy"
	"spliced/splice"
)

// The engines' totals of bytes and packets (splicectl status,
// spliced_bytes_total) are sums: the live flows' counters, read at the
// time, plus the flows that ended, added as each ends. They are
// counters, which never fall: Prometheus reads a fall as a restart of
// the daemon and counts the whole total again as new traffic. So:
//
//   - A flow leaves the live sum before its counts join the ended ones:
//     a closing flow is not summed (its state is set before its counts
//     are added), and a spliced flow's engine entry leaves the table
//     before its counts are added (countClosed). Counted in both, the
//     flow's bytes made the total overshoot and fall back a moment later.
//   - Status reads the ended flows' counts before the live ones, and the
//     folded bytes (below) last, so that a flow that ends while it reads
//     is missed rather than counted twice.
//   - An unsplice leaves the bytes the engine moved to the engine: they
//     join the ended counts (the entry is gone), and since the flow's own
//     counters take them too (a flow's bytes are its total), the proxy's
//     sum takes them off again (foldUnspliced). The proxy's total grew by
//     what the engine had moved, and the engine's fell by as much, at
//     every unsplice (the HTTP proxy's next request).
//
// What remains is a total that falls short for a moment (a flow between
// the two sums); totals.floor reports the highest value reported so far
// instead.

// totals keeps what Status reported of each engine's totals.
type totals struct {
	mu   sync.Mutex
	last [numTotals]uint64
}

// The engines' totals Status reports.
const (
	totalProxyC2S = iota
	totalProxyS2C
	totalSpliceC2S
	totalSpliceS2C
	totalSplicePacketsC2S
	totalSplicePacketsS2C
	numTotals
)

// floor returns n, or the highest value of total i reported before if n
// is lower.
func (t *totals) floor(i int, n uint64) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if n < t.last[i] {
		return t.last[i]
	}
	t.last[i] = n
	return n
}

// countClosed adds an ended spliced flow's counts to the ended flows'
// totals; its entry has left the engine's table, and its state is
// closing.
func (g *Gateway) countClosed(sf *splicedFlow) {
	st := sf.entry.Stats()
	f := sf.flow
	g.countSpliced(st)
	g.closedProxied[0].Add(uint64(f.C2S.Load()))
	g.closedProxied[1].Add(uint64(f.S2C.Load()))
}

// countSpliced adds what the engine moved for a flow that left its table
// to the splice engine's totals.
func (g *Gateway) countSpliced(st [2]splice.DirStats) {
	g.closedSpliced[0].Add(st[splice.C2S].Bytes)
	g.closedSpliced[1].Add(st[splice.S2C].Bytes)
	g.closedSplicedPackets[0].Add(st[splice.C2S].Packets)
	g.closedSplicedPackets[1].Add(st[splice.S2C].Packets)
}

// foldUnspliced adds the bytes the engine moved for a flow given back to
// its proxy to the flow's counters, which count every byte of the flow,
// and keeps them the splice engine's in the totals; its entry has left
// the engine's table.
func (g *Gateway) foldUnspliced(f *proxy.Flow, st [2]splice.DirStats) {
	g.countSpliced(st)
	// Before the flow's counters: a sum read between the two falls short
	// rather than over.
	g.splicedFolded[0].Add(st[splice.C2S].Bytes)
	g.splicedFolded[1].Add(st[splice.S2C].Bytes)
	f.C2S.Add(int64(st[splice.C2S].Bytes))
	f.S2C.Add(int64(st[splice.S2C].Bytes))
}

// engineTotals are the proxy's and the splice engine's totals, c2s then
// s2c: bytes of the proxy, bytes and packets of the splice engine
// (those without splicing on).
func (g *Gateway) engineTotals(splicing bool) (proxyBytes, spliceBytes, splicePackets [2]uint64) {
	var closedProxied, closed, closedPackets [2]uint64
	for d := range 2 {
		closedProxied[d] = g.closedProxied[d].Load()
		closed[d] = g.closedSpliced[d].Load()
		closedPackets[d] = g.closedSplicedPackets[d].Load()
	}
	var proxied [2]uint64
	for _, f := range g.flows.List() {
		if f.State() == proxy.StateClosing {
			continue // its bytes are joining closedProxied
		}
		proxied[0] += uint64(f.C2S.Load())
		proxied[1] += uint64(f.S2C.Load())
	}
	if splicing {
		for _, en := range g.engine.Entries() {
			s := en.Stats()
			for d := range 2 {
				spliceBytes[d] += s[d].Bytes
				splicePackets[d] += s[d].Packets
			}
		}
	}
	for d := range 2 {
		n := proxied[d] + closedProxied[d]
		if folded := g.splicedFolded[d].Load(); n > folded {
			proxyBytes[d] = n - folded
		}
		proxyBytes[d] = g.totals.floor(totalProxyC2S+d, proxyBytes[d])
		spliceBytes[d] = g.totals.floor(totalSpliceC2S+d, spliceBytes[d]+closed[d])
		splicePackets[d] = g.totals.floor(totalSplicePacketsC2S+d, splicePackets[d]+closedPackets[d])
	}
	return proxyBytes, spliceBytes, splicePackets
}
