package gateway

import (
	"fmt"
	"testing"
	"time"

	"spliced/nfq"
)

// TestQueueDropsWarned: packets the kernel dropped before a queue's
// reader (queue full, socket buffer full) are said in the log, not
// only counted in the status: at the first look that finds them, then
// at most once a minute with every drop since, also across a socket
// reopened (new counters from zero). No drop, no warning.
func TestQueueDropsWarned(t *testing.T) {
	w := queueDropWatch{queueLen: 4096}
	t0 := time.Unix(1000, 0)
	st := func(q uint16, full, socket uint32, reopens uint64) nfq.Stats {
		return nfq.Stats{Queue: q, Reopens: reopens, Kernel: nfq.KernelStats{PortID: 1000, QueueDropped: full, UserDropped: socket}}
	}
	// unbound: the queue is not in the kernel's list (its socket being
	// replaced), whose counters then read zero.
	unbound := func(q uint16, reopens uint64) nfq.Stats { return nfq.Stats{Queue: q, Reopens: reopens} }
	attr := func(attrs []any, key string) string {
		for i := 0; i+1 < len(attrs); i += 2 {
			if attrs[i] == key {
				return fmt.Sprint(attrs[i+1])
			}
		}
		return ""
	}
	steps := []struct {
		at                   time.Duration
		stats                []nfq.Stats
		queues, full, socket string // "" queues: no warning
	}{
		{0, []nfq.Stats{st(100, 0, 0, 0), st(101, 0, 0, 0)}, "", "", ""},
		{time.Second, []nfq.Stats{st(100, 0, 0, 0), st(101, 0, 0, 0)}, "", "", ""},
		{2 * time.Second, []nfq.Stats{st(100, 30, 0, 0), st(101, 0, 0, 0)}, "100", "30", "0"},
		// Within the minute: kept for the next warning.
		{3 * time.Second, []nfq.Stats{st(100, 40, 0, 0), st(101, 0, 5, 0)}, "", "", ""},
		{30 * time.Second, []nfq.Stats{st(100, 40, 0, 0), st(101, 0, 5, 0)}, "", "", ""},
		{62 * time.Second, []nfq.Stats{st(100, 40, 0, 0), st(101, 0, 5, 0)}, "100,101", "10", "5"},
		{2 * time.Minute, []nfq.Stats{st(100, 40, 0, 0), st(101, 0, 5, 0)}, "", "", ""},
		// Queue 100's socket reopened: its counters start from zero.
		{4 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), st(101, 0, 5, 0)}, "100", "7", "0"},
		{6 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), st(101, 0, 5, 0)}, "", "", ""},
		// Queue 101's socket replaced: closed, the queue is not in the
		// kernel's list for a moment (no counters, not four billion
		// drops), then open again from zero, seen before its reopen is
		// counted: new drops only.
		{8 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), unbound(101, 0)}, "", "", ""},
		{10 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), st(101, 0, 2, 0)}, "101", "0", "2"},
		{12 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), st(101, 0, 2, 0)}, "", "", ""},
		{14 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), unbound(101, 0)}, "", "", ""},
		{16 * time.Minute, []nfq.Stats{st(100, 7, 0, 1), st(101, 0, 2, 0)}, "", "", ""},
	}
	for i, s := range steps {
		msg, attrs := w.observe(t0.Add(s.at), s.stats)
		if s.queues == "" {
			if msg != "" {
				t.Errorf("step %d: warned %q %v", i, msg, attrs)
			}
			continue
		}
		if msg == "" {
			t.Errorf("step %d: no warning", i)
			continue
		}
		if q, f, so := attr(attrs, "queues"), attr(attrs, "queue_full"), attr(attrs, "socket_full"); q != s.queues || f != s.full || so != s.socket {
			t.Errorf("step %d: queues %s, queue_full %s, socket_full %s; want %s, %s, %s", i, q, f, so, s.queues, s.full, s.socket)
		}
	}
}
