//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// DefaultMark is the skb mark bit set on packets the program rewrote.
const DefaultMark = 0x20000000

// Counter indexes of Counters: the splice.Verdict values the program
// yields, and two of its own.
const (
	CounterPass  = 9  // not handled: passed on untouched (to the queue)
	CounterError = 10 // a helper failed after the state moved on: dropped
	// CounterRedirect counts the forwarded packets (counted in
	// splice.Forward too) sent to their egress device (Options.Redirect).
	CounterRedirect = 11
	NumCounters     = 12
)

// Return codes of the program (tcx; the same numbers as TC_ACT_UNSPEC and
// TC_ACT_SHOT for cls_bpf direct action).
const (
	RetNext = 0xffffffff // TCX_NEXT (-1): forwarded or passed on
	RetDrop = 2          // TCX_DROP
)

// Options configure Load.
type Options struct {
	// Mark is ORed into skb->mark of rewritten packets (DefaultMark when 0).
	Mark uint32
	// PinDir, when set, is a directory in a bpf file system where the
	// maps (and, by Attach, the links) are pinned, or found pinned by an
	// earlier daemon and reused (see pin.go).
	PinDir string
	// Redirect sends rewritten packets straight to their egress device
	// (bpf_fib_lookup, bpf_redirect_neigh) rather than on through the stack.
	Redirect bool
	// fakeClock makes the program read its clock from the fake_now
	// variable (setNow): the tests give both engines the same time.
	fakeClock bool
}

// Datapath is the loaded program and its maps.
type Datapath struct {
	objs rewriteObjects
	mark uint32
	// meta holds the gateway's record of each flow (SetMeta).
	meta *ebpf.Map
	// pinDir is Options.PinDir; reused: the pinned maps existed.
	pinDir string
	reused bool
}

// Load loads the program and creates its maps, or, with Options.PinDir,
// reuses the maps pinned there (Reused). Pins it cannot reuse are not
// touched: it returns an *IncompatibleError.
func Load(opts Options) (*Datapath, error) {
	spec, err := loadRewrite()
	if err != nil {
		return nil, err
	}
	var collOpts ebpf.CollectionOptions
	var layout [32]byte
	var netns uint64
	var reused bool
	if opts.PinDir != "" {
		if reused, layout, netns, err = loadPinned(spec, opts.PinDir); err != nil {
			return nil, err
		}
		collOpts.Maps.PinPath = opts.PinDir
	}
	mark := opts.Mark
	if mark == 0 {
		mark = DefaultMark
	}
	if err := spec.Variables["rewritten_mark"].Set(mark); err != nil {
		return nil, err
	}
	if opts.Redirect {
		if err := spec.Variables["redirect_out"].Set(uint8(1)); err != nil {
			return nil, err
		}
	}
	if opts.fakeClock {
		if err := spec.Variables["fake_clock"].Set(uint8(1)); err != nil {
			return nil, err
		}
	}
	dp := &Datapath{mark: mark, pinDir: opts.PinDir, reused: reused}
	if err := spec.LoadAndAssign(&dp.objs, &collOpts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load splice program: %+v", ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, &IncompatibleError{Dir: opts.PinDir, Reason: err.Error()}
		}
		return nil, fmt.Errorf("load splice program: %w", err)
	}
	if opts.PinDir != "" {
		err = dp.finishPins(layout, netns)
	} else {
		dp.meta, err = ebpf.NewMap(metaSpec())
	}
	if err != nil {
		dp.Close()
		return nil, err
	}
	return dp, nil
}

// Close releases the program and the maps (pinned ones stay pinned).
func (dp *Datapath) Close() error {
	if dp.meta != nil {
		dp.meta.Close()
	}
	return dp.objs.Close()
}

// Program is the tc/tcx ingress program.
func (dp *Datapath) Program() *ebpf.Program { return dp.objs.SpliceRewrite }

// setNow sets the fake clock (nanoseconds); only with the fake clock.
func (dp *Datapath) setNow(now int64) error { return dp.objs.FakeNow.Set(now) }

// Counters returns the per-verdict packet counts, summed over CPUs.
func (dp *Datapath) Counters() ([NumCounters]uint64, error) {
	var out [NumCounters]uint64
	for i := range out {
		var per []uint64
		if err := dp.objs.SpliceVerdicts.Lookup(uint32(i), &per); err != nil {
			return out, err
		}
		for _, v := range per {
			out[i] += v
		}
	}
	return out, nil
}

// tuple converts a splice key to the map's key: IPv4 addresses stay
// IPv4-mapped, ports are in network byte order.
func tuple(k splice.Key) rewriteTuple {
	return rewriteTuple{Src: k.Src, Dst: k.Dst, Sport: be16(k.SrcPort), Dport: be16(k.DstPort)}
}

// be16 is the in-memory value of a network byte order port.
func be16(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// flowVal converts the engine's state to the map's value. Its times are
// the program's as they are: both read CLOCK_MONOTONIC (package monotime).
func (dp *Datapath) flowVal(st *splice.State) rewriteFlowVal {
	var v rewriteFlowVal
	if st.RST {
		v.Closed = flowRST
	}
	for d, strip := range st.StripECN {
		if strip {
			v.Closed |= flowStripECN << d
		}
	}
	v.LastSeen = st.LastSeen
	for d := range v.D {
		s, x := &st.Dirs[d], &v.D[d]
		x.SeqOff, x.TsOff, x.TsJump = s.SeqOff, s.TSOff, s.TSJump
		x.SndNxt, x.AckSeen = uint32(s.SndNxt), uint32(s.AckSeen)
		x.MaxWin, x.LastWin = s.MaxWin, s.LastWin
		x.TsVal, x.TsEcr = s.TSval, s.TSecr
		x.FinSeq, x.FinAt = uint32(s.FINSeq), s.FINAt
		x.SrcPort, x.DstPort = s.SrcPort, s.DstPort
		x.WsIn, x.WsOut, x.Flags = s.WSIn, s.WSOut, s.Flags
		x.WinUnit = 0
		if s.WinUnit {
			x.WinUnit = 1
		}
	}
	return v
}

// state converts the map's value back to the engine's state.
func (dp *Datapath) state(v *rewriteFlowVal) splice.State {
	var st splice.State
	st.RST = v.Closed&flowRST != 0
	for d := range st.StripECN {
		st.StripECN[d] = v.Closed&(flowStripECN<<d) != 0
	}
	st.LastSeen = v.LastSeen
	for d := range v.D {
		s, x := &st.Dirs[d], &v.D[d]
		s.SeqOff, s.TSOff, s.TSJump = x.SeqOff, x.TsOff, x.TsJump
		s.SndNxt, s.AckSeen = splice.Seq(x.SndNxt), splice.Seq(x.AckSeen)
		s.MaxWin, s.LastWin = x.MaxWin, x.LastWin
		s.TSval, s.TSecr = x.TsVal, x.TsEcr
		s.FINSeq, s.FINAt = splice.Seq(x.FinSeq), x.FinAt
		s.SrcPort, s.DstPort = x.SrcPort, x.DstPort
		s.WSIn, s.WSOut, s.Flags = x.WsIn, x.WsOut, x.Flags
		s.WinUnit = x.WinUnit != 0
	}
	return st
}

// MaxFlows is how many flows the flow maps hold (splice_flows in
// rewrite.bpf.c; splice_tuples holds their two tuples each). The maps
// are the program's: a larger one needs the program rebuilt.
const MaxFlows = 65536

// ErrFull is the error of PutFlow when the flow maps hold MaxFlows
// flows: the kernel says E2BIG, which cilium/ebpf reads as "key too big
// for map", a puzzle for the operator who meets it.
var ErrFull = fmt.Errorf("the bpf flow maps are full (%d flows)", MaxFlows)

// full names a full map as ErrFull.
func full(err error) error {
	if errors.Is(err, unix.E2BIG) {
		return ErrFull
	}
	return err
}

// PutFlow writes a flow (promotion): its state, then both input tuples
// (keys as splice.Params.Keys returns them), so that the program never
// finds a tuple without its flow. An existing flow's state is replaced
// under its spin lock.
func (dp *Datapath) PutFlow(id uint64, keys [2]splice.Key, st splice.State) error {
	return dp.PutFlowWatch(id, keys, st, false)
}

// PutFlowWatch is PutFlow with the client's tuple watched from the start
// (see SetWatch): no client payload is rewritten before the watch is on.
func (dp *Datapath) PutFlowWatch(id uint64, keys [2]splice.Key, st splice.State, watch bool) error {
	for _, s := range st.Dirs {
		if s.WSIn > 14 || s.WSOut > 14 {
			return fmt.Errorf("window scale %d/%d above 14", s.WSIn, s.WSOut)
		}
	}
	v := dp.flowVal(&st)
	if err := dp.objs.SpliceFlows.Update(id, &v, ebpf.UpdateLock); err != nil {
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			// A full map says so here already (the update of a missing
			// element under BPF_F_LOCK goes on to allocate one).
			return fmt.Errorf("flow %d: %w", id, full(err))
		}
		// BPF_F_LOCK needs an existing element: create it.
		if err := dp.objs.SpliceFlows.Update(id, &v, ebpf.UpdateNoExist); err != nil {
			return fmt.Errorf("flow %d: %w", id, full(err))
		}
	}
	for d := range keys {
		o := keys[1-d]
		tv := rewriteTupleVal{FlowId: id, Dir: uint32(d), OutSrc: o.Dst, OutDst: o.Src}
		if watch && d == int(splice.C2S) {
			tv.Flags = tuplePassData
		}
		if err := dp.objs.SpliceTuples.Update(tuple(keys[d]), &tv, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("flow %d tuple %v: %w", id, keys[d], full(err))
		}
	}
	return nil
}

// flow_val.closed bits: FLOW_RST, and FLOW_STRIP_ECN << dir.
const (
	flowRST      = 1
	flowStripECN = 8
)

// tuplePassData is the tuple flag that passes packets with payload to
// the queue (TUPLE_PASS_DATA).
const tuplePassData = 1

// SetWatch makes the program pass the client's packets with payload to
// the queue (watch) or rewrite them again: the HTTP proxy watches a
// spliced flow for the next request, which the Go side must see (see
// splice.Entry.Watch). Replacing the tuple's element is atomic for the
// program. PutFlow writes the tuples unwatched.
func (dp *Datapath) SetWatch(id uint64, keys [2]splice.Key, watch bool) error {
	o := keys[splice.S2C]
	tv := rewriteTupleVal{FlowId: id, Dir: uint32(splice.C2S), OutSrc: o.Dst, OutDst: o.Src}
	if watch {
		tv.Flags = tuplePassData
	}
	if err := dp.objs.SpliceTuples.Update(tuple(keys[splice.C2S]), &tv, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("flow %d tuple %v: %w", id, keys[splice.C2S], err)
	}
	return nil
}

// Flow reads a flow's state (under its spin lock).
func (dp *Datapath) Flow(id uint64) (splice.State, error) {
	var v rewriteFlowVal
	if err := dp.objs.SpliceFlows.LookupWithFlags(id, &v, ebpf.LookupLock); err != nil {
		return splice.State{}, fmt.Errorf("flow %d: %w", id, err)
	}
	return dp.state(&v), nil
}

// FlowBatch is how many flows EachFlow reads per system call.
const FlowBatch = 256

// EachFlow reads the state of every flow in the program's map, each under
// its spin lock, FlowBatch flows per system call, and calls fn with each
// batch (the slices are reused for the next). A flow written or deleted
// meanwhile may be missed. One lookup per flow cost the daemon's reaper
// 52-67 ms for 9,900 flows, four times a second (memory bench).
func (dp *Datapath) EachFlow(fn func(ids []uint64, states []splice.State)) error {
	keys := make([]uint64, FlowBatch)
	vals := make([]rewriteFlowVal, FlowBatch)
	states := make([]splice.State, FlowBatch)
	opts := &ebpf.BatchOptions{ElemFlags: uint64(ebpf.LookupLock)}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := dp.objs.SpliceFlows.BatchLookup(&cursor, keys, vals, opts)
		for i := range n {
			states[i] = dp.state(&vals[i])
		}
		if n > 0 {
			fn(keys[:n], states[:n])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil // the end
		case err != nil:
			return fmt.Errorf("read the flows: %w", err)
		case n == 0:
			return nil
		}
	}
}

// Demote takes a flow back from the program (for the Go engine, with
// splice.FlowFromState): it removes the flow's tuples, so that its
// packets pass to the queue from then on, waits until every run of the
// program that may have found them has ended, and returns the flow's
// final state and deletes it. On error the flow may be half removed:
// retire it with DeleteFlow.
func (dp *Datapath) Demote(id uint64, keys [2]splice.Key) (splice.State, error) {
	for _, k := range keys {
		if err := dp.objs.SpliceTuples.Delete(tuple(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return splice.State{}, fmt.Errorf("flow %d tuple %v: %w", id, k, err)
		}
	}
	if err := waitPrograms(); err != nil {
		return splice.State{}, err
	}
	st, err := dp.Flow(id)
	if err != nil {
		return splice.State{}, err
	}
	if err := dp.objs.SpliceFlows.Delete(id); err != nil {
		return splice.State{}, fmt.Errorf("flow %d: %w", id, err)
	}
	if err := dp.deleteMeta(id); err != nil {
		return splice.State{}, err
	}
	return st, nil
}

// WaitPrograms returns once every run of a BPF program that began before
// it has ended, and with it the receive path that ran it: a packet that
// passed tcx ingress before it was called has been handed on (to
// netfilter, and a queue) when it returns. tc and tcx programs run
// inside the RCU read-side critical section of the receive path, and
// membarrier(MEMBARRIER_CMD_GLOBAL) is a synchronize_rcu (it fails on
// nohz_full kernels).
func WaitPrograms() error { return waitPrograms() }

func waitPrograms() error {
	const membarrierCmdGlobal = 1
	if _, _, e := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); e != 0 {
		return fmt.Errorf("membarrier: waiting for programs in flight: %w", e)
	}
	return nil
}

// DeleteFlow removes a flow's tuples and then its state: the flow is
// retired and nobody needs its state (see Demote).
func (dp *Datapath) DeleteFlow(id uint64, keys [2]splice.Key) error {
	var errs []error
	for _, k := range keys {
		if err := dp.objs.SpliceTuples.Delete(tuple(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	if err := dp.objs.SpliceFlows.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	if err := dp.deleteMeta(id); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
