//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"spliced/splice"
)

// OpenStore creates, or reuses when dir holds them, the program's pinned
// maps and the daemon's own (see pin.go) without loading or attaching
// the program: a record of spliced flows that outlives the process, for
// a daemon on the nfqueue datapath. It keeps each flow's state, tuples
// and meta record (PutFlow, PutState, SetMeta, DeleteFlow); no program
// reads them. A later OpenStore with the same directory finds them
// (Reused, PinnedFlows); RemovePins ends them. Pins it cannot reuse are
// not touched: it returns an *IncompatibleError.
func OpenStore(dir string) (*Datapath, error) {
	spec, err := loadRewrite()
	if err != nil {
		return nil, err
	}
	reused, layout, netns, err := loadPinned(spec, dir)
	if err != nil {
		return nil, err
	}
	dp := &Datapath{pinDir: dir, reused: reused}
	for _, p := range []struct {
		name string
		m    **ebpf.Map
	}{
		{rewriteMapSpliceTuples, &dp.objs.SpliceTuples},
		{rewriteMapSpliceFlows, &dp.objs.SpliceFlows},
		{rewriteMapSpliceVerdicts, &dp.objs.SpliceVerdicts},
	} {
		m, err := ebpf.NewMapWithOptions(spec.Maps[p.name], ebpf.MapOptions{PinPath: dir})
		if err != nil {
			dp.Close()
			if errors.Is(err, ebpf.ErrMapIncompatible) {
				return nil, &IncompatibleError{Dir: dir, Reason: err.Error()}
			}
			return nil, fmt.Errorf("map %s: %w", p.name, err)
		}
		*p.m = m
	}
	if err := dp.finishPins(layout, netns); err != nil {
		dp.Close()
		return nil, err
	}
	return dp, nil
}

// PutState replaces the state of a flow that PutFlow wrote (under its
// spin lock), keeping its tuples.
func (dp *Datapath) PutState(id uint64, st splice.State) error {
	v := dp.flowVal(&st)
	if err := dp.objs.SpliceFlows.Update(id, &v, ebpf.UpdateLock|ebpf.UpdateExist); err != nil {
		return fmt.Errorf("flow %d: %w", id, err)
	}
	return nil
}
