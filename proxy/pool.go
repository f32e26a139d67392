package proxy

import (
	"net/netip"
	"sync/atomic"
	"time"

	"spliced/internal/monotime"
)

// Pool is a set of backends a direct service balances flows over:
// round robin or least connections, a backend that failed a connect
// skipped for a while.
type Pool struct {
	backends  []*Backend
	leastConn bool
	downFor   time.Duration
	next      atomic.Uint32
}

// Backend is one server of a pool, with its counters.
type Backend struct {
	Addr      netip.AddrPort
	active    atomic.Int32 // flows the proxy relays to it now
	downUntil atomic.Int64 // monotime; skipped until then
	flows     atomic.Uint64
	failures  atomic.Uint64
}

// NewPool returns a pool; balance is round_robin or least_conn.
func NewPool(addrs []netip.AddrPort, balance string, downFor time.Duration) *Pool {
	p := &Pool{leastConn: balance == "least_conn", downFor: downFor}
	for _, a := range addrs {
		p.backends = append(p.backends, &Backend{Addr: a})
	}
	return p
}

// Pick returns the backends in the order to try them: those not marked
// down, by the balancing method; when all are down, the one down
// longest (whose down time ends first), alone. Trying every backend of
// a dead pool made each client connection a connect to each of them,
// and a client of hanging backends waited one connect timeout per
// backend; one probe per flow still finds the first backend that comes
// back, and the flows that come later take turns on the others.
func (p *Pool) Pick(now time.Time) []*Backend {
	var up []*Backend
	var first *Backend
	at := monotime.Of(now)
	for _, b := range p.backends {
		until := b.downUntil.Load()
		if until <= at {
			up = append(up, b)
		} else if first == nil || until < first.downUntil.Load() {
			first = b
		}
	}
	if len(up) == 0 {
		return []*Backend{first}
	}
	// The remainder of the uint32, not of an int: int(uint32) is negative
	// past 2^31 on 32-bit routers, and so would the start be.
	start := int((p.next.Add(1) - 1) % uint32(len(up)))
	if p.leastConn {
		// Ties go round: from a rotating start, the first with fewest
		// flows. The first of them every time sent every flow to the
		// first backend while none was relayed (flows one at a time,
		// or spliced ones, which do not count).
		best := start
		for k := 1; k < len(up); k++ {
			i := (start + k) % len(up)
			if up[i].active.Load() < up[best].active.Load() {
				best = i
			}
		}
		start = best
	}
	return append(up[start:], up[:start]...)
}

// Failed marks b down for the pool's down time.
func (p *Pool) Failed(b *Backend, now time.Time) {
	b.failures.Add(1)
	b.downUntil.Store(monotime.Of(now.Add(p.downFor)))
}

// Succeeded marks b up again: a backend tried while every one was down
// answered, so the flows after it go to it and not to another probe.
func (p *Pool) Succeeded(b *Backend) {
	if b.downUntil.Load() != 0 {
		b.downUntil.Store(0)
	}
}

// Opened counts a flow to b; the returned function ends it.
func (b *Backend) Opened() (done func()) {
	b.flows.Add(1)
	b.active.Add(1)
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			b.active.Add(-1)
		}
	}
}

// BackendStats are a backend's counters.
type BackendStats struct {
	Backend         string
	Flows, Failures uint64
	Active          int32
}

// Stats returns the counters of every backend.
func (p *Pool) Stats() []BackendStats {
	var out []BackendStats
	for _, b := range p.backends {
		out = append(out, BackendStats{Backend: b.Addr.String(), Flows: b.flows.Load(), Failures: b.failures.Load(), Active: b.active.Load()})
	}
	return out
}
