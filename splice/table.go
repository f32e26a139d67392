package splice

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Entry is a spliced flow in the table: its engine state and its two
// input keys (which also give each direction's output addresses).
type Entry struct {
	ID   uint64 // the gateway's flow ID
	Keys [2]Key // tuples of packets arriving from the client and from the server

	// Watch asks the gateway to hear of new data from the client instead
	// of forwarding it (an HTTP proxy unsplices for the next request).
	// The engine itself never reads it.
	Watch atomic.Bool

	// Guarded by mu (next to Watch, where they cost no padding):
	// offloaded: another datapath (the kernel's, package splice/bpf)
	// holds the flow's state and rewrites its packets; flow is stale
	// until Reclaim. pinned: the flow must stay on this engine (an
	// unsplice is taking it back); Offload refuses it. gone: the flow
	// left the table (it ended); Offload refuses it, so that no other
	// datapath gets a flow nobody will retire. handing: between
	// BeginOffload and CompleteOffload the engine refuses the flow's
	// packets and nobody else rewrites them yet.
	offloaded, pinned, gone, handing bool

	mu    sync.Mutex // packets of one flow may arrive on several queues
	flow  Flow
	stats [2]DirStats
}

// ErrPinned is Offload's error for a pinned flow.
var ErrPinned = errors.New("the flow is pinned to the Go engine (an unsplice is taking it back)")

// ErrGone is Offload's error for a flow deleted from its table.
var ErrGone = errors.New("the flow ended (it left the splice table)")

// ErrOffloaded is Offload's error for a flow another datapath holds or
// is being handed already.
var ErrOffloaded = errors.New("the flow is offloaded already")

// ErrHandoff is Reclaim's error for a flow being handed over (between
// BeginOffload and CompleteOffload) that is not pinned: it is nobody's to
// take back yet; the caller drops the packet that wanted it.
var ErrHandoff = errors.New("the flow is being handed to another datapath")

// Pin keeps the flow on this engine: Offload refuses it until Unpin. An
// unsplice pins the flow before it takes it back (Reclaim), so an
// offload running meanwhile cannot hand the flow to the other datapath
// after the unsplice has begun.
func (e *Entry) Pin() {
	e.mu.Lock()
	e.pinned = true
	e.mu.Unlock()
}

// Unpin ends Pin: the flow may be offloaded again.
func (e *Entry) Unpin() {
	e.mu.Lock()
	e.pinned = false
	e.mu.Unlock()
}

// Offload hands the flow to another datapath: put receives the flow's
// state, under the entry's lock, and from then on (if put succeeds)
// TryProcess refuses the flow's packets until Reclaim. A packet the
// engine processed is in the state put receives, or is refused: none
// is lost between the two. It is BeginOffload and CompleteOffload with
// nothing between them.
func (e *Entry) Offload(put func(State) error) error {
	if err := e.BeginOffload(); err != nil {
		return err
	}
	return e.CompleteOffload(put)
}

// BeginOffload starts handing the flow to another datapath: from now on
// TryProcess refuses its packets (Offloaded reports true), so the state
// CompleteOffload hands over is the one the engine's last packet left.
// Between the two the caller makes sure that every packet the engine
// decided to forward is out before the other datapath forwards any: a
// verdict sent late would put an older packet behind newer ones (near
// the end of a flow, an old ACK after the receiver's socket closed,
// which answers it with a reset).
func (e *Entry) BeginOffload() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.offloaded || e.handing {
		return fmt.Errorf("flow %d: %w", e.ID, ErrOffloaded)
	}
	if e.pinned {
		return ErrPinned
	}
	if e.gone {
		return ErrGone
	}
	e.handing = true
	return nil
}

// CompleteOffload ends a handoff BeginOffload started: put receives the
// flow's state, under the entry's lock; if it succeeds the other
// datapath holds the flow until Reclaim. If it fails, or the flow was
// pinned meanwhile (ErrPinned: an unsplice is taking it back) or left
// its table (ErrGone), the engine takes the flow's packets again, from
// the same state.
func (e *Entry) CompleteOffload(put func(State) error) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.handing {
		return fmt.Errorf("flow %d: no offload begun", e.ID)
	}
	e.handing = false
	if e.pinned {
		return ErrPinned
	}
	if e.gone {
		return ErrGone
	}
	if err := put(e.flow.State()); err != nil {
		return err
	}
	e.offloaded = true
	return nil
}

// Reclaim takes an offloaded flow back: get returns its state, under the
// entry's lock (TryProcess waits meanwhile, so the flow's next packet in
// the engine sees the state get returned). It reports whether it took
// the flow back; on error the flow stays offloaded. It never waits for a
// handoff (one runs on a queue's reader, which the handoff waits for):
// during one a pinned flow is the engine's already (the pin turns the
// handoff back: false, nil), an unpinned one nobody's (ErrHandoff).
func (e *Entry) Reclaim(get func() (State, error), now int64) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.handing {
		if e.pinned {
			return false, nil
		}
		return false, ErrHandoff
	}
	if !e.offloaded {
		return false, nil
	}
	st, err := get()
	if err != nil {
		return false, err
	}
	e.absorb(st, now)
	e.offloaded = false
	return true, nil
}

// HandingOff reports whether the flow is between BeginOffload and
// CompleteOffload.
func (e *Entry) HandingOff() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.handing
}

// OffloadState reports, read together, whether another datapath holds
// the flow or is being handed it (offloaded, as Offloaded), and whether
// the handoff is still under way (handing, as HandingOff).
func (e *Entry) OffloadState() (offloaded, handing bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.offloaded || e.handing, e.handing
}

// CongestionDrop reports whether the engine drops p, a packet of
// direction d, as one marked CE toward a receiver without ECN (DropCE),
// whatever else it would decide: the bpf datapath passes such packets to
// the queue rather than count a verdict of its own, and the gateway
// drops them without taking the flow back.
func (e *Entry) CongestionDrop(p *Packet, d Dir) bool {
	e.mu.Lock()
	strip := e.flow.closed&(flowStripECN<<d) != 0
	e.mu.Unlock()
	return strip && p.ECN() == ECNCE
}

// Offloaded reports whether another datapath holds the flow, or is
// being handed it (BeginOffload).
func (e *Entry) Offloaded() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.offloaded || e.handing
}

// SetSnapshot replaces the engine's copy of an offloaded flow's state
// with the other datapath's, read at now, for readers (Snapshot, Stats)
// only: the reaper and the API see the flow through it. It changes
// nothing of a flow the engine runs.
func (e *Entry) SetSnapshot(st State, now int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.offloaded {
		e.absorb(st, now)
	}
}

// absorb replaces the flow's state (e.mu held) with another datapath's.
// Stats count the stream bytes the state moved by (not packets, which
// the other datapath does not count per flow) and progress as Process
// does.
func (e *Entry) absorb(st State, now int64) {
	nf := FlowFromState(st)
	for d := range e.flow.d {
		o, n := &e.flow.d[d], &nf.d[d]
		if o.sndNxt.LessThan(n.sndNxt) {
			moved := uint32(n.sndNxt - o.sndNxt)
			if n.flags&dirFIN != 0 && o.flags&dirFIN == 0 && moved > 0 {
				moved-- // the FIN takes a sequence number, no byte
			}
			if o.sndNxt == o.ackSeen {
				e.stats[d].ProgressAt = now
			}
			e.stats[d].Bytes += uint64(moved)
		}
		if o.ackSeen.LessThan(n.ackSeen) {
			e.stats[d].ProgressAt = now
		}
	}
	e.flow = nf
}

// TryProcess is Process for a flow that may be offloaded: it reports
// false, and does nothing, when it is.
func (e *Entry) TryProcess(p *Packet, d Dir, now int64, csumComplete bool) (Verdict, bool) {
	e.mu.Lock()
	if e.offloaded || e.handing {
		e.mu.Unlock()
		return 0, false
	}
	return e.process(p, d, now, csumComplete), true
}

// LearnAck takes in the acknowledgment of a packet the gateway holds
// instead of forwarding (an unsplice holds new data; its ACK says what the
// sender received). The packet must pass the engine's checks, its
// sequence number in the receiver's window included: a receiver reads
// no ACK of a segment outside its window (tcp_validate_incoming checks
// the sequence first), and a forged one, whose sequence number needs
// only to lie ahead of what was forwarded to count as new data, would
// end an unsplice's drain while data was still in flight. An
// acknowledgment far behind passes (it teaches nothing): a held
// packet's is raised to what the rebuilt socket sent before it goes on,
// and on the bpf datapath the client's pure ACKs sent after its request
// overtake it (the program forwards them while the request waits in
// the queue), so by the time it is checked its ACK can lie more than a
// window behind theirs. It returns the verdict of the checks (Forward:
// the packet may be held) and changes nothing unless it is Forward.
func (e *Entry) LearnAck(p *Packet, d Dir) Verdict {
	e.mu.Lock()
	defer e.mu.Unlock()
	ackIn, v := e.flow.check(p, d, true)
	if v != Forward || p.TCP().Flags()&FlagACK == 0 {
		return v
	}
	o := &e.flow.d[1-d]
	if o.sndNxt.LessThan(ackIn) {
		// Relearning, the check lets it pass (see Relearn); a held
		// packet teaches nothing beyond what was forwarded.
		return Forward
	}
	o.ackSeen = maxSeq(o.ackSeen, ackIn)
	return Forward
}

// CheckHeld returns the verdict of LearnAck's checks of a packet of
// direction d that the gateway would hold rather than forward (new data
// for an unsplice), changing nothing: whether the packet may stand for
// its sender at all.
func (e *Entry) CheckHeld(p *Packet, d Dir) Verdict {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, v := e.flow.check(p, d, true)
	return v
}

// HighestSeq is the end of what the engine forwarded in direction d, in
// the sender's sequence space.
func (e *Entry) HighestSeq(d Dir) Seq {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.flow.d[d].sndNxt
}

// DirStats count what the engine did in one direction.
type DirStats struct {
	Packets, Bytes uint64 // forwarded; Bytes: new stream bytes (not retransmissions)
	Dropped        uint64 // failed a check
	// ProgressAt is when this direction last made progress (the
	// caller's clock, as now): its receiver acknowledged new data, or new data
	// went out while none was outstanding. Data outstanding long after
	// it, while packets still come, is a stall.
	ProgressAt  int64
	LastDrop    Verdict
	LastVerdict Verdict // of the last packet in this direction
}

// Process runs the engine on a parsed packet whose key matched direction d,
// under the entry's lock.
func (e *Entry) Process(p *Packet, d Dir, now int64, csumComplete bool) Verdict {
	e.mu.Lock()
	return e.process(p, d, now, csumComplete)
}

// process is Process with the lock held; it releases it.
func (e *Entry) process(p *Packet, d Dir, now int64, csumComplete bool) Verdict {
	s, o := &e.flow.d[d], &e.flow.d[1-d]
	before, idle, acked := s.sndNxt, s.sndNxt == s.ackSeen, o.ackSeen
	v := e.flow.Rewrite(p, d, &e.Keys[1-d], now, csumComplete)
	e.stats[d].LastVerdict = v
	if v == Forward {
		// Count stream bytes, not payload: a retransmission moves nothing
		// new, and a FIN takes a sequence number but is no byte.
		n := uint32(s.sndNxt - before)
		if n > 0 && p.TCP().Flags()&FlagFIN != 0 {
			n--
		}
		e.stats[d].Packets++
		e.stats[d].Bytes += uint64(n)
		if n > 0 && idle {
			e.stats[d].ProgressAt = now
		}
		if o.ackSeen != acked {
			e.stats[1-d].ProgressAt = now
		}
	} else {
		e.stats[d].Dropped++
		e.stats[d].LastDrop = v
	}
	e.mu.Unlock()
	return v
}

// Stats returns the forwarding counters of both directions.
func (e *Entry) Stats() [2]DirStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stats
}

// Snapshot returns a copy of the engine state.
func (e *Entry) Snapshot() Flow {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.flow
}

// Table maps both directions' keys of every spliced flow to its entry.
type Table struct {
	mu sync.RWMutex
	m  map[Key]*Entry
}

// NewTable returns an empty table.
func NewTable() *Table { return &Table{m: map[Key]*Entry{}} }

// Add creates the flow for p and inserts both its keys.
func (t *Table) Add(id uint64, p *Params, now int64) (*Entry, error) {
	f, err := NewFlow(p, now)
	if err != nil {
		return nil, err
	}
	keys := p.Keys()
	return t.insert(&Entry{ID: id, Keys: keys, flow: f}, now)
}

// insert adds an entry under both its keys, unless a key is taken.
func (t *Table) insert(e *Entry, now int64) (*Entry, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range e.Keys {
		if old, ok := t.m[k]; ok {
			return nil, fmt.Errorf("tuple %v already belongs to spliced flow %d", k, old.ID)
		}
	}
	e.stats[C2S].ProgressAt, e.stats[S2C].ProgressAt = now, now
	t.m[e.Keys[C2S]] = e
	t.m[e.Keys[S2C]] = e
	return e, nil
}

// Adopt inserts a flow that another datapath holds (offloaded: the
// engine refuses its packets until Reclaim) from that datapath's state:
// a flow a restarted daemon finds in the kernel's maps. Its stats start
// at zero.
func (t *Table) Adopt(id uint64, keys [2]Key, st State, now int64) (*Entry, error) {
	if keys[C2S] == keys[S2C] {
		return nil, fmt.Errorf("both directions have the tuple %v", keys[C2S])
	}
	return t.insert(&Entry{ID: id, Keys: keys, flow: FlowFromState(st), offloaded: true}, now)
}

// AdoptRelearn inserts a flow on this engine from a record of its state
// that may be old (see Flow.Relearn): the tracking state is relearned
// from the flow's next packets, each direction's largest window is the
// largest its receiver can advertise, and it counts as seen now.
func (t *Table) AdoptRelearn(id uint64, keys [2]Key, st State, now int64) (*Entry, error) {
	if keys[C2S] == keys[S2C] {
		return nil, fmt.Errorf("both directions have the tuple %v", keys[C2S])
	}
	f := FlowFromState(st)
	f.Relearn()
	f.lastSeen = now
	// The record's largest windows are old too: the ends may have
	// opened them since, and the senders filled them. Take the largest
	// window each receiver can advertise, so that no retransmission of
	// what was in flight falls below the lower bound of the checks.
	for d := range f.d {
		f.d[d].maxWin = max(f.d[d].maxWin, 0xffff<<f.d[1-d].wsIn)
	}
	return t.insert(&Entry{ID: id, Keys: keys, flow: f}, now)
}

// Lookup finds the flow of a packet key and the direction it travels.
func (t *Table) Lookup(k Key) (*Entry, Dir, bool) {
	t.mu.RLock()
	e, ok := t.m[k]
	t.mu.RUnlock()
	if !ok {
		return nil, 0, false
	}
	if k == e.Keys[C2S] {
		return e, C2S, true
	}
	return e, S2C, true
}

// Delete removes a flow's keys.
func (t *Table) Delete(e *Entry) {
	t.mu.Lock()
	for _, k := range e.Keys {
		if t.m[k] == e {
			delete(t.m, k)
		}
	}
	t.mu.Unlock()
	e.mu.Lock()
	e.gone = true
	e.mu.Unlock()
}

// Len is the number of flows.
func (t *Table) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.m) / 2
}

// Entries returns every flow.
func (t *Table) Entries() []*Entry {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*Entry, 0, len(t.m)/2)
	for k, e := range t.m {
		if k == e.Keys[C2S] {
			out = append(out, e)
		}
	}
	return out
}
