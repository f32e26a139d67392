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

// TestFlowTableEnded: an ended flow no longer counts as its service's,
// once, whether it leaves the table later or not; the table still holds
// it until it is removed.
func TestFlowTableEnded(t *testing.T) {
	tab := NewFlowTable(10)
	a, b := NewFlow("socks", "socks5", netip.AddrPort{}, netip.AddrPort{}), NewFlow("socks", "socks5", netip.AddrPort{}, netip.AddrPort{})
	if !tab.Admit(a) || !tab.Admit(b) {
		t.Fatal("not admitted")
	}
	tab.Ended(a)
	tab.Ended(a)
	if n := tab.ServiceLen("socks"); n != 1 {
		t.Errorf("after one of two ended (twice): ServiceLen %d, want 1", n)
	}
	if tab.Get(a.ID) != a {
		t.Error("the ended flow left the table")
	}
	tab.Remove(a)
	if n := tab.ServiceLen("socks"); n != 1 {
		t.Errorf("the ended flow removed: ServiceLen %d, want 1", n)
	}
	tab.Remove(b)
	if n := tab.ServiceLen("socks"); n != 0 {
		t.Errorf("both removed: ServiceLen %d, want 0", n)
	}
	// Ended for a flow the table does not hold changes nothing.
	c := NewFlow("socks", "socks5", netip.AddrPort{}, netip.AddrPort{})
	tab.Admit(c)
	tab.Remove(c)
	tab.Ended(c)
	if n := tab.ServiceLen("socks"); n != 0 {
		t.Errorf("Ended after Remove: ServiceLen %d, want 0", n)
	}
}
