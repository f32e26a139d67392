package gateway

import (
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"spliced/api"
)

// A step of a transition (its phase in the metrics' names; type phase is
// the packet path's state of a transition): where a splice's or an
// unsplice's time goes. Each
// completed transition adds one sample per phase it ran, so the phase
// table (`splicectl status`, spliced_transition_phase_seconds) shows which
// wait to remove.
type step int

const (
	// Splice.
	stepDivert  step = iota // divert entries added (command packets, or a netlink round trip)
	stepDrain               // queued bytes moved, both ends acknowledged everything
	stepBarrier             // the queue's batched verdicts flushed after the freeze
	stepCapture             // both sockets captured with TCP_REPAIR
	stepInstall             // the engine's flow built
	stepRelease             // taken-over payload injected, held packets released
	stepPromote             // the flow handed to the BPF program (bpf datapath only)
	stepRecord              // the spliced flow listed and handed to the table (recorded for restarts after)
	// Unsplice.
	stepUnspliceDrain   // both ends acknowledged everything the engine forwarded
	stepUnspliceBarrier // the queue's batched verdicts flushed after the freeze
	stepRebuild         // both sockets rebuilt with TCP_REPAIR
	stepUnspliceRelease // held packets released to the sockets
	stepHandBack        // the proxy took the sockets back
	numSteps
)

var stepNames = [numSteps]struct{ transition, name string }{
	stepDivert:          {"splice", "divert"},
	stepDrain:           {"splice", "drain"},
	stepBarrier:         {"splice", "barrier"},
	stepCapture:         {"splice", "capture"},
	stepInstall:         {"splice", "install"},
	stepRelease:         {"splice", "release"},
	stepPromote:         {"splice", "promote"},
	stepRecord:          {"splice", "record"},
	stepUnspliceDrain:   {"unsplice", "drain"},
	stepUnspliceBarrier: {"unsplice", "barrier"},
	stepRebuild:         {"unsplice", "rebuild"},
	stepUnspliceRelease: {"unsplice", "release"},
	stepHandBack:        {"unsplice", "hand_back"},
}

// stopwatch times the phases of one transition; the samples are kept
// only if the transition completes (commit), so aborted transitions do not
// skew the table.
type stopwatch struct {
	last time.Time
	laps [numSteps]time.Duration
	ran  [numSteps]bool
}

func newStopwatch(start time.Time) *stopwatch { return &stopwatch{last: start} }

// lap ends phase p now: the time since the previous lap is p's.
func (s *stopwatch) lap(p step) {
	now := time.Now()
	s.laps[p] += now.Sub(s.last)
	s.ran[p] = true
	s.last = now
}

// commit adds the laps to the gateway's phase samples.
func (s *stopwatch) commit(g *Gateway) {
	for p := range numSteps {
		if s.ran[p] {
			g.phases[p].observe(s.laps[p])
		}
	}
}

// attrs are the laps for the transition's log line, in microseconds.
func (s *stopwatch) attrs() slog.Attr {
	var a []any
	for p := range numSteps {
		if s.ran[p] {
			a = append(a, stepNames[p].name, s.laps[p].Microseconds())
		}
	}
	return slog.Group("phases_us", a...)
}

// phaseTable returns the recent samples of every phase that has any.
func (g *Gateway) phaseTable() []api.Phase {
	var out []api.Phase
	for p := range numSteps {
		l := &g.phases[p]
		n := l.count.Load()
		if n == 0 {
			continue
		}
		out = append(out, api.Phase{Transition: stepNames[p].transition, Name: stepNames[p].name, Count: n,
			P50Us: l.percentile(0.5).Microseconds(), P99Us: l.percentile(0.99).Microseconds()})
	}
	return out
}

var descPhase = prometheus.NewDesc("spliced_transition_phase_seconds",
	"Time spent in each phase of completed splices and unsplices.", []string{"transition", "phase"}, nil)

// phaseHistograms are the Prometheus form of the phase samples.
func (g *Gateway) phaseHistograms(ch chan<- prometheus.Metric) {
	for p := range numSteps {
		if g.phases[p].count.Load() > 0 {
			ch <- g.phases[p].histogramOf(descPhase, stepNames[p].transition, stepNames[p].name)
		}
	}
}
