package monotime

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNowIsTheSystemMonotonicClock: Now reads what CLOCK_MONOTONIC
// reads (what the BPF program and another process read), not a clock of
// this process's own.
func TestNowIsTheSystemMonotonicClock(t *testing.T) {
	for range 100 {
		var a, b unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &a)
		n := Now()
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &b)
		// The anchor's two readings are a few microseconds apart at most.
		const slack = int64(time.Millisecond)
		if n < a.Nano()-slack || n > b.Nano()+slack {
			t.Fatalf("Now %d outside CLOCK_MONOTONIC's %d..%d", n, a.Nano(), b.Nano())
		}
	}
}

func TestSinceAndWall(t *testing.T) {
	start := Now()
	time.Sleep(20 * time.Millisecond)
	if d := Since(start); d < 20*time.Millisecond || d > 10*time.Second {
		t.Errorf("Since after 20 ms: %v", d)
	}
	if w := Wall(start); time.Since(w) < 20*time.Millisecond || time.Since(w) > 10*time.Second {
		t.Errorf("Wall of 20 ms ago: %v, now %v", w, time.Now())
	}
	if !Wall(0).IsZero() {
		t.Errorf("Wall(0) = %v, want the zero time", Wall(0))
	}
	unixNs := time.Now().Add(-time.Hour).UnixNano()
	if w := Wall(unixNs); !w.Equal(time.Unix(0, unixNs)) {
		t.Errorf("Wall of an earlier version's unix time: %v, want %v", w, time.Unix(0, unixNs))
	}
}

// TestOfKeepsMonotonicReading: a time.Now() value converts to the clock
// exactly enough to compare with Now.
func TestOfKeepsMonotonicReading(t *testing.T) {
	before := Now()
	at := time.Now()
	after := Now()
	if v := Of(at); v < before-int64(time.Millisecond) || v > after+int64(time.Millisecond) {
		t.Errorf("Of(time.Now()) = %d, want within %d..%d", v, before, after)
	}
	if d := Of(at.Add(time.Hour)) - Of(at); d < int64(time.Hour-time.Millisecond) || d > int64(time.Hour+time.Millisecond) {
		t.Errorf("an hour later is %v later", time.Duration(d))
	}
}

func TestNowAllocatesNothing(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { Now() }); n != 0 {
		t.Errorf("Now allocates %v times", n)
	}
}
