package gateway

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"spliced/api"
	"spliced/proxy"
)

// events fans flow and daemon events out to subscribers (splicectl
// watch). A subscriber that does not keep up loses events rather than
// slowing the daemon; it is told how many it lost.
type events struct {
	mu   sync.Mutex
	subs map[chan api.Event]*int
	// n is len(subs): an event nobody reads is not even described.
	n atomic.Int32
}

func (e *events) subscribe() (<-chan api.Event, func()) {
	ch := make(chan api.Event, 256)
	lost := 0
	e.mu.Lock()
	if e.subs == nil {
		e.subs = map[chan api.Event]*int{}
	}
	e.subs[ch] = &lost
	e.n.Store(int32(len(e.subs)))
	e.mu.Unlock()
	return ch, func() {
		e.mu.Lock()
		delete(e.subs, ch)
		e.n.Store(int32(len(e.subs)))
		e.mu.Unlock()
	}
}

func (e *events) publish(ev api.Event) {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for ch, lost := range e.subs {
		if *lost > 0 {
			select {
			case ch <- api.Event{Time: ev.Time, Kind: "lost", Detail: strconv.Itoa(*lost) + " events dropped: the reader was too slow"}:
				*lost = 0
			default:
			}
		}
		select {
		case ch <- ev:
		default:
			*lost++
		}
	}
}

// flowEvent publishes an event about a flow.
func (g *Gateway) flowEvent(kind string, f *proxy.Flow, detail string) {
	if g.events.n.Load() == 0 {
		return // a proxy's flows come and go by the thousand a second
	}
	af := g.apiFlow(f)
	g.events.publish(api.Event{Kind: kind, Flow: &af, Detail: detail})
}
