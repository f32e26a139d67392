//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	. "spliced/splice"
)

// TestFlowMapsFull: the maps hold MaxFlows flows (their tuples, their
// meta records). One more is refused with ErrFull, not the kernel's
// E2BIG that reads "key too big for map", and leaves no tuple behind
// that the program could find without its flow; once a flow is
// deleted there is room again.
func TestFlowMapsFull(t *testing.T) {
	requireRoot(t)
	spec, err := loadRewrite()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]uint32{rewriteMapSpliceFlows: MaxFlows, rewriteMapSpliceTuples: 2 * MaxFlows} {
		if got := spec.Maps[name].MaxEntries; got != want {
			t.Errorf("%s holds %d elements, want %d", name, got, want)
		}
	}
	dp, err := Load(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	keysOf := func(i int) [2]Key {
		c := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 40000)
		return [2]Key{KeyFrom(c, sAddr4), KeyFrom(sAddr4, c)}
	}
	for i := range MaxFlows {
		if err := dp.PutFlow(uint64(i), keysOf(i), State{}); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		if err := dp.SetMeta(uint64(i), []byte("m")); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
	}
	extra := keysOf(MaxFlows)
	if err := dp.PutFlow(MaxFlows, extra, State{}); !errors.Is(err, ErrFull) {
		t.Errorf("a flow past the maps: %v, want ErrFull", err)
	}
	if err := dp.SetMeta(MaxFlows, []byte("m")); !errors.Is(err, ErrFull) {
		t.Errorf("a meta record past the map: %v, want ErrFull", err)
	}
	var tv rewriteTupleVal
	for _, k := range extra {
		if err := dp.objs.SpliceTuples.Lookup(tuple(k), &tv); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("tuple %v of the refused flow: %v, %+v", k, err, tv)
		}
	}
	if err := dp.DeleteFlow(7, keysOf(7)); err != nil {
		t.Fatal(err)
	}
	if err := dp.PutFlow(MaxFlows, extra, State{}); err != nil {
		t.Errorf("a flow after one left: %v", err)
	}
	if err := dp.SetMeta(MaxFlows, []byte("m")); err != nil {
		t.Errorf("a meta record after one left: %v", err)
	}
}
