package gateway

import (
	"errors"
	"path/filepath"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/splice"
	"spliced/splice/bpf"
)

// Restarts on the nfqueue datapath. The Go engine's flows live in the
// daemon, and a killed daemon's queues drop their packets (they have no
// bypass: an unrewritten packet is worse than a lost one). To let a new
// daemon resume them, each spliced flow is recorded in pinned BPF maps
// that no program uses (bpf.OpenStore, kernel.bpffs/spliced-nfqueue/
// TABLE): its tuples, its engine state and the gateway's meta record,
// written when the splice completes and its state refreshed every
// second; removed when the flow leaves the engine. The table, its divert
// entries and the queue rules outlive the daemon (the table is not
// owned), so while no daemon runs the flows' packets are dropped, never
// delivered unrewritten. The next daemon with the same configuration
// adopts every recorded flow (adoptStored) before any service accepts
// one, on the Go engine with its tracking state to be relearned (the
// record may be a second old, and the ends went on: splice.Flow.Relearn),
// and carries their divert entries into its table; TCP retransmits what
// the dead queue dropped. Like a flow adopted from the bpf datapath it
// is owned by no proxy: it cannot be unspliced, and a watched (HTTP)
// flow is reset at its next request.
//
// A daemon that will not run nfqueue over the record (kernel.datapath
// bpf, or auto with the program loaded) resets the recorded flows from
// their last state and removes the record, as spliced -cleanup does; so
// does a shutdown (SIGTERM), which resets its flows as before.

// storeSync is how often the recorded state of spliced flows on the
// nfqueue datapath is refreshed.
const storeSync = time.Second

// storeDir is the nfqueue datapath's record under cfg.
func storeDir(cfg *config.Config) string {
	return filepath.Join(cfg.Kernel.BPFFS, "spliced-nfqueue", cfg.Kernel.Table)
}

// openStore opens (or finds) the record of spliced flows for the nfqueue
// datapath. Without it (no bpf(2), no bpffs) spliced flows work as
// before but do not survive the daemon: that is logged, not fatal.
func (g *Gateway) openStore(cfg *config.Config) {
	dir := storeDir(cfg)
	fail := func(err error) {
		g.log.Warn("no record of spliced flows in the kernel: they will not survive a restart of the daemon", "pins", dir, logging.Err(err))
	}
	if err := bpf.MountBPFFS(cfg.Kernel.BPFFS); err != nil {
		fail(err)
		return
	}
	s, err := bpf.OpenStore(dir)
	var ie *bpf.IncompatibleError
	if errors.As(err, &ie) && !ie.OtherNetNS {
		g.log.Error("record of spliced flows removed: "+ie.Reason+"; its flows cannot be read, so they are not adopted (those the earlier table still diverts are reset as lost flows)", "pins", dir)
		if err := bpf.RemovePins(dir); err != nil {
			fail(err)
			return
		}
		s, err = bpf.OpenStore(dir)
	}
	if err != nil {
		fail(err)
		return
	}
	g.store = s
	g.log.Debug("record of spliced flows for restarts", "pins", dir, "reused", s.Reused())
}

// closeStore releases the record; at a shutdown (remove) it goes.
func (g *Gateway) closeStore(remove bool) {
	s := g.store
	if s == nil {
		return
	}
	g.storeMu.Lock()
	defer g.storeMu.Unlock()
	if g.storeClosed.Swap(true) {
		return
	}
	dir := s.PinDir()
	s.Close()
	if remove {
		if err := bpf.RemovePins(dir); err != nil {
			g.log.Error("remove the record of spliced flows", "pins", dir, logging.Err(err))
		}
	}
}

// storeFlow records a flow the engine spliced, for the next daemon.
func (g *Gateway) storeFlow(sf *splicedFlow) {
	s := g.openedStore()
	if s == nil {
		return
	}
	defer g.storeMu.RUnlock()
	e := sf.entry
	snap := e.Snapshot()
	err := s.PutFlowWatch(e.ID, e.Keys, snap.State(), e.Watch.Load())
	if err == nil {
		err = s.SetMeta(e.ID, metaOf(sf))
	}
	if err != nil {
		s.DeleteFlow(e.ID, e.Keys)
		if ok, suppressed := g.mapLog.Allow("record"); ok {
			g.log.Warn("record a spliced flow for restarts; it will not survive one", logging.KeyFlow, e.ID, logging.Err(err), "suppressed", suppressed)
		}
		return
	}
	sf.stored.Store(true)
	// Retired meanwhile (the reaper unstores after it removes the flow
	// from g.spliced): no record may outlive the flow.
	g.splicedMu.Lock()
	cur := g.spliced[e.ID]
	g.splicedMu.Unlock()
	if cur != sf {
		g.unstoreFrom(s, sf)
	}
}

// openedStore returns the record, read-locked, or nil (no record, or
// closed).
func (g *Gateway) openedStore() *bpf.Datapath {
	if g.store == nil {
		return nil
	}
	g.storeMu.RLock()
	if g.storeClosed.Load() {
		g.storeMu.RUnlock()
		return nil
	}
	return g.store
}

// unstore removes a flow's record: it left the engine.
func (g *Gateway) unstore(sf *splicedFlow) {
	if s := g.openedStore(); s != nil {
		g.unstoreFrom(s, sf)
		g.storeMu.RUnlock()
	}
}

func (g *Gateway) unstoreFrom(s *bpf.Datapath, sf *splicedFlow) {
	if sf.stored.Swap(false) {
		if err := s.DeleteFlow(sf.entry.ID, sf.entry.Keys); err != nil {
			g.log.Debug("remove a spliced flow's record", logging.KeyFlow, sf.entry.ID, logging.Err(err))
		}
	}
}

// syncStored refreshes the recorded state of the recorded flows, at most
// every storeSync, of those that moved since: a flow's state changes only
// with its packets, which change its last packet time. Writing every
// flow's state each time cost 9,900 idle flows a map update each per
// second, most of the daemon's idle CPU.
func (g *Gateway) syncStored(now time.Time) {
	if g.store == nil || now.Sub(g.storeSynced) < storeSync {
		return
	}
	s := g.openedStore()
	if s == nil {
		return
	}
	defer g.storeMu.RUnlock()
	g.storeSynced = now
	g.splicedMu.Lock()
	fs := make([]*splicedFlow, 0, len(g.spliced))
	for _, sf := range g.spliced {
		if sf.stored.Load() {
			fs = append(fs, sf)
		}
	}
	g.splicedMu.Unlock()
	for _, sf := range fs {
		snap := sf.entry.Snapshot()
		seen := snap.LastSeen()
		if seen == sf.storedSeen.Load() {
			continue
		}
		if err := s.PutState(sf.entry.ID, snap.State()); err != nil {
			if sf.stored.Load() {
				g.log.Debug("refresh a spliced flow's record", logging.KeyFlow, sf.entry.ID, logging.Err(err))
			}
			continue
		}
		sf.storedSeen.Store(seen)
	}
}

// storeLast writes the state of every recorded flow that moved since the
// last refresh, at once: the daemon leaves them for the next one (see
// leave), whose relearning then starts from their last packets.
func (g *Gateway) storeLast() {
	g.storeSynced = time.Time{}
	g.syncStored(time.Now())
}

// adoptStored adopts the flows an earlier daemon recorded (see above).
// Called at the start like adoptPinned.
func (g *Gateway) adoptStored() {
	s := g.store
	if s == nil || !s.Reused() {
		return
	}
	flows, broken, err := s.TakePinnedFlows()
	if err != nil {
		g.log.Error("read the record of spliced flows; none adopted", logging.Err(err))
		return
	}
	if len(broken) > 0 {
		g.log.Warn("incomplete flows in the record removed (a daemon died while it wrote or removed them)", "flows", broken)
	}
	now := time.Now()
	spec := g.manager().Spec()
	// Into a table of their own until the new table is installed (see
	// activateStored).
	pending := splice.NewTable()
	n := 0
	for _, pf := range flows {
		sf, err := g.adoptOne(pf, now, int(max(spec.Divert.Queues, 1)), spec.Divert.Queue, true, pending)
		if err != nil {
			g.log.Warn("recorded flow not adopted; its record removed", logging.KeyFlow, pf.ID, logging.Err(err))
			s.DeleteFlow(pf.ID, pf.Keys)
			continue
		}
		sf.stored.Store(true)
		g.pendingStored = append(g.pendingStored, sf)
		n++
		f := sf.flow
		g.log.Debug("flow adopted", logging.KeyFlow, f.ID, logging.KeyService, f.Service, logging.KeyClient, f.Client,
			logging.KeyServer, f.Server, "datapath", "nfqueue", "record_c2s", recordAttrs(&pf.State.Dirs[0]), "record_s2c", recordAttrs(&pf.State.Dirs[1]),
			"record_age_ms", monotime.Since(pf.State.LastSeen).Milliseconds())
	}
	g.log.Info("adopted spliced flows from the nfqueue datapath's record", "flows", n, "pins", s.PinDir())
}

// recordAttrs describes one direction of a recorded state for the log.
func recordAttrs(d *splice.DirState) map[string]any {
	return map[string]any{"snd_nxt": uint32(d.SndNxt), "ack_seen": uint32(d.AckSeen), "max_win": d.MaxWin,
		"ts_off": d.TSOff, "ts_jump": d.TSJump, "flags": d.Flags}
}

// activateStored hands the adopted recorded flows to the engine, once the
// new table is installed and every packet queued before it is gone:
// until then their packets are dropped (no flow), and TCP retransmits
// them. A packet that waits in a queue while the table is replaced
// resumes in the new table's hooks and passes its divert chain again;
// rewritten before, it would be rewritten twice (on a transparent flow
// its tuple is unchanged by the rewrite, so it matches again): a
// timestamp pushed ahead by the PAWS jump twice, which the receiver
// takes and then refuses every later segment of the flow, or data at a
// wrong offset. Measured before: 7 of 1000 transparent flows stalled for
// ever after a restart.
func (g *Gateway) activateStored() {
	pending := g.pendingStored
	g.pendingStored = nil
	if len(pending) == 0 {
		return
	}
	spec := g.manager().Spec()
	start := time.Now()
	for i := range max(spec.Divert.Queues, 1) {
		if !awaitEmptyQueue(spec.Divert.Queue+i, 5*time.Second, 100*time.Microsecond) {
			g.log.Warn("adopted flows: a queue did not empty after the table was installed; a packet of an adopted flow queued before may be rewritten twice", logging.KeyQueue, spec.Divert.Queue+i)
		}
	}
	now := monotime.Now()
	var gone []*splicedFlow
	for _, sf := range pending {
		old := sf.entry
		snap := old.Snapshot()
		e, err := g.engine.AdoptRelearn(old.ID, old.Keys, snap.State(), now)
		if err != nil {
			g.log.Warn("recorded flow not adopted; its record removed", logging.KeyFlow, old.ID, logging.Err(err))
			gone = append(gone, sf)
			continue
		}
		e.Watch.Store(old.Watch.Load())
		g.splicedMu.Lock()
		sf.entry = e
		g.splicedMu.Unlock()
	}
	for _, sf := range gone {
		g.splicedMu.Lock()
		delete(g.spliced, sf.flow.ID)
		g.splicedMu.Unlock()
		g.unstore(sf)
		g.conntrack.forget(sf.keys())
		g.flows.Remove(sf.flow)
	}
	g.log.Debug("adopted flows handed to the engine", "flows", len(pending)-len(gone), "waited_us", time.Since(start).Microseconds())
}
