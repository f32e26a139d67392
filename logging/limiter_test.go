package logging

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

// fakeClock is a time source tests move by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func testLimiter(interval time.Duration, n int) (*Limiter, *fakeClock) {
	c := &fakeClock{t: time.Unix(1_000_000, 0)}
	l := NewLimiterSize(interval, n)
	l.now = c.now
	return l, c
}

// TestLimiterOnePerInterval: one event per key per interval, the next
// allowed one carries the count of those suppressed.
func TestLimiterOnePerInterval(t *testing.T) {
	l, c := testLimiter(10*time.Second, 16)
	if ok, n := l.Allow("a"); !ok || n != 0 {
		t.Fatalf("first event: %v, %d", ok, n)
	}
	for range 5 {
		if ok, _ := l.Allow("a"); ok {
			t.Fatal("second event within the interval allowed")
		}
	}
	if ok, _ := l.Allow("b"); !ok {
		t.Fatal("another key is limited on its own")
	}
	c.t = c.t.Add(10 * time.Second)
	if ok, n := l.Allow("a"); !ok || n != 5 {
		t.Fatalf("after the interval: %v, suppressed %d, want 5", ok, n)
	}
	if got := l.Suppressed(); got != 5 {
		t.Errorf("Suppressed() = %d, want 5", got)
	}
}

// TestLimiterBounded: a scanner's worth of distinct keys (200,000, as
// many destinations) leaves the Limiter holding at most its cap of keys,
// the heap does not grow with the keys, every event is either allowed or
// counted, and keys whose interval is over make room again.
func TestLimiterBounded(t *testing.T) {
	const keys, maxKeys = 200_000, 1024
	l, c := testLimiter(10*time.Second, maxKeys)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	allowed, reported := 0, 0
	for i := range keys {
		if i%1000 == 0 {
			c.t = c.t.Add(time.Millisecond) // a fast scanner: all within one interval
		}
		if ok, n := l.Allow(fmt.Sprintf("dial 10.%d.%d.%d:80", i>>16&255, i>>8&255, i&255)); ok {
			allowed++
			reported += n
		}
		if l.Len() > maxKeys {
			t.Fatalf("after %d keys the limiter holds %d, cap %d", i+1, l.Len(), maxKeys)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d distinct keys: %d held, %d allowed, %d suppressed; heap grew %d KiB", keys, l.Len(), allowed, l.Suppressed(), grown>>10)
	if allowed != maxKeys+1 { // every key with room, plus one for the overflow slot
		t.Errorf("%d events allowed, want %d", allowed, maxKeys+1)
	}
	if int(l.Suppressed())+allowed != keys {
		t.Errorf("allowed %d + suppressed %d != %d events", allowed, l.Suppressed(), keys)
	}
	// The cap's worth of entries and their keys is about 150 KiB; what
	// 200,000 kept keys would cost is over 10 MiB.
	if grown > 2<<20 {
		t.Errorf("heap grew by %d KiB for %d keys: the limiter keeps what it should forget", grown>>10, keys)
	}
	// An interval later the old keys make room: new keys are limited on
	// their own again, and the overflow slot reports what it suppressed
	// (its own events and those of the keys pruned).
	c.t = c.t.Add(10 * time.Second)
	if ok, _ := l.Allow("fresh"); !ok {
		t.Fatal("a new key after the interval is refused")
	}
	if l.Len() != 1 {
		t.Errorf("after the interval %d keys held, want 1 (the old ones pruned)", l.Len())
	}
	for i := range maxKeys - 1 {
		l.Allow(fmt.Sprint("k", i))
	}
	ok, n := l.Allow("one too many")
	if !ok || n != keys-maxKeys-1 {
		t.Errorf("overflow slot: allowed %v, suppressed %d, want %d", ok, n, keys-maxKeys-1)
	}
}

// TestLimiterAllocs: an event for a known key allocates nothing, whether
// allowed or suppressed.
func TestLimiterAllocs(t *testing.T) {
	l, c := testLimiter(10*time.Second, 16)
	l.Allow("k")
	if n := testing.AllocsPerRun(1000, func() {
		c.t = c.t.Add(time.Second)
		l.Allow("k")
	}); n != 0 {
		t.Errorf("%v allocations per event", n)
	}
}
