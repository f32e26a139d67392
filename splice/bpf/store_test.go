//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"math/rand/v2"
	"testing"

	. "spliced/splice"
)

// TestStore: OpenStore keeps flows in pinned maps without a program: a
// second OpenStore (the next daemon) finds them, with the latest state
// PutState wrote and their meta record; OpenPinned reads them too (for
// spliced -cleanup); RemovePins leaves nothing; nothing is attached.
func TestStore(t *testing.T) {
	root := bpffs(t)
	dir := PinDir(root, "nfq")
	r := rand.New(rand.NewPCG(5, 6))
	keys := [2]Key{KeyFrom(cAddr4, sAddr4), KeyFrom(sAddr4, gAddr4)}
	st := randomState(r, 0)
	st2 := randomState(r, 0)
	for _, s := range []*State{&st, &st2} {
		s.LastSeen, s.RST, s.Relearn = 0, false, [2]bool{}
		for d := range s.Dirs {
			s.Dirs[d].FINAt = 0
			s.Dirs[d].WSIn, s.Dirs[d].WSOut = 7, 9
		}
	}
	inNetNS(t, func() {
		s1, err := OpenStore(dir)
		if err != nil {
			t.Error(err)
			return
		}
		if s1.Reused() {
			t.Error("a first OpenStore reports reused pins")
		}
		if err := s1.PutFlow(7, keys, st); err != nil {
			t.Error(err)
		}
		if err := s1.SetMeta(7, []byte("record")); err != nil {
			t.Error(err)
		}
		if err := s1.PutState(7, st2); err != nil {
			t.Error(err)
		}
		if err := s1.PutState(8, st2); err == nil {
			t.Error("PutState of a flow never put: no error")
		}
		s1.Close() // kill -9
		if ids := attachedIDs(t); len(ids) != 0 {
			t.Errorf("programs %v attached by a store", ids)
		}

		s2, err := OpenStore(dir)
		if err != nil {
			t.Error(err)
			return
		}
		if !s2.Reused() {
			t.Error("the second OpenStore did not find the pins")
		}
		fs, broken, err := s2.TakePinnedFlows()
		if err != nil || len(broken) > 0 || len(fs) != 1 {
			t.Errorf("pinned flows %+v, broken %v, %v", fs, broken, err)
		} else if f := fs[0]; f.ID != 7 || f.Keys != keys || f.State != st2 || string(f.Meta) != "record" {
			t.Errorf("pinned flow %+v, want flow 7 with keys %v, state %+v, record", f, keys, st2)
		}
		if err := s2.DeleteFlow(7, keys); err != nil {
			t.Error(err)
		}
		if err := s2.PutFlow(9, keys, st); err != nil {
			t.Error(err)
		}
		s2.Close()

		ro, err := OpenPinned(dir)
		if err != nil || ro == nil {
			t.Errorf("OpenPinned of a store: %v", err)
			return
		}
		fs, _, err = ro.PinnedFlows()
		if err != nil || len(fs) != 1 || fs[0].ID != 9 {
			t.Errorf("pinned flows through OpenPinned: %+v, %v", fs, err)
		}
		ro.Close()
		if err := RemovePins(dir); err != nil {
			t.Error(err)
		}
		if HasPins(dir) {
			t.Error("pins left after RemovePins")
		}
	})
}
