//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Pinning: with Options.PinDir the program's state maps (splice_tuples,
// splice_flows, splice_verdicts), two maps of the daemon's own
// (splice_meta: what the gateway knows of each flow; splice_layout: the
// layout and network namespace the pins were made for) and the tcx links
// (tcx_ingress_IFNAME) are pinned in that bpffs directory. Pinned, they
// outlive the process: after a kill -9 the kernel keeps rewriting the
// spliced flows, and the next Load with the same directory reuses the
// maps, and Attach moves the links to its program, so that the daemon
// can adopt the flows (PinnedFlows). RemovePins ends it all.

// Pin file names in the pin directory.
const (
	pinLayout     = "splice_layout"
	pinMeta       = "splice_meta"
	pinLinkPrefix = "tcx_ingress_"
)

// pinnedMaps are the program's maps that are pinned (the scratch map and
// the global variables are not: they hold nothing across packets).
var pinnedMaps = []string{rewriteMapSpliceTuples, rewriteMapSpliceFlows, rewriteMapSpliceVerdicts}

// MetaSize is the largest meta record SetMeta stores per flow (the value
// is 64 bytes, allocated per recorded flow).
const MetaSize = 62

// metaValue is splice_meta's value: a length and the record.
type metaValue struct {
	Len  uint16
	Data [MetaSize]byte
}

// layoutValue is splice_layout's only value.
type layoutValue struct {
	Layout [32]byte // SHA-256 of the pinned maps' specifications
	NetNS  uint64   // cookie of the network namespace the links are in
}

func metaSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: pinMeta, Type: ebpf.Hash, KeySize: 8, ValueSize: uint32(binary.Size(metaValue{})),
		MaxEntries: MaxFlows, Flags: unix.BPF_F_NO_PREALLOC}
}

func layoutSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: pinLayout, Type: ebpf.Array, KeySize: 4, ValueSize: uint32(binary.Size(layoutValue{})), MaxEntries: 1}
}

// PinDir is the pin directory of a daemon whose nftables table is table,
// under the bpffs mount point root.
func PinDir(root, table string) string { return filepath.Join(root, "spliced", table) }

// IncompatibleError: the pin directory holds pins this program cannot
// reuse (another layout of the maps, another network namespace, or an
// incomplete set).
type IncompatibleError struct {
	Dir, Reason string
	// OtherNetNS: the pins belong to another network namespace (another
	// daemon may be using them).
	OtherNetNS bool
}

func (e *IncompatibleError) Error() string {
	return fmt.Sprintf("pins in %s cannot be reused: %s", e.Dir, e.Reason)
}

// MountBPFFS mounts a bpf file system at root unless one is there
// (Debian with systemd mounts one at /sys/fs/bpf; elsewhere it may be a
// plain sysfs directory).
func MountBPFFS(root string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err == nil && uint32(st.Type) == unix.BPF_FS_MAGIC {
		return nil
	} else if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("bpffs %s: %w", root, err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("bpffs %s: %w", root, err)
	}
	// A mount hides what the directory holds: kernel.bpffs: /var would
	// hide the system's files until a reboot.
	if ents, err := os.ReadDir(root); err != nil {
		return fmt.Errorf("bpffs %s: %w", root, err)
	} else if len(ents) > 0 {
		return fmt.Errorf("bpffs %s is a directory with files in it (%s ...), not a bpf file system: spliced mounts one only on an empty or new directory; set kernel.bpffs to /sys/fs/bpf or a new directory", root, ents[0].Name())
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", root, err)
	}
	return nil
}

// IsBPFFS reports whether root is a bpf file system.
func IsBPFFS(root string) bool {
	var st unix.Statfs_t
	return unix.Statfs(root, &st) == nil && uint32(st.Type) == unix.BPF_FS_MAGIC
}

// NetNSCookie is the cookie of the caller's network namespace: unique
// for the boot, never reused.
func NetNSCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: %w", err)
	}
	return c, nil
}

// layoutOf fingerprints what pinned maps hold: each pinned map's type,
// sizes, flags and the C declarations of its key and value (member
// names, offsets and types), and the daemon's own maps. Pins made under
// another fingerprint are not reused: their values would be misread.
func layoutOf(spec *ebpf.CollectionSpec) ([32]byte, error) {
	var b strings.Builder
	gf := &btf.GoFormatter{}
	for _, name := range pinnedMaps {
		ms := spec.Maps[name]
		if ms == nil {
			return [32]byte{}, fmt.Errorf("map %s missing from the object", name)
		}
		fmt.Fprintf(&b, "%s %v %d %d %d %d\n", name, ms.Type, ms.KeySize, ms.ValueSize, ms.MaxEntries, ms.Flags&^allocFlags)
		for _, t := range []btf.Type{ms.Key, ms.Value} {
			if t == nil {
				continue
			}
			decl, err := gf.TypeDeclaration("t", t)
			if err != nil {
				return [32]byte{}, fmt.Errorf("map %s: %w", name, err)
			}
			b.WriteString(decl)
			b.WriteByte('\n')
		}
	}
	for _, ms := range []*ebpf.MapSpec{metaSpec(), layoutSpec()} {
		fmt.Fprintf(&b, "%s %v %d %d %d %d\n", ms.Name, ms.Type, ms.KeySize, ms.ValueSize, ms.MaxEntries, ms.Flags)
	}
	return sha256.Sum256([]byte(b.String())), nil
}

// allocFlags are the map flags that say how the kernel allocates a map's
// elements, not what they hold: pins that differ only in them are reused
// as they are (an earlier version's preallocated maps, say), and the
// layout fingerprint leaves them out.
const allocFlags = unix.BPF_F_NO_PREALLOC

// usePinnedAllocation makes spec's pinned maps ask for the allocation of
// the maps pinned in dir, so that reusing them passes the library's
// compatibility check; a pin that differs in anything else is left for
// that check to refuse.
func usePinnedAllocation(spec *ebpf.CollectionSpec, dir string) error {
	for _, name := range pinnedMaps {
		ms := spec.Maps[name]
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			return &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("map %s: %v", name, err)}
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			return &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("map %s: %v", name, err)}
		}
		if info.Flags&^allocFlags == ms.Flags&^allocFlags {
			ms.Flags = info.Flags
		}
	}
	return nil
}

// checkPins reports whether dir holds reusable pins (made for layout in
// the network namespace netns), false when it holds none, and an
// *IncompatibleError when it holds others.
func checkPins(dir string, layout [32]byte, netns uint64) (bool, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) || err == nil && len(ents) == 0 {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, pinLayout), nil)
	if err != nil {
		return false, &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("no layout record (%v)", err)}
	}
	defer m.Close()
	if err := layoutSpec().Compatible(m); err != nil {
		return false, &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("layout record: %v", err)}
	}
	var v layoutValue
	if err := m.Lookup(uint32(0), &v); err != nil {
		return false, &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("layout record: %v", err)}
	}
	if v.NetNS != netns {
		return false, &IncompatibleError{Dir: dir, OtherNetNS: true,
			Reason: fmt.Sprintf("they belong to another network namespace (cookie %d; this one is %d)", v.NetNS, netns)}
	}
	if v.Layout != layout {
		return false, &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("another version of the program made them (map layout %x, this program's %x)", v.Layout[:6], layout[:6])}
	}
	return true, nil
}

// loadPinned prepares spec and opts for Load with a pin directory, and
// reports whether reusable pins exist.
func loadPinned(spec *ebpf.CollectionSpec, dir string) (reused bool, layout [32]byte, netns uint64, err error) {
	if layout, err = layoutOf(spec); err != nil {
		return false, layout, 0, err
	}
	if netns, err = NetNSCookie(); err != nil {
		return false, layout, 0, err
	}
	if reused, err = checkPins(dir, layout, netns); err != nil {
		return false, layout, netns, err
	}
	if reused {
		if err := usePinnedAllocation(spec, dir); err != nil {
			return false, layout, netns, err
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, layout, netns, fmt.Errorf("pin directory: %w", err)
	}
	for _, name := range pinnedMaps {
		spec.Maps[name].Pinning = ebpf.PinByName
	}
	return reused, layout, netns, nil
}

// finishPins creates (or reuses) the daemon's own pinned maps; the layout
// record is written last, so that an interrupted first start leaves pins
// that the next one does not trust.
func (dp *Datapath) finishPins(layout [32]byte, netns uint64) error {
	opts := ebpf.MapOptions{PinPath: dp.pinDir}
	ms := metaSpec()
	ms.Pinning = ebpf.PinByName
	meta, err := ebpf.NewMapWithOptions(ms, opts)
	if err != nil {
		return fmt.Errorf("meta map: %w", err)
	}
	dp.meta = meta
	ls := layoutSpec()
	ls.Pinning = ebpf.PinByName
	lm, err := ebpf.NewMapWithOptions(ls, opts)
	if err != nil {
		return fmt.Errorf("layout map: %w", err)
	}
	defer lm.Close()
	if err := lm.Put(uint32(0), layoutValue{Layout: layout, NetNS: netns}); err != nil {
		return fmt.Errorf("layout map: %w", err)
	}
	return nil
}

// Reused reports whether Load found the maps pinned by an earlier daemon
// and reuses them (their flows are PinnedFlows).
func (dp *Datapath) Reused() bool { return dp.reused }

// PinDir is the pin directory, or "" when nothing is pinned.
func (dp *Datapath) PinDir() string { return dp.pinDir }

// OpenPinned opens the maps pinned in dir without loading the program:
// for a daemon that does not run the bpf datapath, and for spliced
// -cleanup, to read the pinned flows (PinnedFlows) before RemovePins. It
// returns nil and no error when dir holds no pins, and an
// *IncompatibleError when it holds pins it cannot read.
func OpenPinned(dir string) (*Datapath, error) {
	spec, err := loadRewrite()
	if err != nil {
		return nil, err
	}
	layout, err := layoutOf(spec)
	if err != nil {
		return nil, err
	}
	netns, err := NetNSCookie()
	if err != nil {
		return nil, err
	}
	if ok, err := checkPins(dir, layout, netns); err != nil || !ok {
		return nil, err
	}
	if err := usePinnedAllocation(spec, dir); err != nil {
		return nil, err
	}
	dp := &Datapath{pinDir: dir, reused: true}
	for _, p := range []struct {
		name string
		spec *ebpf.MapSpec
		m    **ebpf.Map
	}{
		{rewriteMapSpliceTuples, spec.Maps[rewriteMapSpliceTuples], &dp.objs.SpliceTuples},
		{rewriteMapSpliceFlows, spec.Maps[rewriteMapSpliceFlows], &dp.objs.SpliceFlows},
		{rewriteMapSpliceVerdicts, spec.Maps[rewriteMapSpliceVerdicts], &dp.objs.SpliceVerdicts},
		{pinMeta, metaSpec(), &dp.meta},
	} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, p.name), nil)
		if err == nil {
			if err = p.spec.Compatible(m); err != nil {
				m.Close()
			}
		}
		if err != nil {
			dp.Close()
			return nil, &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("map %s: %v", p.name, err)}
		}
		*p.m = m
	}
	return dp, nil
}

// HasPins reports whether dir holds any pin.
func HasPins(dir string) bool {
	ents, err := os.ReadDir(dir)
	return err == nil && len(ents) > 0
}

// RemovePins removes every pin in dir and dir itself (and its parent
// when that is left empty): pinned tcx links that no process holds are
// detached, pinned maps that nothing uses are freed. What is already
// gone is not an error.
func RemovePins(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	// Links first: from then on no program runs against the maps.
	slices.SortStableFunc(ents, func(a, b os.DirEntry) int {
		return boolInt(!strings.HasPrefix(a.Name(), pinLinkPrefix)) - boolInt(!strings.HasPrefix(b.Name(), pinLinkPrefix))
	})
	for _, e := range ents {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	os.Remove(filepath.Dir(dir)) // the "spliced" directory, if no other table's pins are in it
	return errors.Join(errs...)
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// PinnedFlow is a flow found in the maps: what the gateway needs to adopt
// it (or to reset it).
type PinnedFlow struct {
	ID    uint64
	Keys  [2]splice.Key // as splice.Params.Keys: from the client, from the server
	Watch bool          // the client's payload is passed to the queue (SetWatch)
	State splice.State
	Meta  []byte // what SetMeta stored, nil if nothing
}

// PinnedFlows returns every complete flow in the maps (one with its state
// and both tuples) and the IDs of incomplete ones in broken: a tuple or
// the state missing, as a daemon killed while it wrote or removed a flow
// leaves them, and as a running daemon's record shows while it writes
// one. It changes nothing, so that a reader beside a running daemon
// (spliced -cleanup's, a test's) never removes the flow being written.
func (dp *Datapath) PinnedFlows() (flows []PinnedFlow, broken []uint64, err error) {
	return dp.pinnedFlows(false)
}

// TakePinnedFlows is PinnedFlows for the daemon that owns the maps, at
// its start and before it writes any flow: it also removes the
// incomplete flows.
func (dp *Datapath) TakePinnedFlows() (flows []PinnedFlow, broken []uint64, err error) {
	return dp.pinnedFlows(true)
}

func (dp *Datapath) pinnedFlows(removeBroken bool) (flows []PinnedFlow, broken []uint64, err error) {
	type half struct {
		keys  [2]splice.Key
		have  [2]bool
		watch bool
	}
	byID := map[uint64]*half{}
	var order []uint64
	var k rewriteTuple
	var v rewriteTupleVal
	it := dp.objs.SpliceTuples.Iterate()
	for it.Next(&k, &v) {
		h := byID[v.FlowId]
		if h == nil {
			h = &half{}
			byID[v.FlowId] = h
			order = append(order, v.FlowId)
		}
		if v.Dir > 1 {
			continue
		}
		h.keys[v.Dir] = splice.Key{Src: k.Src, Dst: k.Dst, SrcPort: be16(k.Sport), DstPort: be16(k.Dport)}
		h.have[v.Dir] = true
		if v.Dir == uint32(splice.C2S) && v.Flags&tuplePassData != 0 {
			h.watch = true
		}
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("read the pinned tuples: %w", err)
	}
	var id uint64
	var fv rewriteFlowVal
	fit := dp.objs.SpliceFlows.Iterate()
	for fit.Next(&id, &fv) {
		if byID[id] == nil {
			byID[id] = &half{}
			order = append(order, id)
		}
	}
	if err := fit.Err(); err != nil {
		return nil, nil, fmt.Errorf("read the pinned flows: %w", err)
	}
	slices.Sort(order)
	for _, id := range order {
		h := byID[id]
		st, err := dp.Flow(id)
		if err != nil || !h.have[0] || !h.have[1] {
			if removeBroken {
				dp.DeleteFlow(id, h.keys)
			}
			broken = append(broken, id)
			continue
		}
		pf := PinnedFlow{ID: id, Keys: h.keys, Watch: h.watch, State: st}
		var mv metaValue
		if dp.meta != nil && dp.meta.Lookup(id, &mv) == nil && int(mv.Len) <= MetaSize {
			pf.Meta = append([]byte(nil), mv.Data[:mv.Len]...)
		}
		flows = append(flows, pf)
	}
	if removeBroken {
		dp.removeOrphanedMeta(func(id uint64) bool { return byID[id] != nil })
	}
	return flows, broken, nil
}

// removeOrphanedMeta deletes the records of flows that have neither
// tuples nor state (known says which have either), left by a kill
// between DeleteFlow's state and its record. Left, a record outlived its
// flow, and a later flow under its ID (IDs restart above the highest
// adopted one) whose own record a kill kept from being written was
// adopted with it: another service's settings, the HTTP proxy's watch.
func (dp *Datapath) removeOrphanedMeta(known func(id uint64) bool) {
	if dp.meta == nil {
		return
	}
	var orphans []uint64
	var id uint64
	var mv metaValue
	it := dp.meta.Iterate()
	for it.Next(&id, &mv) {
		if !known(id) {
			orphans = append(orphans, id)
		}
	}
	for _, id := range orphans {
		dp.deleteMeta(id)
	}
}

// SetMeta stores what the gateway knows of a flow (at most MetaSize
// bytes) beside its state, for a daemon that adopts the flow after a
// restart. DeleteFlow and Demote remove it.
func (dp *Datapath) SetMeta(id uint64, b []byte) error {
	if len(b) > MetaSize {
		return fmt.Errorf("flow %d: meta record of %d bytes, at most %d", id, len(b), MetaSize)
	}
	v := metaValue{Len: uint16(len(b))}
	copy(v.Data[:], b)
	if err := dp.meta.Update(id, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("flow %d meta: %w", id, full(err))
	}
	return nil
}

// DeleteMeta removes a flow's record (one that was not promoted after
// all).
func (dp *Datapath) DeleteMeta(id uint64) error { return dp.deleteMeta(id) }

func (dp *Datapath) deleteMeta(id uint64) error {
	if dp.meta == nil {
		return nil
	}
	if err := dp.meta.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("flow %d meta: %w", id, err)
	}
	return nil
}
