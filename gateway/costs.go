package gateway

import (
	"sync"
	"time"

	"spliced/proxy"
)

// costAlpha is the weight of a new sample in the moving averages of the
// transition costs: about the last 8 transitions count.
const costAlpha = 1.0 / 8

// movingCost is a moving average of a transition's duration.
type movingCost struct {
	mu  sync.Mutex
	avg float64 // nanoseconds
	n   uint64
}

func (m *movingCost) observe(d time.Duration) {
	m.mu.Lock()
	if m.n == 0 {
		m.avg = float64(d)
	} else {
		m.avg += costAlpha * (float64(d) - m.avg)
	}
	m.n++
	m.mu.Unlock()
}

func (m *movingCost) get() (time.Duration, uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return time.Duration(m.avg), m.n
}

// TransitionCosts returns the moving averages of the completed splices'
// and unsplices' durations (proxy.CostReporter): the HTTP proxy weighs a
// splice with them.
func (g *Gateway) TransitionCosts() proxy.TransitionCosts {
	var c proxy.TransitionCosts
	c.Splice, c.Splices = g.spliceCost.get()
	c.Unsplice, c.Unsplices = g.unspliceCost.get()
	c.QueuedBytes = g.kpath == nil
	return c
}

var _ proxy.CostReporter = (*Gateway)(nil)
