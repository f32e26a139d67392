package httpproxy

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// line is a Fit of fixed µs and a rate in MB/s (10^6 bytes per second).
func line(fixedUs, mbps float64) Fit {
	return Fit{Fixed: time.Duration(fixedUs * 1e3), PerByte: 1e3 / mbps, Samples: minFitSamples, OK: true}
}

// TestDecide: the measured policy's table. Sizes and estimates in,
// decision and reason out: relay until the relayed line is known, then
// splice until the spliced line and the transition costs are, then
// splice exactly where the predicted time spliced (transition included)
// is below the predicted time relayed; explore inverts the choice.
func TestDecide(t *testing.T) {
	const (
		KiB = 1 << 10
		MiB = 1 << 20
	)
	relay := line(200, 1000)     // 200 µs + 1 GB/s
	slowSplice := line(100, 500) // spliced slower than relayed: never pays
	fastSplice := line(100, 4000)
	for _, c := range []struct {
		name    string
		length  int64
		est     Estimates
		explore bool
		splice  bool
		why     string
	}{
		{"no estimates: relay to measure", MiB, Estimates{}, false, false, "measure"},
		{"no estimates, explore ignored", MiB, Estimates{}, true, false, "measure"},
		{"relayed known, spliced not: splice to measure", MiB, Estimates{Relayed: relay, TransitionOK: true, Transition: time.Millisecond}, false, true, "measure"},
		{"transition not known: splice to measure", MiB, Estimates{Relayed: relay, Spliced: fastSplice}, false, true, "measure"},
		{"relayed line not OK yet", MiB, Estimates{Relayed: Fit{PerByte: 1, Samples: 2}, Spliced: fastSplice, TransitionOK: true}, false, false, "measure"},
		// 1 MiB: relayed 200 µs + 1049 µs; spliced 3 ms + 100 + 262 µs.
		{"1 MiB, 3 ms transition: does not pay", MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true}, false, false, "does_not_pay"},
		{"1 MiB, 3 ms transition, explore", MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true}, true, true, "explore"},
		// 16 MiB: relayed 200 + 16777 µs; spliced 3000 + 100 + 4194 µs.
		{"16 MiB, 3 ms transition: pays", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true}, false, true, "pays"},
		{"16 MiB, pays, explore relays", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true}, true, false, "explore"},
		{"16 MiB, 20 ms transition: does not pay", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 20 * time.Millisecond, TransitionOK: true}, false, false, "does_not_pay"},
		{"1 GiB, spliced slower per byte: never pays", 1 << 30, Estimates{Relayed: relay, Spliced: slowSplice, Transition: 50 * time.Microsecond, TransitionOK: true}, false, false, "does_not_pay"},
		{"64 KiB, 50 µs transition, fast splice: pays", 64 * KiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 50 * time.Microsecond, TransitionOK: true}, false, true, "pays"},
		{"64 KiB, 500 µs transition: does not pay", 64 * KiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 500 * time.Microsecond, TransitionOK: true}, false, false, "does_not_pay"},
		// Queued bytes (nfqueue) on saturated CPUs: relayed, whatever
		// the times say, exploring and measuring included.
		{"16 MiB pays, queued, CPU busy", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true, QueuedBytes: true, CPUBusy: true}, false, false, "cpu_busy"},
		{"16 MiB, queued, CPU busy, explore", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true, QueuedBytes: true, CPUBusy: true}, true, false, "cpu_busy"},
		{"to measure, queued, CPU busy", MiB, Estimates{Relayed: relay, QueuedBytes: true, CPUBusy: true}, false, false, "cpu_busy"},
		{"16 MiB, queued, CPU free: pays", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true, QueuedBytes: true}, false, true, "pays"},
		{"16 MiB, CPU busy, in the kernel: pays", 16 * MiB, Estimates{Relayed: relay, Spliced: fastSplice, Transition: 3 * time.Millisecond, TransitionOK: true, CPUBusy: true}, false, true, "pays"},
	} {
		splice, why, relayed, spliced := Decide(c.length, c.est, c.explore)
		if splice != c.splice || why != c.why {
			t.Errorf("%s: splice %v (%s), want %v (%s); predicted relayed %v, spliced %v", c.name, splice, why, c.splice, c.why, relayed, spliced)
		}
		if why == "pays" || why == "does_not_pay" {
			want := c.est.Transition + c.est.Spliced.Predict(c.length)
			if spliced != want || relayed != c.est.Relayed.Predict(c.length) || (relayed > spliced) != (why == "pays") {
				t.Errorf("%s: predictions %v relayed, %v spliced, inconsistent with the estimates", c.name, relayed, spliced)
			}
		}
	}
}

// TestSizeFit: the fit finds fixed time and rate from responses of
// several sizes, follows a change once half a class's samples are new,
// ignores a lone slow response, and needs minFitSamples samples.
func TestSizeFit(t *testing.T) {
	// time = 300 µs + n / (500 MB/s)
	at := func(n int64) time.Duration { return 300*time.Microsecond + time.Duration(float64(n)*2) }
	var f sizeFit
	f.add(4<<10, at(4<<10))
	f.add(1<<20, at(1<<20))
	if f.fit().OK {
		t.Fatalf("an estimate from 2 samples")
	}
	for _, n := range []int64{4 << 10, 64 << 10, 1 << 20, 16 << 20} {
		for range fitKeep {
			f.add(n, at(n))
		}
	}
	got := f.fit()
	if !got.OK || !near(float64(got.Fixed), 300e3, 0.01) || !near(got.Rate(), 500e6, 0.01) {
		t.Fatalf("fit %+v (rate %.0f), want 300 µs and 500 MB/s", got, got.Rate())
	}
	// A client that paused 5 s once: the medians do not move.
	f.add(1<<20, 5*time.Second)
	if g := f.fit(); !near(float64(g.Fixed), 300e3, 0.01) || !near(g.Rate(), 500e6, 0.01) {
		t.Errorf("one slow sample moved the fit: %+v", g)
	}
	// Twice as slow from now on: after half of each class's samples,
	// the estimate follows.
	slow := func(n int64) time.Duration { return 2 * at(n) }
	for _, n := range []int64{4 << 10, 64 << 10, 1 << 20, 16 << 20} {
		for range fitKeep/2 + 1 {
			f.add(n, slow(n))
		}
	}
	if g := f.fit(); !near(float64(g.Fixed), 600e3, 0.01) || !near(g.Rate(), 250e6, 0.01) {
		t.Errorf("after the change: %+v (rate %.0f), want 600 µs and 250 MB/s", g, g.Rate())
	}
	// Many small responses do not wash out the large ones: each class is
	// one point.
	for range 1000 {
		f.add(1<<10, slow(1<<10))
	}
	if g := f.fit(); !near(g.Rate(), 250e6, 0.02) {
		t.Errorf("after many small responses the rate is %.0f", g.Rate())
	}

	// One size only: the line goes through the origin.
	var one sizeFit
	for range 3 {
		one.add(1<<20, 2*time.Millisecond)
	}
	if g := one.fit(); !g.OK || g.Fixed != 0 || g.Predict(1<<20) != 2*time.Millisecond {
		t.Errorf("one class: %+v", g)
	}
	// Larger bodies faster (noise): no negative slope, through the origin.
	var odd sizeFit
	odd.add(1<<10, 3*time.Millisecond)
	odd.add(1<<20, 2*time.Millisecond)
	odd.add(1<<20, 2*time.Millisecond)
	if g := odd.fit(); !g.OK || g.PerByte <= 0 || g.Fixed != 0 {
		t.Errorf("negative slope: %+v", g)
	}
	// Empty bodies only: no rate.
	var empty sizeFit
	for range 5 {
		empty.add(0, time.Millisecond)
	}
	if g := empty.fit(); g.OK {
		t.Errorf("empty bodies gave an estimate: %+v", g)
	}
	// Nonsense samples are ignored.
	empty.add(-1, time.Millisecond)
	empty.add(10, 0)
	if g := empty.fit(); g.Samples != 5 {
		t.Errorf("%d samples", g.Samples)
	}
}

func near(got, want, tol float64) bool { return math.Abs(got-want) <= tol*math.Abs(want) }

// fakeSplicer reports fixed transition costs; it never splices.
type fakeSplicer struct{ costs proxy.TransitionCosts }

func (f *fakeSplicer) Splice(context.Context, *proxy.Flow, *net.TCPConn, *net.TCPConn) error {
	return nil
}
func (f *fakeSplicer) TransitionCosts() proxy.TransitionCosts { return f.costs }

// TestDecideResponse: the proxy's decisions over a run of responses:
// ineligible ones by reason; eligible ones relayed to measure, then
// spliced to measure, then by the model with 1 in splice_explore the
// other way; the always policy splices every eligible one; every
// decision counted.
func TestDecideResponse(t *testing.T) {
	explore := 3
	p := testProxy(Route{Path: "/", Action: config.Allow, Backends: backends("10.0.0.1:80"), Balance: "round_robin"})
	conf := p.conf()
	conf.SpliceMin, conf.SplicePolicy, conf.SpliceExplore = 64<<10, PolicyMeasured, &explore
	p.Flows = proxy.NewFlowTable(10)
	flow := func() *proxy.Flow {
		f := proxy.NewFlow("web", Kind, netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
		p.Flows.Admit(f)
		return f
	}
	c := &conn{p: p, flow: flow(), log: slog.New(slog.DiscardHandler), cr: bufio.NewReader(strings.NewReader("")), ur: bufio.NewReader(strings.NewReader(""))}
	sp := &fakeSplicer{}
	get := &http.Request{Method: http.MethodGet}
	resp := func(n int64) *http.Response { return &http.Response{ContentLength: n} }
	check := func(step string, req *http.Request, n int64, closing bool, splice bool, why string) {
		t.Helper()
		d := c.decideResponse(sp, req, resp(n), closing)
		if d.splice != splice || d.reason.String() != why {
			t.Fatalf("%s: %s/%s, want %s/%s", step, decisionName(d.splice), d.reason, decisionName(splice), why)
		}
	}
	check("HEAD", &http.Request{Method: http.MethodHead}, 1<<20, false, false, "head")
	check("closing", get, 1<<20, true, false, "closing")
	check("chunked", get, -1, false, false, "no_length")
	check("small", get, 4<<10, false, false, "below_splice_min")
	if d := c.decideResponse(nil, get, resp(1<<20), false); d.reason != reasonNotCounted || d.splice {
		t.Fatalf("no splicer: %+v", d)
	}
	check("no estimates", get, 1<<20, false, false, "measure")
	// Relayed responses measured (4 KiB to 1 MiB, 1 GB/s + 100 µs).
	for _, n := range []int64{4 << 10, 64 << 10, 1 << 20} {
		p.splice.relayed.add(n, 100*time.Microsecond+time.Duration(n))
	}
	check("relayed known", get, 1<<20, false, true, "measure")
	sp.costs = proxy.TransitionCosts{Splice: time.Millisecond, Unsplice: time.Millisecond, Splices: 3, Unsplices: 3}
	check("costs known", get, 1<<20, false, true, "measure")
	// Another connection that was spliced is open: the splice to
	// measure is left to it (this one stays clear of the queue).
	other := flow()
	p.splice.markDiverted(other.ID)
	if d := c.decideResponse(sp, get, resp(1<<20), false); d.splice || d.reason != reasonMeasure || !d.deferred {
		t.Fatalf("measure with another diverted connection open: %+v", d)
	}
	p.Flows.Remove(other) // it ended: this one measures
	check("the other ended", get, 1<<20, false, true, "measure")
	// Spliced responses measured: 4 GB/s + 50 µs.
	for _, n := range []int64{64 << 10, 1 << 20, 16 << 20} {
		p.splice.spliced.add(n, 50*time.Microsecond+time.Duration(n/4))
	}
	// 1 MiB: relayed 1.15 ms, spliced 2 + 0.31 ms; 16 MiB: 16.9 ms and
	// 2 + 4.2 ms. An Explorer replayed alongside says which explore.
	want := map[string]uint64{}
	x := Explorer{N: int64(explore)}
	est := p.splice.estimates(sp, 0)
	for i := 1; i <= 40; i++ {
		n, pays := int64(1<<20), false
		if i%2 == 0 {
			n, pays = 16<<20, true
		}
		splice, why, relayed, spliced := Decide(n, est, false)
		if splice != pays || (relayed > spliced) != pays {
			t.Fatalf("%d bytes: splice %v (%s), predicted relayed %v, spliced %v", n, splice, why, relayed, spliced)
		}
		if x.Next(relayed, spliced) {
			splice, why = !splice, "explore"
		}
		want[decisionName(splice)+"/"+why]++
		check(fmt.Sprint(n), get, n, false, splice, why)
	}
	if want["relayed/explore"]+want["spliced/explore"] == 0 || want["spliced/pays"] == 0 || want["relayed/does_not_pay"] == 0 {
		t.Errorf("the run lacks a kind of decision: %v", want)
	}
	// With another diverted connection open, a splice to explore waits
	// for it (1 MiB: the model relays); once this connection was
	// spliced itself, the exploration that was due comes at once.
	other = flow()
	p.splice.markDiverted(other.ID)
	for range 10 {
		d := c.decideResponse(sp, get, resp(1<<20), false)
		if d.splice || d.reason != reasonDoesNotPay {
			t.Fatalf("explored with another diverted connection open: %+v", d)
		}
		want["relayed/does_not_pay"]++
	}
	c.everSpliced = true
	check("diverted itself", get, 1<<20, false, true, "explore")
	want["spliced/explore"]++
	// The body at the gateway already, but for less than splice_min:
	// read into the proxy's buffer, or received by its socket unread.
	c.ur = bufio.NewReader(strings.NewReader(strings.Repeat("b", 4096)))
	c.ur.Peek(1)
	check("arrived, read", get, 64<<10+4095, false, false, "arrived")
	// One byte more is on its way: the model decides.
	if d := c.decideResponse(sp, get, resp(64<<10+4096), false); d.reason == reasonArrived || d.onTheWay != 64<<10 {
		t.Fatalf("splice_min on its way: %+v", d)
	} else {
		want[decisionName(d.splice)+"/"+d.reason.String()]++
	}
	c.ur = bufio.NewReader(strings.NewReader(""))
	up, backend := tcpPair(t)
	c.up = up
	if _, err := backend.Write(make([]byte, 48<<10)); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); receivedUnread(up) < 48<<10; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the socket received %d of 48 KiB", receivedUnread(up))
		}
	}
	check("arrived, unread", get, 112<<10-1, false, false, "arrived")
	c.up = nil
	want["relayed/arrived"] += 2
	// Pipelined: a request buffered already.
	c.cr = bufio.NewReader(strings.NewReader("GET / HTTP/1.1\r\n"))
	c.cr.Peek(1)
	check("pipelined", get, 1<<20, false, false, "pipelined")
	c.cr = bufio.NewReader(strings.NewReader(""))
	// The CPUs saturated (no idle time between two samples): with
	// queued bytes (nfqueue) the model's splice is relayed, in the
	// kernel it stands; with splice_idle_min 0 nobody looks.
	busy := uint64(0)
	p.splice.cpu.read = func() (uint64, uint64, bool) { busy += 100; return busy, busy, true }
	idleMin := 10
	conf.SpliceIdleMin = &idleMin
	sp.costs.QueuedBytes = true
	p.splice.cpu.idleShare(time.Now().Add(-time.Hour)) // the first sample
	check("16 MiB, CPU busy, queued", get, 16<<20, false, false, "cpu_busy")
	sp.costs.QueuedBytes = false
	check("16 MiB, CPU busy, in the kernel", get, 16<<20, false, true, "pays")
	sp.costs.QueuedBytes = true
	idleMin = 0
	check("16 MiB, CPU not looked at", get, 16<<20, false, true, "pays")
	want["relayed/cpu_busy"]++
	want["spliced/pays"] += 2
	conf.SplicePolicy = PolicyAlways
	check("always", get, 1<<20, false, true, "always")
	check("always, small", get, 4<<10, false, false, "below_splice_min")

	counts := map[string]uint64{}
	for s := range 2 {
		for r := range numReasons {
			if n := p.splice.decisions[s][r].Load(); n > 0 {
				counts[decisionName(s == 1)+"/"+reason(r).String()] = n
			}
		}
	}
	for k, v := range map[string]uint64{"relayed/head": 1, "relayed/closing": 1, "relayed/no_length": 1, "relayed/below_splice_min": 2,
		"relayed/measure": 2, "spliced/measure": 3, "relayed/pipelined": 1, "spliced/always": 1} {
		want[k] = v
	}
	for k, v := range want {
		if counts[k] != v {
			t.Errorf("%s: %d decisions, want %d (all: %v)", k, counts[k], v, counts)
		}
	}
	if len(counts) != len(want) {
		t.Errorf("decisions %v, want %v", counts, want)
	}
}

// TestExplorer: exploring costs at most 1/N of the predicted time of
// the ways chosen, comes every time where the two ways are within 1/N,
// seldom where one is far better, and savings do not pile up into a
// burst when the gap narrows.
func TestExplorer(t *testing.T) {
	ms := func(f float64) time.Duration { return time.Duration(f * 1e6) }
	for _, c := range []struct {
		n                 int64
		relayed, spliced  time.Duration
		decisions, explor int
	}{
		{0, ms(1), ms(5), 400, 0},
		{10, ms(1), ms(5), 400, 10},    // gap 4 ms, saves 0.1 ms each
		{10, ms(5), ms(1), 400, 10},    // the other way round
		{10, ms(1), ms(1.1), 400, 400}, // gap 0.1 ms = 1/10 of 1 ms: every time
		{50, ms(1), ms(30), 10000, 6},  // 1 MiB on NFQUEUE: 1 in 1450
	} {
		x := Explorer{N: c.n}
		got := 0
		var cost, total time.Duration
		for range c.decisions {
			total += min(c.relayed, c.spliced)
			if x.Next(c.relayed, c.spliced) {
				got++
				cost += max(c.relayed, c.spliced) - min(c.relayed, c.spliced)
			}
		}
		if c.n > 0 && cost > total/time.Duration(c.n) {
			t.Errorf("N %d, %v/%v: exploring cost %v of %v", c.n, c.relayed, c.spliced, cost, total)
		}
		if got != c.explor {
			t.Errorf("N %d, %v/%v: %d explorations in %d, want %d", c.n, c.relayed, c.spliced, got, c.decisions, c.explor)
		}
	}
	// Far apart for long, then close: one exploration at once, then the
	// usual pace, not a burst of the savings.
	x := Explorer{N: 10}
	for range 900 { // 990 would pay for one
		if x.Next(ms(1), ms(100)) {
			t.Fatal("explored 99 ms for 1 ms savings")
		}
	}
	var seq []bool
	for range 6 {
		seq = append(seq, x.Next(ms(1), ms(1.2))) // gap 2 decisions' savings
	}
	if fmt.Sprint(seq) != "[true false true false true false]" {
		t.Errorf("after the gap narrowed: %v", seq)
	}
}

// TestCPULoad: the idle share is that of the last sampled period, known
// from the second sample on, sampled at most every cpuSampleEvery;
// /proc/stat's line parses, and the real one reads.
func TestCPULoad(t *testing.T) {
	samples := [][2]uint64{{100, 1000}, {190, 1100}, {290, 1200}, {300, 1300}}
	i := 0
	l := cpuLoad{read: func() (uint64, uint64, bool) { s := samples[i]; i++; return s[0], s[1], true }, idle: -1}
	now := time.Now()
	for _, c := range []struct {
		after time.Duration
		want  float64
	}{
		{0, -1},                   // one sample: unknown
		{cpuSampleEvery / 2, -1},  // too soon: not sampled
		{cpuSampleEvery, 0.1},     // 90 busy of 100
		{2 * cpuSampleEvery, 0},   // 100 of 100
		{2*cpuSampleEvery + 1, 0}, // too soon
		{3 * cpuSampleEvery, 0.9}, // 10 of 100
	} {
		if got := l.idleShare(now.Add(c.after)); got < c.want-1e-9 || got > c.want+1e-9 {
			t.Errorf("after %v: idle %v, want %v", c.after, got, c.want)
		}
	}
	if i != len(samples) {
		t.Errorf("%d samples read, want %d", i, len(samples))
	}
	busy, total, ok := parseCPULine([]byte("cpu  10 1 5 100 4 2 3 0 7 0"))
	if !ok || busy != 21 || total != 125 {
		t.Errorf("parseCPULine: busy %d total %d ok %v, want 21 125 true", busy, total, ok)
	}
	for _, bad := range []string{"cpu0 1 2 3 4 5 6 7 8", "cpu 1 2 3", "cpu 1 2 x 4 5 6 7 8", ""} {
		if _, _, ok := parseCPULine([]byte(bad)); ok {
			t.Errorf("parseCPULine(%q) ok", bad)
		}
	}
	if _, total, ok := readProcStat(); !ok || total == 0 {
		t.Errorf("readProcStat: total %d ok %v", total, ok)
	}
}

// TestDecideHugeLength: a backend's Content-Length may be up to 2^63-1
// (net/http reads 63 bits), and a body time of that many bytes does not
// fit a time.Duration: the conversion gave a negative prediction (on
// amd64 the smallest Duration), so the choice was arbitrary, and the
// Explorer, saving a share of the shorter prediction, saved that
// negative share: one such response stopped exploring for the
// process's life (it would take some 10^12 ordinary responses to save
// back). Predictions saturate instead.
func TestDecideHugeLength(t *testing.T) {
	est := Estimates{Relayed: line(200, 100), Spliced: line(100, 400), Transition: 3 * time.Millisecond, TransitionOK: true}
	for _, n := range []int64{1e18, math.MaxInt64} {
		splice, why, relayed, spliced := Decide(n, est, false)
		if relayed <= 0 || spliced <= 0 {
			t.Errorf("length %d: splice %v (%s), predicted %v relayed, %v spliced; want positive times", n, splice, why, relayed, spliced)
		}
		if n == 1e18 && (!splice || why != "pays") {
			// 10^19 ns relayed (saturated), 2.5*10^18 spliced.
			t.Errorf("length %d: splice %v (%s), predicted %v relayed, %v spliced; spliced is 4 times as fast", n, splice, why, relayed, spliced)
		}
		x := Explorer{N: 10}
		x.Next(relayed, spliced)
		ms := func(f float64) time.Duration { return time.Duration(f * 1e6) }
		explored := false
		for range 10 {
			explored = explored || x.Next(ms(1), ms(1.1)) // within 1/N: every time, as a rule
		}
		if !explored {
			t.Errorf("length %d: no exploration in 10 responses after it", n)
		}
	}
}
