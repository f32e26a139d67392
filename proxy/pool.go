package proxy

import (
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"spliced/internal/monotime"
)

// Pool is a set of backends a direct service balances flows over:
// round robin or least connections, a backend that failed a connect
// skipped for a while.
type Pool struct {
	// backends are the pool's entries as listed. A backend listed n
	// times (n times the share) is one *Backend in n entries: one
	// server, down or up as a whole, its flows counted once.
	backends  []*Backend
	unique    []*Backend // each backend once, in the order listed
	leastConn bool
	downFor   time.Duration
	next      atomic.Uint32
}

// Backend is one server of a pool, with its counters.
type Backend struct {
	Addr      netip.AddrPort
	weight    int32        // how many times the pool lists it
	active    atomic.Int32 // flows the proxy relays to it now
	downUntil atomic.Int64 // monotime; skipped until then
	flows     atomic.Uint64
	failures  atomic.Uint64
}

// NewPool returns a pool; balance is round_robin or least_conn.
func NewPool(addrs []netip.AddrPort, balance string, downFor time.Duration) *Pool {
	p := &Pool{leastConn: balance == "least_conn", downFor: downFor}
	byAddr := map[netip.AddrPort]*Backend{}
	for _, a := range addrs {
		b := byAddr[a]
		if b == nil {
			b = &Backend{Addr: a}
			byAddr[a] = b
			p.unique = append(p.unique, b)
		}
		b.weight++
		p.backends = append(p.backends, b)
	}
	return p
}

// Pick returns the backends in the order to try them, each once: those
// not marked down, by the balancing method; when all are down, the one
// down longest (whose down time ends first), alone. Trying every backend of
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
		// or spliced ones, which do not count). A backend listed n
		// times is to have n times the flows of one listed once: flows
		// per listing compare.
		best := start
		for k := 1; k < len(up); k++ {
			i := (start + k) % len(up)
			if int64(up[i].active.Load())*int64(up[best].weight) < int64(up[best].active.Load())*int64(up[i].weight) {
				best = i
			}
		}
		start = best
	}
	order := append(up[start:], up[:start]...)
	if len(p.unique) == len(p.backends) {
		return order
	}
	// A backend listed twice is tried once: a second connect to one
	// that just failed would fail again (or, hanging, cost the client
	// another connect timeout).
	out := order[:0]
	for _, b := range order {
		if !slices.Contains(out, b) {
			out = append(out, b)
		}
	}
	return out
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

// Opened counts a flow sent to b.
func (b *Backend) Opened() { b.flows.Add(1) }

// Relaying counts a flow to b that the proxy relays now (least_conn
// compares those); the returned function ends that.
func (b *Backend) Relaying() (done func()) {
	b.active.Add(1)
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			b.active.Add(-1)
		}
	}
}

// BackendStats are a backend's counters and state.
type BackendStats struct {
	Backend         string
	Flows, Failures uint64
	Active          int32
	// Down: a connect failed and the backend is skipped until its
	// down time passes.
	Down bool
}

// Stats returns the counters and state of every backend.
func (p *Pool) Stats() []BackendStats {
	var out []BackendStats
	at := monotime.Of(time.Now())
	for _, b := range p.unique {
		out = append(out, BackendStats{Backend: b.Addr.String(), Flows: b.flows.Load(), Failures: b.failures.Load(),
			Active: b.active.Load(), Down: b.downUntil.Load() > at})
	}
	return out
}
