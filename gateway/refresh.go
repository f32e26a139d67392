package gateway

import (
	"context"
	"time"

	"spliced/logging"
	"spliced/splice"
)

// Divert entries expire after kernel.divert_timeout (a safety net if the
// daemon dies without removing them). A live flow's entries are refreshed
// well before that: every third of the timeout, all of them, in a few
// batched transactions (rules.Diverter.Refresh). A refresh that fails is
// retried at the next tick; two more remain before anything expires.

// refreshEvery is how often divert entries are refreshed for timeout.
func refreshEvery(timeout time.Duration) time.Duration {
	return max(timeout/3, 100*time.Millisecond)
}

// refresher refreshes the divert entries of live flows until ctx is done.
func (g *Gateway) refresher(ctx context.Context) {
	t := time.NewTicker(refreshEvery(g.manager().Spec().Divert.Timeout))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			g.refreshDivert()
		}
	}
}

// refreshDivert refreshes the divert entries of every spliced flow and of
// every unspliced flow that keeps its entries. Flows in a splice or an
// unsplice are left out: a transition lasts at most its drain timeout,
// and one that aborts deletes its entries while it is still registered.
func (g *Gateway) refreshDivert() {
	if !g.splicing() {
		return
	}
	start := time.Now()
	n, err := g.diverter.Refresh(g.refreshable)
	if err != nil {
		g.divertRefreshErrors.Add(1)
		g.log.Error("refresh divert entries; retrying at the next refresh", "tuples", n, logging.Err(err))
		return
	}
	g.divertRefreshOK.Add(1)
	if n > 0 {
		g.log.Debug("divert entries refreshed", "tuples", n, "took_us", time.Since(start).Microseconds())
	}
}

// refreshable returns the divert tuples of spliced and unspliced flows by
// queue index (called with the diverter's lock held; see Diverter.Refresh).
func (g *Gateway) refreshable() map[uint16][]splice.Key {
	out := map[uint16][]splice.Key{}
	g.splicedMu.Lock()
	defer g.splicedMu.Unlock()
	for _, sf := range g.spliced {
		k := sf.keys()
		out[sf.queue] = append(out[sf.queue], k[0], k[1])
	}
	for _, tr := range g.passthrough {
		out[tr.queue] = append(out[tr.queue], tr.keys[0], tr.keys[1])
	}
	g.lostDivert(func(q uint16, k splice.Key) { out[q] = append(out[q], k) })
	return out
}
