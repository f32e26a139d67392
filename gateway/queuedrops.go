package gateway

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"spliced/logging"
	"spliced/nfq"
)

// The kernel drops a packet of a spliced flow before spliced reads it
// when the flow's queue holds kernel.queue_len packets already, or when
// the queue's socket buffer is full. TCP resends it, at the cost of a
// loss episode for its flow: a router whose queues overflow under load
// runs its spliced flows slower than it could. The counters were in
// `splicectl status` and the metrics only; the reaper now says so in the
// log too, once a minute at most, with the fix.

// queueDropCheck is how often the reaper reads the kernel's counters.
const queueDropCheck = time.Second

// queueDropWarnEvery is how often at most a warning says so.
const queueDropWarnEvery = time.Minute

// queueDropWatch is what the reaper saw of each queue's drops.
type queueDropWatch struct {
	checked time.Time // the last look
	// seen: each queue's counters at the last look. full, socket: the
	// drops not yet reported, and queues, theirs. warned: the last
	// warning.
	seen         map[uint16]queueDropSeen
	full, socket uint64
	queues       map[uint16]bool
	warned       time.Time
	queueLen     uint32 // kernel.queue_len, for the warning
}

type queueDropSeen struct {
	full, socket uint32
	reopens      uint64
}

// observe takes the queues' counters at now and returns the warning to
// log, or "" when there is none (no drop since the last, or one was
// logged less than queueDropWarnEvery ago: its drops are kept for the
// next). A queue's socket reopened (Stats.Reopens) has new counters in
// the kernel, from zero.
func (w *queueDropWatch) observe(now time.Time, stats []nfq.Stats) (msg string, attrs []any) {
	if w.seen == nil {
		w.seen = map[uint16]queueDropSeen{}
		w.queues = map[uint16]bool{}
	}
	for _, q := range stats {
		if q.Kernel.PortID == 0 {
			// Nobody bound to it in the kernel's list: its socket is
			// being replaced (closed, not yet opened again), or the
			// list could not be read. Its counters read zero then;
			// taken for ones, the next look would count every drop
			// since the start again (or, as uint32 differences,
			// four billion).
			continue
		}
		cur := queueDropSeen{full: q.Kernel.QueueDropped, socket: q.Kernel.UserDropped, reopens: q.Reopens}
		prev := w.seen[q.Queue]
		if cur.reopens != prev.reopens || cur.full < prev.full || cur.socket < prev.socket {
			// A new socket, with new counters from zero: counted as
			// reopened, or seen before it is (a counter went back).
			// A wrap of the kernel's uint32 counters, after four
			// billion drops, is taken for one too, and undercounted
			// once.
			prev = queueDropSeen{reopens: cur.reopens}
		}
		full, socket := cur.full-prev.full, cur.socket-prev.socket
		if full > 0 || socket > 0 {
			w.queues[q.Queue] = true
		}
		w.full += uint64(full)
		w.socket += uint64(socket)
		w.seen[q.Queue] = cur
	}
	if w.full+w.socket == 0 || (!w.warned.IsZero() && now.Sub(w.warned) < queueDropWarnEvery) {
		return "", nil
	}
	var qs []string
	for _, q := range slices.Sorted(maps.Keys(w.queues)) {
		qs = append(qs, fmt.Sprint(q))
	}
	msg = "the kernel dropped packets of spliced flows before spliced read them (TCP resends them, at a cost)"
	var fix []string
	if w.full > 0 {
		fix = append(fix, fmt.Sprintf("queue full: raise kernel.queue_len (%d) if the daemon keeps up otherwise", w.queueLen))
	}
	if w.socket > 0 {
		fix = append(fix, "socket buffer full: the daemon fell behind (CPU)")
	}
	attrs = []any{"queues", strings.Join(qs, ","), "queue_full", w.full, "socket_full", w.socket,
		logging.KeyReason, strings.Join(fix, "; ")}
	w.full, w.socket = 0, 0
	clear(w.queues)
	w.warned = now
	return msg, attrs
}

// checkQueueDrops is the reaper's look at the kernel's drops, every
// queueDropCheck.
func (g *Gateway) checkQueueDrops(now time.Time) {
	w := &g.queueDrops
	if g.queues == nil || now.Sub(w.checked) < queueDropCheck {
		return
	}
	w.checked = now
	w.queueLen = g.config().Kernel.QueueLen
	if msg, attrs := w.observe(now, g.queues.Stats()); msg != "" {
		g.log.Warn(msg, attrs...)
	}
}
