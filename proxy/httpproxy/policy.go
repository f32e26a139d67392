package httpproxy

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"spliced/proxy"
	"spliced/tcprepair"
)

// Whether a response is spliced (policy.go): the proxy's choice per
// response, with its reason, counted in
// spliced_http_splice_decisions_total{decision, reason}.
//
// A response can be spliced only when its end is known and nothing
// else needs the proxy: a Content-Length of at least splice_min, not an
// answer to HEAD, the connection not closing after it, no next request
// already read. Of those (the eligible ones), the always policy splices
// every one. The measured policy relays one whose body is at the gateway
// already but for less than splice_min (reason arrived): a splice takes
// over the bytes the gateway holds and sends them again itself, one raw
// packet each, which costs more than relaying them, and only what is
// still on its way can pass spliced (64 KiB responses from the bench's
// keep-alive nginx: 728 chosen for a splice in 4 s, 128 splices done,
// the others' bodies relayed by the drain until the client asked again,
// at 0.90 of the relayed rate). Of the others it splices one
// when its predicted time spliced, a splice plus its unsplice included,
// is shorter than its predicted time relayed:
//
//	relayed:  R(n) = fixed_r + n × perByte_r
//	spliced:  S(n) = splice + unsplice + fixed_s + n × perByte_s
//
// R is fitted to relayed responses (sizeFit): the time from the response
// head read to the client's next request; S's line to spliced ones:
// from the flow spliced to the client's next request as the gateway
// saw it (proxy.Flow.UnspliceStarted), the splice's own time left out;
// splice and unsplice are the gateway's moving averages
// (proxy.CostReporter). Both samples end at the client's next request,
// so a client's pause before it counts alike either way. Responses
// without a next request on their connection give no sample.
//
// Until there are estimates the proxy measures: eligible responses are
// relayed while R has fewer than minFitSamples samples (relaying costs
// nothing extra and small responses feed R too), then spliced while S
// or the transition costs are missing. After that, now and then an
// eligible response goes the way the model did not choose, so that the
// other estimate stays fresh (reason explore; Explorer says when: at
// most 1/splice_explore of the predicted time goes to exploring).
type decision struct {
	splice bool
	reason reason
	// The predictions, when the model weighed them.
	relayed, spliced time.Duration
	// deferred: a splice to measure or explore was left to a
	// connection spliced before (spliceState.diverted).
	deferred bool
	// onTheWay is the body's length less what the gateway holds of it
	// already (read, or received unread), for the measured policy.
	onTheWay int64
}

type reason uint8

const (
	reasonNotCounted reason = iota // no splicer: nothing decided
	reasonHead
	reasonClosing
	reasonPipelined
	reasonNoLength
	reasonBelowMin
	reasonArrived
	reasonAlways
	reasonMeasure
	reasonPays
	reasonDoesNotPay
	reasonExplore
	reasonCPUBusy
	numReasons
)

var reasonNames = [numReasons]string{
	reasonNotCounted: "",
	reasonHead:       "head",
	reasonClosing:    "closing",
	reasonPipelined:  "pipelined",
	reasonNoLength:   "no_length",
	reasonBelowMin:   "below_splice_min",
	reasonArrived:    "arrived",
	reasonAlways:     "always",
	reasonMeasure:    "measure",
	reasonPays:       "pays",
	reasonDoesNotPay: "does_not_pay",
	reasonExplore:    "explore",
	reasonCPUBusy:    "cpu_busy",
}

func (r reason) String() string { return reasonNames[r] }

// Estimates are what the measured policy weighs a response with.
type Estimates struct {
	// Transition is a splice plus its unsplice; TransitionOK when the
	// splicer measured both.
	Transition   time.Duration
	TransitionOK bool
	// Relayed and Spliced are the body times' lines.
	Relayed, Spliced Fit
	// QueuedBytes: spliced bytes pass through the daemon (the nfqueue
	// datapath), costing more CPU than relaying them; CPUBusy: the
	// machine's idle CPU share is below splice_idle_min (cpuLoad). Both
	// together, the policy relays: times would favour a splice that
	// slows everything else (reason cpu_busy).
	QueuedBytes, CPUBusy bool
}

// Decide is the measured policy for an eligible response of length
// bytes (see decision): explore asks for the choice the model would not
// make.
func Decide(length int64, est Estimates, explore bool) (splice bool, why string, relayed, spliced time.Duration) {
	d := decide(length, est, explore)
	return d.splice, d.reason.String(), d.relayed, d.spliced
}

// Explorer decides when the measured policy explores. For each response
// the model decided it saves 1/N of the predicted time of the way
// chosen, and it explores once the savings cover what going the other
// way is predicted to cost more (the gap between the two predictions),
// then saves from zero again. So exploring costs at most 1/N of the
// predicted time, and comes often where the two ways are close (where
// fresh estimates decide) and seldom where one is far better. N <= 0
// never explores. Integer nanoseconds: a test replays it exactly.
type Explorer struct {
	N     int64
	saved int64
}

// Next reports whether the response with these predictions explores.
func (x *Explorer) Next(relayed, spliced time.Duration) bool {
	if x.Due(relayed, spliced) {
		x.Spend()
		return true
	}
	return false
}

// Due saves for a response with these predictions and reports whether
// the savings cover exploring it; Spend explores.
func (x *Explorer) Due(relayed, spliced time.Duration) bool {
	if x.N <= 0 {
		return false
	}
	best, gap := int64(min(relayed, spliced)), int64(relayed-spliced)
	if gap < 0 {
		gap = -gap
	}
	x.saved = min(x.saved+best/x.N, gap)
	return x.saved >= gap
}

// Spend starts saving from zero, after an exploration.
func (x *Explorer) Spend() { x.saved = 0 }

func decide(length int64, est Estimates, explore bool) decision {
	switch {
	case est.QueuedBytes && est.CPUBusy:
		return decision{splice: false, reason: reasonCPUBusy}
	case !est.Relayed.OK:
		return decision{splice: false, reason: reasonMeasure}
	case !est.Spliced.OK || !est.TransitionOK:
		return decision{splice: true, reason: reasonMeasure}
	}
	d := decision{relayed: est.Relayed.Predict(length), spliced: est.Transition + est.Spliced.Predict(length)}
	d.splice = d.relayed > d.spliced
	d.reason = reasonDoesNotPay
	if d.splice {
		d.reason = reasonPays
	}
	if explore {
		d.splice, d.reason = !d.splice, reasonExplore
	}
	return d
}

// spliceState is a proxy's measurements and decisions.
type spliceState struct {
	relayed, spliced sizeFit
	cpu              cpuLoad
	mu               sync.Mutex
	explorer         Explorer // under mu
	// diverted are the IDs of the proxy's flows that were spliced:
	// after an unsplice the gateway keeps a flow's divert entries, and
	// every packet of it, relayed or not, passes through its queue for
	// the rest of the connection (the HTTP bench: 0.70x the relayed
	// rate for 1 MiB responses with 35 splices in 6300 responses on 8
	// connections). A splice the model did not choose (to measure, to
	// explore) is therefore done on a flow that bears that cost
	// already, while one is open. Under mu.
	diverted  map[uint64]struct{}
	decisions [2][numReasons]atomic.Uint64 // [spliced][reason]
}

// estimates returns the current estimates, with sp's transition costs;
// the CPU is looked at when splicing costs more of it per byte and
// idleMin (percent) is set.
func (s *spliceState) estimates(sp proxy.Splicer, idleMin int) Estimates {
	est := Estimates{Relayed: s.relayed.fit(), Spliced: s.spliced.fit()}
	if cr, ok := sp.(proxy.CostReporter); ok {
		c := cr.TransitionCosts()
		est.Transition = c.Splice + c.Unsplice
		est.TransitionOK = c.Splices > 0 && c.Unsplices > 0
		est.QueuedBytes = c.QueuedBytes
	}
	if est.QueuedBytes && idleMin > 0 {
		idle := s.cpu.idleShare(time.Now())
		est.CPUBusy = idle >= 0 && idle*100 < float64(idleMin)
	}
	return est
}

// decideResponse decides whether the response to req is spliced, counts
// the decision and logs it (debug). sp is nil when the service never
// splices.
func (c *conn) decideResponse(sp proxy.Splicer, req *http.Request, resp *http.Response, closing bool) decision {
	if sp == nil {
		return decision{}
	}
	conf := c.p.conf()
	var d decision
	var est Estimates
	switch {
	case req.Method == http.MethodHead:
		d.reason = reasonHead
	case closing:
		d.reason = reasonClosing
	case c.cr.Buffered() > 0:
		d.reason = reasonPipelined
	case resp.ContentLength < 0:
		d.reason = reasonNoLength
	case resp.ContentLength < int64(conf.SpliceMin):
		d.reason = reasonBelowMin
	case int64(c.ur.Buffered()) > resp.ContentLength:
		// The proxy read more than the response: the backend sent
		// bytes past its end. Relayed, they stay in the upstream
		// reader, and the connection is closed before it carries
		// another request (connect); spliced, they stayed in a reader
		// the flow dropped when it came back, unseen, and the rest of
		// what they began answered the client's next request on the
		// same connection (TestSplicedResponseReadAhead). (With the
		// measured policy such a response has arrived too.)
		d = decision{reason: reasonArrived, onTheWay: resp.ContentLength - int64(c.ur.Buffered())}
	case conf.SplicePolicy == PolicyAlways:
		d = decision{splice: true, reason: reasonAlways}
	default:
		onTheWay := resp.ContentLength - int64(c.ur.Buffered())
		if onTheWay >= int64(conf.SpliceMin) {
			// A system call, only when what was read does not decide.
			onTheWay -= receivedUnread(c.up)
		}
		if onTheWay < int64(conf.SpliceMin) {
			d = decision{reason: reasonArrived, onTheWay: onTheWay}
			break
		}
		st := &c.p.splice
		idleMin := 0
		if conf.SpliceIdleMin != nil {
			idleMin = *conf.SpliceIdleMin
		}
		est = st.estimates(sp, idleMin)
		d = decide(resp.ContentLength, est, false)
		// A splice only to measure or explore is left to a connection
		// spliced before, when another one is open (spliceState.diverted).
		elsewhere := !c.everSpliced && st.otherDiverted(c.p.Flows, c.flow.ID)
		if d.reason == reasonMeasure && d.splice && elsewhere {
			d.splice, d.deferred = false, true
		}
		if d.reason != reasonMeasure && d.reason != reasonCPUBusy {
			st.mu.Lock()
			st.explorer.N = 0
			if conf.SpliceExplore != nil {
				st.explorer.N = int64(*conf.SpliceExplore)
			}
			explore := st.explorer.Due(d.relayed, d.spliced)
			if explore && !d.splice && elsewhere {
				// Kept due: the next eligible response of a
				// diverted connection explores.
				explore, d.deferred = false, true
			}
			if explore {
				st.explorer.Spend()
			}
			st.mu.Unlock()
			if explore {
				d = decide(resp.ContentLength, est, true)
			}
		}
		d.onTheWay = onTheWay
	}
	spliced := 0
	if d.splice {
		spliced = 1
	}
	c.p.splice.decisions[spliced][d.reason].Add(1)
	if c.log.Enabled(context.Background(), slog.LevelDebug) {
		c.logDecision(d, resp.ContentLength, est)
	}
	return d
}

func (c *conn) logDecision(d decision, length int64, est Estimates) {
	attrs := []any{"decision", decisionName(d.splice), "reason", d.reason.String(), "content_length", length}
	if d.deferred {
		attrs = append(attrs, "deferred", true)
	}
	if d.reason == reasonArrived || d.reason >= reasonMeasure {
		attrs = append(attrs, "body_on_the_way", d.onTheWay)
	}
	if d.reason >= reasonMeasure {
		attrs = append(attrs, "queued_bytes", est.QueuedBytes, "cpu_busy", est.CPUBusy)
		attrs = append(attrs,
			"predicted_relayed_ns", int64(d.relayed), "predicted_spliced_ns", int64(d.spliced),
			slog.Group("estimates",
				"transition_ns", int64(est.Transition), "transition_ok", est.TransitionOK,
				"relayed_fixed_ns", int64(est.Relayed.Fixed), "relayed_ns_per_byte", est.Relayed.PerByte, "relayed_samples", est.Relayed.Samples, "relayed_ok", est.Relayed.OK,
				"spliced_fixed_ns", int64(est.Spliced.Fixed), "spliced_ns_per_byte", est.Spliced.PerByte, "spliced_samples", est.Spliced.Samples, "spliced_ok", est.Spliced.OK))
	}
	c.log.Debug("http splice decision", attrs...)
}

// receivedUnread is how many bytes c received that nobody read yet
// (SIOCINQ); 0 if it cannot tell, or for no connection.
func receivedUnread(c *net.TCPConn) int64 {
	if c == nil {
		return 0
	}
	n, err := tcprepair.Unread(c)
	if err != nil {
		return 0
	}
	return int64(n)
}

func decisionName(splice bool) string {
	if splice {
		return "spliced"
	}
	return "relayed"
}

// bodySample is a response whose delivery time is to be measured: its
// length, and when its head was read (relayed) or 0 (spliced: the
// gateway's times say).
type bodySample struct {
	length int64
	head   time.Time
}

// endRelayed records the relayed response's sample, if one waits: the
// client's next request just came.
func (c *conn) endRelayed(now time.Time) {
	if s := c.relayedSample; s.length >= 0 && !s.head.IsZero() {
		c.p.splice.relayed.add(s.length, now.Sub(s.head))
	}
	c.relayedSample = bodySample{}
}

// endSpliced records the spliced response's sample after an unsplice,
// if one waits and the response was delivered spliced (the unsplice did
// not come in its middle): from the flow spliced to the client's next
// request.
func (c *conn) endSpliced(rest int64) {
	s := c.splicedSample
	c.splicedSample = bodySample{}
	if s.length <= 0 || rest > 0 {
		return
	}
	at, next := c.flow.SplicedAt.Load(), c.flow.UnspliceStarted.Load()
	if at == 0 || next <= at {
		return
	}
	c.p.splice.spliced.add(s.length, time.Duration(next-at))
}

// spliceMetrics are the policy's counters and estimates.
func (p *Proxy) spliceMetrics() []proxy.Metric {
	var out []proxy.Metric
	st := &p.splice
	for s := range 2 {
		for r := reasonHead; r < numReasons; r++ {
			n := st.decisions[s][r].Load()
			if n == 0 {
				continue
			}
			out = append(out, proxy.Metric{Name: "spliced_http_splice_decisions_total",
				Help:    "Responses the HTTP proxy spliced or relayed, by reason (splicing on only).",
				Counter: true, Labels: []string{"decision", "reason"}, Values: []string{decisionName(s == 1), r.String()}, Value: float64(n)})
		}
	}
	if p.splicing() == nil {
		return out
	}
	est := st.estimates(p.splicing(), 0) // the CPU is not sampled for a scrape
	out = append(out, proxy.Metric{Name: "spliced_http_splice_transition_seconds",
		Help:  "The moving estimate of a splice plus its unsplice the measured policy weighs (0: not measured yet).",
		Value: est.Transition.Seconds()})
	for _, m := range []struct {
		mode string
		f    Fit
	}{{"relayed", est.Relayed}, {"spliced", est.Spliced}} {
		labels, values := []string{"mode"}, []string{m.mode}
		out = append(out,
			proxy.Metric{Name: "spliced_http_body_fixed_seconds", Help: "The measured policy's estimate of a response body's fixed time (time = fixed + length / rate).",
				Labels: labels, Values: values, Value: m.f.Fixed.Seconds()},
			proxy.Metric{Name: "spliced_http_body_rate_bytes_per_second", Help: "The measured policy's estimate of a response body's rate (0: not measured yet).",
				Labels: labels, Values: values, Value: m.f.Rate()},
			proxy.Metric{Name: "spliced_http_body_samples_total", Help: "Response bodies measured for the measured policy's estimates.",
				Counter: true, Labels: labels, Values: values, Value: float64(m.f.Samples)})
	}
	return out
}

// markDiverted notes that flow id was spliced (see diverted).
func (s *spliceState) markDiverted(id uint64) {
	s.mu.Lock()
	if s.diverted == nil {
		s.diverted = map[uint64]struct{}{}
	}
	s.diverted[id] = struct{}{}
	s.mu.Unlock()
}

// otherDiverted reports whether a flow other than self that was spliced
// is still open, forgetting those that ended.
func (s *spliceState) otherDiverted(flows *proxy.FlowTable, self uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	other := false
	for id := range s.diverted {
		if f := flows.Get(id); f == nil || f.State() == proxy.StateClosing {
			delete(s.diverted, id)
			continue
		}
		if id != self {
			other = true
		}
	}
	return other
}
