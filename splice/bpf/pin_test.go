//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	. "spliced/splice"
)

// bpffs mounts a private bpf file system for a test and unmounts it
// (freeing whatever is still pinned) at the end.
func bpffs(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	root := t.TempDir()
	if err := MountBPFFS(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
			t.Error(err)
		}
	})
	if !IsBPFFS(root) {
		t.Fatal("MountBPFFS did not mount a bpf file system")
	}
	if err := MountBPFFS(root); err != nil { // mounted already: nothing to do
		t.Fatal(err)
	}
	return root
}

// TestMountBPFFSRefusesFullDirectory: a bpf file system mounted on a
// directory hides its files; kernel.bpffs naming one (/var, say) is
// refused, with nothing mounted.
func TestMountBPFFSRefusesFullDirectory(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "keep"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := MountBPFFS(root)
	if IsBPFFS(root) {
		unix.Unmount(root, unix.MNT_DETACH)
		t.Fatal("mounted a bpf file system over a directory with a file in it")
	}
	if err == nil || !strings.Contains(err.Error(), "keep") {
		t.Errorf("MountBPFFS: %v; want an error naming the file", err)
	}
}

// inNetNS runs fn on a thread of its own in a new network namespace
// (lo, down, is its only interface), so that the links it attaches touch nothing of the
// host; the thread is discarded after.
func inNetNS(t *testing.T, fn func()) {
	t.Helper()
	done := make(chan struct{})
	var failed error
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			failed = err
			return
		}
		fn()
	}()
	<-done
	if failed != nil {
		t.Fatal(failed)
	}
}

// attachedIDs are the programs at tcx ingress of lo.
func attachedIDs(t *testing.T) []ebpf.ProgramID {
	t.Helper()
	r, err := link.QueryPrograms(link.QueryOptions{Target: 1, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Error(err)
		return nil
	}
	var ids []ebpf.ProgramID
	for _, p := range r.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

func progID(t *testing.T, dp *Datapath) ebpf.ProgramID {
	t.Helper()
	info, err := dp.Program().Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// TestPinReuse: a daemon's pinned maps and link outlive it (its file
// descriptors closed, as a kill -9 closes them): the program stays
// attached and the flow's state stays. The next Load reuses the maps and
// finds the flow (state, tuples, watch, meta), its program rewrites the
// flow from the state the first one left (BPF_PROG_TEST_RUN, compared
// with the engine as the differential tests do), and Attach moves the
// pinned link to the new program in place. Pins of another layout or
// another network namespace are refused, and RemovePins detaches and
// frees everything.
func TestPinReuse(t *testing.T) {
	root := bpffs(t)
	dir := PinDir(root, "lab")
	r := rand.New(rand.NewPCG(3, 4))
	now := time.Now().UnixNano()
	keys := [2]Key{KeyFrom(cAddr4, sAddr4), KeyFrom(sAddr4, gAddr4)}
	st := randomState(r, now)
	for d := range st.Dirs {
		st.Dirs[d].WSIn, st.Dirs[d].WSOut = 7, 9
	}
	// A real flow for the program to rewrite after the reload (its own
	// tuples: the client's and the gateway's ports differ from flow 42's).
	c50, g50 := netip.AddrPortFrom(cAddr4.Addr(), 40050), netip.AddrPortFrom(gAddr4.Addr(), 50050)
	fp := Params{
		Client: Conn{Local: sAddr4, Remote: c50, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 5, MSS: 1460, SACK: true, Timestamps: true, TSval: 5000},
		Server: Conn{Local: g50, Remote: sAddr4, SndNxt: 0x7ffffff0, RcvNxt: 0xffffff00, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 9, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 900000},
	}
	real, err := NewFlow(&fp, fixtureStart)
	if err != nil {
		t.Fatal(err)
	}
	var reloaded *Datapath // the second daemon's, kept open for the packets
	inNetNS(t, func() {
		// The first daemon.
		dp1, err := Load(Options{PinDir: dir, fakeClock: true})
		if err != nil {
			t.Error(err)
			return
		}
		if dp1.Reused() {
			t.Error("a first Load reports reused pins")
		}
		if err := dp1.PutFlow(50, fp.Keys(), real.State()); err != nil {
			t.Error(err)
		}
		if err := dp1.PutFlowWatch(42, keys, st, true); err != nil {
			t.Error(err)
		}
		if err := dp1.SetMeta(42, []byte(`{"service":"web"}`)); err != nil {
			t.Error(err)
		}
		// A record whose flow is gone (a kill between DeleteFlow's
		// state and its record).
		if err := dp1.SetMeta(99, []byte(`{"service":"gone"}`)); err != nil {
			t.Error(err)
		}
		if err := dp1.PutFlow(43, keys, st); err != nil { // shares the tuples: 43 loses them
			t.Error(err)
		}
		if err := dp1.PutFlowWatch(42, keys, st, true); err != nil {
			t.Error(err)
		}
		at1, err := dp1.Attach([]string{"lo"})
		if err != nil {
			t.Error(err)
			return
		}
		first := progID(t, dp1)
		// kill -9: the process's descriptors close.
		at1.Close()
		dp1.Close()
		if ids := attachedIDs(t); len(ids) != 1 || ids[0] != first {
			t.Errorf("after the first daemon's end: programs %v at ingress of lo, want [%d]", ids, first)
		}

		// The second daemon.
		dp2, err := Load(Options{PinDir: dir, fakeClock: true})
		if err != nil {
			t.Error(err)
			return
		}
		reloaded = dp2
		if !dp2.Reused() {
			t.Error("the pinned maps were not reused")
		}
		// A reader changes nothing (a daemon may be writing flow 43):
		// twice, then the owner takes the flows and removes it.
		for range 2 {
			if _, broken, err := dp2.PinnedFlows(); err != nil || len(broken) != 1 || broken[0] != 43 {
				t.Errorf("PinnedFlows: broken %v, %v; want [43], still there", broken, err)
			}
		}
		flows, broken, err := dp2.TakePinnedFlows()
		if err != nil {
			t.Error(err)
		}
		if _, after, err := dp2.PinnedFlows(); err != nil || len(after) != 0 {
			t.Errorf("after TakePinnedFlows: broken %v, %v; want none", after, err)
		}
		var mv metaValue
		if err := dp2.meta.Lookup(uint64(99), &mv); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("the record of flow 99, which has no tuples nor state, after TakePinnedFlows: %v; want it removed", err)
		}
		if len(flows) != 2 || len(broken) != 1 || broken[0] != 43 || flows[1].ID != 50 || flows[1].State != real.State() {
			t.Errorf("pinned flows %+v, broken %v; want flows 42 and 50, broken 43", flows, broken)
		} else if f := flows[0]; f.ID != 42 || f.Keys != keys || !f.Watch || f.State != st || string(f.Meta) != `{"service":"web"}` {
			t.Errorf("pinned flow %+v, want keys %v, watched, state %+v and its meta", f, keys, st)
		}
		at2, err := dp2.Attach([]string{"lo"})
		if err != nil {
			t.Error(err)
			return
		}
		second := progID(t, dp2)
		if len(at2.Updated) != 1 || at2.Updated[0] != "lo" {
			t.Errorf("Attach updated %v, want the pinned link of lo", at2.Updated)
		}
		if ids := attachedIDs(t); len(ids) != 1 || ids[0] != second || second == first {
			t.Errorf("after the update: programs %v at ingress of lo, want only the new one %d (old %d)", ids, second, first)
		}
		at2.Close()
		if ids := attachedIDs(t); len(ids) != 1 {
			t.Errorf("closing a pinned link detached it: %v", ids)
		}

		// Another layout: refused, not touched.
		lm, err := ebpf.LoadPinnedMap(filepath.Join(dir, pinLayout), nil)
		if err != nil {
			t.Error(err)
			return
		}
		var lv layoutValue
		lm.Lookup(uint32(0), &lv)
		good := lv
		lv.Layout[0] ^= 1
		lm.Put(uint32(0), lv)
		var ie *IncompatibleError
		if _, err := Load(Options{PinDir: dir}); !errors.As(err, &ie) || ie.OtherNetNS {
			t.Errorf("Load over pins of another layout: %v", err)
		}
		if _, err := OpenPinned(dir); !errors.As(err, &ie) {
			t.Errorf("OpenPinned over pins of another layout: %v", err)
		}
		lm.Put(uint32(0), good)
		lm.Close()
		op, err := OpenPinned(dir)
		if err != nil || op == nil {
			t.Errorf("OpenPinned: %v", err)
		} else {
			if flows, _, err := op.PinnedFlows(); err != nil || len(flows) != 2 {
				t.Errorf("OpenPinned: flows %+v, %v", flows, err)
			}
			op.Close()
		}
		t.Logf("pinned: %v", ls(dir))
	})

	if reloaded == nil {
		t.FailNow()
	}
	t.Cleanup(func() { reloaded.Close() })
	// The reloaded program rewrites flow 50 from the state the first
	// daemon wrote, exactly as the engine does from the same state.
	h := &harness{t: t, dp: reloaded, id: 50, keys: fp.Keys(), flow: real}
	for i, pkt := range []struct {
		s seg
		d Dir
	}{
		{seg{src: c50, dst: sAddr4, seq: 1000, ack: 0xfffffff0, flags: FlagACK | FlagPSH, win: 500, opts: tsOpt(10, 900000), payload: make([]byte, 100)}, C2S},
		{seg{src: sAddr4, dst: g50, seq: 0xfffffff0, ack: 0x7ffffff0 + 100, flags: FlagACK, win: 700, opts: tsOpt(900100, 5010)}, S2C},
	} {
		if v := h.step(pkt.s.bytes(), pkt.d, fixtureStart+int64(i+1)*1e6); v != int(Forward) {
			t.Errorf("packet %d after the reload: verdict %v", i, Verdict(v))
		}
	}

	// From another network namespace: refused.
	var ie *IncompatibleError
	if _, err := Load(Options{PinDir: dir}); !errors.As(err, &ie) || !ie.OtherNetNS {
		t.Errorf("Load from another network namespace: %v", err)
	}
	if err := RemovePins(dir); err != nil {
		t.Fatal(err)
	}
	if HasPins(dir) || exists(dir) || exists(filepath.Dir(dir)) {
		t.Errorf("RemovePins left %v", ls(root))
	}
	if dp, err := OpenPinned(dir); dp != nil || err != nil {
		t.Errorf("OpenPinned without pins: %v, %v", dp, err)
	}
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func ls(dir string) []string {
	var out []string
	filepath.WalkDir(dir, func(p string, _ os.DirEntry, _ error) error {
		out = append(out, p)
		return nil
	})
	return out
}

// TestPinReuseKeepsAllocation: the flow maps allocate their elements as
// flows come (BPF_F_NO_PREALLOC); an earlier version pinned them
// preallocated. A daemon of this version finds such pins, reuses them as
// they are (their flows adopted, their allocation kept), and its own new
// pins allocate per flow.
func TestPinReuseKeepsAllocation(t *testing.T) {
	root := bpffs(t)
	dir := PinDir(root, "old")
	keys := [2]Key{KeyFrom(cAddr4, sAddr4), KeyFrom(sAddr4, gAddr4)}
	st := randomState(rand.New(rand.NewPCG(5, 6)), time.Now().UnixNano())
	flags := func(m *ebpf.Map) uint32 {
		info, err := m.Info()
		if err != nil {
			t.Error(err)
			return 0
		}
		return info.Flags
	}
	// In the namespace's goroutine a failure returns, not t.Fatal.
	inNetNS(t, func() {
		// The earlier version: the same maps, preallocated.
		spec, err := loadRewrite()
		if err != nil {
			t.Error(err)
			return
		}
		reused, layout, netns, err := loadPinned(spec, dir)
		if err != nil || reused {
			t.Errorf("loadPinned: reused %v, %v", reused, err)
			return
		}
		old := &Datapath{pinDir: dir}
		for name, m := range map[string]**ebpf.Map{rewriteMapSpliceTuples: &old.objs.SpliceTuples,
			rewriteMapSpliceFlows: &old.objs.SpliceFlows, rewriteMapSpliceVerdicts: &old.objs.SpliceVerdicts} {
			ms := spec.Maps[name].Copy()
			if name != rewriteMapSpliceVerdicts {
				if ms.Flags&unix.BPF_F_NO_PREALLOC == 0 {
					t.Errorf("map %s is preallocated (flags %#x)", name, ms.Flags)
				}
				ms.Flags &^= unix.BPF_F_NO_PREALLOC
			}
			if *m, err = ebpf.NewMapWithOptions(ms, ebpf.MapOptions{PinPath: dir}); err != nil {
				t.Error(err)
				return
			}
		}
		if err := old.finishPins(layout, netns); err != nil {
			t.Error(err)
			return
		}
		if err := old.PutFlow(7, keys, st); err != nil {
			t.Error(err)
			return
		}
		old.Close()

		dp, err := Load(Options{PinDir: dir, fakeClock: true})
		if err != nil {
			t.Errorf("Load over an earlier version's preallocated pins: %v", err)
			return
		}
		defer dp.Close()
		if !dp.Reused() {
			t.Error("the preallocated pins were not reused")
		}
		if f := flags(dp.objs.SpliceTuples) | flags(dp.objs.SpliceFlows); f&unix.BPF_F_NO_PREALLOC != 0 {
			t.Errorf("reused maps' flags %#x: not the pinned ones", f)
		}
		op, err := OpenPinned(dir)
		if err != nil {
			t.Errorf("OpenPinned over preallocated pins: %v", err)
			return
		}
		flows, broken, err := op.PinnedFlows()
		op.Close()
		if err != nil || len(broken) != 0 || len(flows) != 1 || flows[0].ID != 7 || flows[0].Keys != keys {
			t.Errorf("OpenPinned: flows %+v, broken %v, %v; want flow 7", flows, broken, err)
		}
		if flows, _, err := dp.TakePinnedFlows(); err != nil || len(flows) != 1 || flows[0].ID != 7 {
			t.Errorf("TakePinnedFlows: %+v, %v; want flow 7", flows, err)
		}

		fresh, err := Load(Options{PinDir: PinDir(root, "new")})
		if err != nil {
			t.Error(err)
			return
		}
		defer fresh.Close()
		for _, m := range []*ebpf.Map{fresh.objs.SpliceTuples, fresh.objs.SpliceFlows} {
			if flags(m)&unix.BPF_F_NO_PREALLOC == 0 {
				t.Errorf("new pins preallocated (flags %#x)", flags(m))
			}
		}
	})
}
