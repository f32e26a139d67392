package gateway

import (
	"sync/atomic"
	"time"

	"spliced/api"
	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/splice"
)

// A stall is a spliced flow whose data stopped in one direction while the
// flow is alive: the engine forwarded data that its receiver has not
// acknowledged for the service's splice.stall_after, and packets of the
// flow (retransmissions, duplicate ACKs, drops) still come. TCP repairs a
// loss within a few retransmission timeouts; a direction that stays stuck
// means a packet the engine forwards, rewrites or drops keeps the ends
// from agreeing. It is a bug to report, not a state to wait out: counted
// (spliced_stalled_flows_total), logged with the engine's state (at most
// one line a second, with the number suppressed), and shown by
// `splicectl flow ID`.

// stallWatch is what the reaper remembers of a spliced flow between its
// rounds.
type stallWatch struct {
	seen     uint64 // packets of the flow the engine handled, both ways
	activeAt int64  // when that number last grew (monotime)
	// stalled: reported, until the direction moves again. Atomic: the
	// API reads it without the reaper's lock.
	stalled [2]atomic.Bool
}

// stallReport is one newly stalled direction, logged after the reaper
// lets go of its lock.
type stallReport struct {
	sf  *splicedFlow
	dir splice.Dir
}

// checkStall updates sf's watch at now (splicedMu held) and returns the
// directions that stalled since the last round.
func checkStall(sf *splicedFlow, snap *splice.Flow, now int64, after time.Duration) []splice.Dir {
	st := sf.entry.Stats()
	w := &sf.stall
	// Packets the engine handled, and for a flow on the bpf datapath
	// (which counts no packets per flow) the time it last forwarded one.
	if seen := st[0].Packets + st[0].Dropped + st[1].Packets + st[1].Dropped + uint64(snap.LastSeen()); seen != w.seen || w.activeAt == 0 {
		w.seen, w.activeAt = seen, now
	}
	var newly []splice.Dir
	for d := range splice.Dir(2) {
		stuck := snap.Outstanding(d) && time.Duration(now-st[d].ProgressAt) >= after
		switch {
		case !stuck:
			w.stalled[d].Store(false)
		case !w.stalled[d].Load() && time.Duration(now-w.activeAt) < after:
			w.stalled[d].Store(true)
			newly = append(newly, d)
		}
	}
	return newly
}

// reportStalls counts and logs directions that stalled.
func (g *Gateway) reportStalls(reports []stallReport) {
	for _, r := range reports {
		g.stalledFlows.Add(1)
		ok, suppressed := g.stallLog.Allow("stall")
		if !ok {
			continue
		}
		f := r.sf.flow
		dirs := engineState(r.sf, monotime.Now())
		attrs := []any{logging.KeyFlow, f.ID, logging.KeyService, f.Service, logging.KeyClient, f.Client, logging.KeyServer, f.Server,
			"direction", r.dir.String(), "c2s", dirs[splice.C2S], "s2c", dirs[splice.S2C], "suppressed", suppressed}
		if cause := g.stallCause(r.sf); cause != "" {
			attrs = append(attrs, "likely_cause", cause)
		}
		g.log.Warn("spliced flow stalled: data unacknowledged while the flow is alive; please report it with this line", attrs...)
	}
}

// stallCause is what the gateway knows that drops a spliced flow's
// packets: a firewall chain that drops untracked packets, or a setting
// changed since the splice (the checks that refuse a splice run only
// before it): strict reverse path filtering, or forwarding turned off
// where the flow's packets arrive (net.ipv4.ip_forward=0 stalled every
// spliced flow, and the stall line said nothing of it).
func (g *Gateway) stallCause(sf *splicedFlow) string {
	if w := g.firewallWarnings(); len(w) > 0 {
		return w[0]
	}
	// Read afresh: the settings may have changed a moment ago (a
	// stall is reported once a second at most).
	g.rpf.forget()
	g.fwd.forget()
	l := legsOfKeys(sf.entry.Keys)
	if _, reason := g.reversePathRefusal(l); reason != "" {
		return reason
	}
	_, reason := g.forwardingRefusal(l)
	return reason
}

// stallAfter is a service's splice.stall_after.
func (g *Gateway) stallAfter(service string) time.Duration {
	if s := g.serviceOf(service); s != nil && s.Splice.StallAfter > 0 {
		return s.Splice.StallAfter.D()
	}
	return config.DefaultStallAfter
}

// linger is a service's splice.linger: how long a finished flow stays
// diverted, so that a lost final ACK or a retransmitted FIN is still
// rewritten.
func (g *Gateway) linger(service string) time.Duration {
	if s := g.serviceOf(service); s != nil && s.Splice.Linger > 0 {
		return s.Splice.Linger.D()
	}
	return config.DefaultLinger
}

// engineState describes both directions of a spliced flow for the API and
// the log.
func engineState(sf *splicedFlow, now int64) []api.Direction {
	snap := sf.entry.Snapshot()
	st := sf.entry.Stats()
	out := make([]api.Direction, 2)
	for d := range splice.Dir(2) {
		in := snap.Info(d)
		s := st[d]
		out[d] = api.Direction{
			Name: d.String(), SeqOffset: in.SeqOffset, HighestSeq: uint32(in.HighestSeq), HighestAck: uint32(in.HighestAck),
			Unacknowledged: uint32(in.HighestSeq - in.HighestAck), Window: in.Window, FIN: in.FIN,
			TSOffset: in.TSOffset, TSLearned: in.TSLearned,
			Packets: s.Packets, Bytes: s.Bytes, Dropped: s.Dropped, LastVerdict: s.LastVerdict.String(),
			ProgressAgeSec: time.Duration(now - s.ProgressAt).Seconds(), Stalled: sf.stall.stalled[d].Load(),
		}
		if !snap.Outstanding(d) {
			out[d].Unacknowledged = 0
		}
		if s.Dropped > 0 {
			out[d].LastDrop = s.LastDrop.String()
		}
	}
	return out
}
