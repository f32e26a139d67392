package httpproxy

import (
	"math"
	"math/bits"
	"slices"
	"sync"
	"time"
)

// sizeFit is a moving estimate of how long a response body of a given
// length takes to reach the client one way (relayed, or spliced):
//
//	time = fixed + length × perByte
//
// Small responses are latency-bound (fixed dominates), large ones
// rate-bound (1/perByte is the rate in bytes per second). Samples are
// kept by size class (the bit length of the body's length: 64 KiB and
// 100 KiB are one class, 1 MiB another), the last fitKeep of each; a
// class's point is the median of its recent lengths and the median of
// its recent times, so one slow response (a client that paused before
// its next request) does not move it, and a class follows a change once
// half its samples are new. The line is fitted through the classes'
// points (least squares, each class one point), so a stream of small
// responses does not wash out the few large ones.
type sizeFit struct {
	mu      sync.Mutex
	classes [65]sizeClass
	samples uint64
}

// fitKeep is how many recent samples a size class keeps.
const fitKeep = 8

// minFitSamples is how many samples a fit needs before it counts as an
// estimate.
const minFitSamples = 3

type sizeClass struct {
	n, next int
	length  [fitKeep]int64
	nanos   [fitKeep]int64
}

// add records that a body of length bytes took d.
func (f *sizeFit) add(length int64, d time.Duration) {
	if length < 0 || d <= 0 {
		return
	}
	f.mu.Lock()
	c := &f.classes[bits.Len64(uint64(length))]
	c.length[c.next], c.nanos[c.next] = length, int64(d)
	c.next = (c.next + 1) % fitKeep
	c.n = min(c.n+1, fitKeep)
	f.samples++
	f.mu.Unlock()
}

// Fit is a fitted line: a body of n bytes takes Fixed + n × PerByte
// nanoseconds. OK is false while there are not enough samples.
type Fit struct {
	Fixed   time.Duration
	PerByte float64 // nanoseconds per byte
	Samples uint64
	OK      bool
}

// maxPredict bounds Predict: a backend's Content-Length goes up to
// 2^63-1, and its time in nanoseconds beyond what a Duration holds
// converted to a negative one (amd64), which made the choice arbitrary
// and the Explorer save a negative share for good. Half the range leaves
// room for the transition added to it and for the gap between two
// predictions (TestDecideHugeLength).
const maxPredict = time.Duration(math.MaxInt64 / 2)

// Predict returns the time a body of length bytes takes, at most
// maxPredict.
func (f Fit) Predict(length int64) time.Duration {
	t := f.PerByte * float64(length)
	if !(t < float64(maxPredict-f.Fixed)) {
		return maxPredict
	}
	return f.Fixed + time.Duration(t)
}

// Rate is the rate in bytes per second (0 when unknown).
func (f Fit) Rate() float64 {
	if f.PerByte <= 0 {
		return 0
	}
	return 1e9 / f.PerByte
}

// fit returns the line through the classes' points: least squares when
// it has a positive slope and a non-negative intercept; else (one class,
// or noise that makes larger bodies look faster) the line through the
// origin, as if the time were all per byte.
func (f *sizeFit) fit() Fit {
	f.mu.Lock()
	var xs, ys []float64
	var buf [fitKeep]int64
	for i := range f.classes {
		c := &f.classes[i]
		if c.n == 0 {
			continue
		}
		xs = append(xs, float64(median(buf[:0], c.length[:c.n])))
		ys = append(ys, float64(median(buf[:0], c.nanos[:c.n])))
	}
	out := Fit{Samples: f.samples}
	f.mu.Unlock()
	fixed, perByte, ok := fitLine(xs, ys)
	out.Fixed, out.PerByte = time.Duration(fixed), perByte
	out.OK = ok && out.Samples >= minFitSamples
	return out
}

// fitLine fits y = a + b·x (see fit).
func fitLine(xs, ys []float64) (a, b float64, ok bool) {
	n := float64(len(xs))
	if n == 0 {
		return 0, 0, false
	}
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	if n >= 2 {
		mx, my := sx/n, sy/n
		if vx := sxx/n - mx*mx; vx > 0 {
			b = (sxy/n - mx*my) / vx
			a = my - b*mx
			if b > 0 && a >= 0 {
				return a, b, true
			}
		}
	}
	if sxx == 0 {
		return 0, 0, false // only empty bodies: no rate
	}
	return 0, sxy / sxx, true
}

// median returns the median of v (the lower one of an even count),
// sorting a copy in buf.
func median(buf, v []int64) int64 {
	s := append(buf, v...)
	slices.Sort(s)
	return s[(len(s)-1)/2]
}
