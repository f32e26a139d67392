package bench

import (
	"testing"
	"time"
)

// TestStallAcrossSplice: the gap across a splice is the longest gap
// between two reads that overlaps the splice's window, including the one
// ending with the first read after it; gaps elsewhere do not count, and a
// flow whose receivers did not read on both sides of the window has none.
func TestStallAcrossSplice(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	at := func(ms ...float64) []time.Time {
		var out []time.Time
		for _, m := range ms {
			out = append(out, t0.Add(time.Duration(m*float64(time.Millisecond))))
		}
		return out
	}
	lines := []map[string]any{
		{"msg": "flow spliced", "client": "10.1.0.2:40000", "time": t0.Add(20 * time.Millisecond).Format(time.RFC3339Nano), "took_us": 5000.0},
		{"msg": "flow unspliced", "client": "10.1.0.2:40001", "time": t0.Format(time.RFC3339Nano), "took_us": 1.0},
	}
	w := splicedWindows(lines)
	if len(w) != 1 || !w["10.1.0.2:40000"].from.Equal(t0.Add(15*time.Millisecond)) || !w["10.1.0.2:40000"].to.Equal(t0.Add(20*time.Millisecond)) {
		t.Fatalf("windows %v", w)
	}
	flows := []*busyResult{
		// A 9 ms gap before the splice, 3 ms inside it, 4 ms straddling
		// its end on the other receiver.
		{client: "10.1.0.2:40000", reads: [2][]time.Time{at(0, 9, 10, 16, 19, 30), at(1, 18, 22, 23)}},
		// Never spliced.
		{client: "10.1.0.2:40001", reads: [2][]time.Time{at(0, 1, 2), nil}},
	}
	longest, across := stallsOf(flows, w)
	if len(longest) != 2 || longest[0] != 17 || longest[1] != 1 {
		t.Errorf("longest gaps %v, want [17 1] ms", longest)
	}
	if len(across) != 1 || across[0] != 17 {
		t.Errorf("gaps across the splice %v, want [17] ms (1 to 18 on the server side overlaps 15-20)", across)
	}
	// Only reads before the window: no gap across it.
	if _, ok := (&busyResult{reads: [2][]time.Time{at(0, 1, 2), nil}}).gapAcross(t0.Add(15*time.Millisecond), t0.Add(20*time.Millisecond)); ok {
		t.Error("a gap across a window no read came after")
	}
	g, ok := (&busyResult{reads: [2][]time.Time{at(0, 9, 10, 16, 19, 30), nil}}).gapAcross(t0.Add(15*time.Millisecond), t0.Add(20*time.Millisecond))
	if !ok || g != 11*time.Millisecond {
		t.Errorf("gap across %v %v, want 11 ms (19 to 30 straddles the end)", g, ok)
	}
}
