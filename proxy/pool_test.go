package proxy

import (
	"net/netip"
	"testing"
	"time"
)

func addrs(ss ...string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range ss {
		out = append(out, netip.MustParseAddrPort(s))
	}
	return out
}

func first(bs []*Backend) string { return bs[0].Addr.String() }

// TestPool: round robin rotates over the backends that are up, a failed
// backend is skipped until its down time passes, an all-down pool tries
// the backend down longest alone (up again once it answers), and
// least_conn picks the backend with fewest flows.
func TestPool(t *testing.T) {
	now := time.Now()
	p := NewPool(addrs("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"), "round_robin", 10*time.Second)
	var got []string
	for range 4 {
		got = append(got, first(p.Pick(now)))
	}
	if want := []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80"}; !equal(got, want) {
		t.Fatalf("round robin %v, want %v", got, want)
	}
	p.Failed(p.backends[1], now)
	for range 4 {
		for _, b := range p.Pick(now.Add(time.Second)) {
			if b.Addr.String() == "10.0.0.2:80" {
				t.Fatal("a down backend was picked")
			}
		}
	}
	if n := len(p.Pick(now.Add(11 * time.Second))); n != 3 {
		t.Fatalf("after the down time: %d backends", n)
	}
	p.Failed(p.backends[0], now)
	p.Failed(p.backends[2], now.Add(-time.Second))
	if got := p.Pick(now.Add(time.Second)); len(got) != 1 || first(got) != "10.0.0.3:80" {
		t.Fatalf("all down: tried %d backends, first %s; want the one down longest alone", len(got), first(got))
	}
	p.Succeeded(p.backends[2])
	if got := p.Pick(now.Add(time.Second)); len(got) != 1 || first(got) != "10.0.0.3:80" {
		t.Fatalf("after the probe succeeded: tried %d, first %s; want 10.0.0.3:80, up again", len(got), first(got))
	}

	lc := NewPool(addrs("10.0.0.1:80", "10.0.0.2:80"), "least_conn", time.Second)
	done := lc.backends[0].Relaying()
	if got := first(lc.Pick(now)); got != "10.0.0.2:80" {
		t.Fatalf("least_conn picked %s", got)
	}
	done()
	done() // idempotent
	if a := lc.backends[0].active.Load(); a != 0 {
		t.Fatalf("active %d after done", a)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestLeastConnTies: least_conn spreads flows over backends with as few
// flows as each other. It took the first of them every time, so with
// no flow relayed at the pick (flows one at a time, or spliced ones,
// which no longer count) every flow went to the first backend.
func TestLeastConnTies(t *testing.T) {
	p := NewPool(addrs("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"), "least_conn", time.Second)
	seen := map[string]int{}
	for range 6 {
		seen[first(p.Pick(time.Now()))]++
	}
	for _, a := range []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"} {
		if seen[a] != 2 {
			t.Fatalf("6 picks with no flows: %v, want 2 each", seen)
		}
	}
	// A backend with fewer flows still wins.
	done := p.backends[0].Relaying()
	defer done()
	p.backends[1].Relaying()
	for range 3 {
		if got := first(p.Pick(time.Now())); got != "10.0.0.3:80" {
			t.Fatalf("picked %s, want 10.0.0.3:80 (the only one without flows)", got)
		}
	}
}

// TestPickAfter2To31Picks: the rotating start is a uint32 counter. As
// an int on a 32-bit router (armhf, mipsel, i386 packages) it turned
// negative after 2^31 picks, and so did its remainder: the slice
// expression panicked and took the daemon down, for round_robin and
// (since least_conn ties take turns) least_conn alike. Run with
// GOARCH=386 to see it on an amd64 machine.
func TestPickAfter2To31Picks(t *testing.T) {
	addrs := []netip.AddrPort{netip.MustParseAddrPort("10.2.0.2:80"), netip.MustParseAddrPort("10.2.0.3:80"), netip.MustParseAddrPort("10.2.0.4:80")}
	for _, balance := range []string{"round_robin", "least_conn"} {
		p := NewPool(addrs, balance, time.Second)
		p.next.Store(1<<31 - 2)
		seen := map[netip.AddrPort]int{}
		for range 6 {
			got := p.Pick(time.Now())
			if len(got) != len(addrs) {
				t.Fatalf("%s: picked %d backends, want %d", balance, len(got), len(addrs))
			}
			seen[got[0].Addr]++
		}
		if len(seen) != len(addrs) {
			t.Errorf("%s: first picks across 2^31 went to %v, want every backend", balance, seen)
		}
	}
}

// TestPoolBackendListedTwice: a backend listed twice is one server with
// twice the share: round robin sends it two flows in three, each pick
// lists it once, a failed connect takes it down as a whole, and
// least_conn counts its flows against its two listings.
func TestPoolBackendListedTwice(t *testing.T) {
	now := time.Now()
	p := NewPool(addrs("10.0.0.1:80", "10.0.0.1:80", "10.0.0.2:80"), "round_robin", 10*time.Second)
	seen := map[string]int{}
	for range 6 {
		got := p.Pick(now)
		if len(got) != 2 {
			t.Fatalf("a pick lists %d backends, want 2 (each once)", len(got))
		}
		seen[first(got)]++
	}
	if seen["10.0.0.1:80"] != 4 || seen["10.0.0.2:80"] != 2 {
		t.Fatalf("6 picks: %v, want 4 to the backend listed twice", seen)
	}
	p.Failed(p.backends[1], now)
	for range 3 {
		if got := p.Pick(now.Add(time.Second)); len(got) != 1 || first(got) != "10.0.0.2:80" {
			t.Fatalf("after its connect failed, a backend listed twice is still picked: %d, first %s", len(got), first(got))
		}
	}
	if s := p.Stats(); len(s) != 2 || s[0].Failures != 1 {
		t.Fatalf("stats %+v, want one line per backend", s)
	}

	lc := NewPool(addrs("10.0.0.1:80", "10.0.0.1:80", "10.0.0.2:80"), "least_conn", time.Second)
	lc.backends[0].Relaying()
	lc.backends[2].Relaying()
	for range 3 {
		if got := first(lc.Pick(now)); got != "10.0.0.1:80" {
			t.Fatalf("least_conn picked %s, want 10.0.0.1:80 (one flow for two listings)", got)
		}
	}
}
