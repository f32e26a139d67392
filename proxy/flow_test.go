package proxy

import (
	"net/netip"
	"testing"
)

// TestFlowTableAdopt: an adopted flow keeps its ID, even above the cap;
// IDs handed out afterwards are above every adopted one; an ID taken, or
// 0, is refused.
func TestFlowTableAdopt(t *testing.T) {
	tab := NewFlowTable(1)
	a := netip.MustParseAddrPort("10.0.0.1:1")
	f := NewFlow("s", "forward", a, a)
	if !tab.Admit(f) || f.ID != 1 {
		t.Fatalf("admit: id %d", f.ID)
	}
	for _, id := range []uint64{40, 12} {
		g := NewFlow("s", "forward", a, a)
		g.ID = id
		if !tab.Adopt(g) || tab.Get(id) != g {
			t.Fatalf("adopt %d over the cap", id)
		}
	}
	dup := NewFlow("s", "forward", a, a)
	dup.ID = 12
	zero := NewFlow("s", "forward", a, a)
	if tab.Adopt(dup) || tab.Adopt(zero) {
		t.Fatal("adopted a taken ID or ID 0")
	}
	tab.SetMax(10)
	n := NewFlow("s", "forward", a, a)
	if !tab.Admit(n) || n.ID != 41 {
		t.Fatalf("next ID %d, want 41", n.ID)
	}
}
