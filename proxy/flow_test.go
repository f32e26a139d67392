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
	if tab.Admit(f) != nil || f.ID != 1 {
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
	if tab.Admit(n) != nil || n.ID != 41 {
		t.Fatalf("next ID %d, want 41", n.ID)
	}
}

// TestFlowTableEnded: an ended flow no longer counts as its service's,
// once, whether it leaves the table later or not; the table still holds
// it until it is removed.
func TestFlowTableEnded(t *testing.T) {
	tab := NewFlowTable(10)
	a, b := NewFlow("socks", "socks5", netip.AddrPort{}, netip.AddrPort{}), NewFlow("socks", "socks5", netip.AddrPort{}, netip.AddrPort{})
	if tab.Admit(a) != nil || tab.Admit(b) != nil {
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

// TestFlowTablePerClient: with limits.max_flows_per_client a client's
// flows beyond the cap are refused with ErrClientCap while other clients
// are admitted; an IPv6 client counts by its address, or with
// client_ipv6_prefix 64 by its /64, and an IPv4-mapped address as its
// IPv4 one; an ended or removed flow frees its place;
// adopted flows count but are never refused; 0 is no cap; a cap set
// later counts the flows the table holds.
func TestFlowTablePerClient(t *testing.T) {
	tab := NewFlowTable(100)
	tab.SetMaxPerClient(2)
	admit := func(client string) error {
		return tab.Admit(NewFlow("s", "forward", netip.MustParseAddrPort(client), netip.MustParseAddrPort("10.2.0.2:80")))
	}
	var kept []*Flow
	for _, c := range []string{"10.1.0.5:1000", "[::ffff:10.1.0.5]:1001"} {
		f := NewFlow("s", "forward", netip.MustParseAddrPort(c), netip.MustParseAddrPort("10.2.0.2:80"))
		if err := tab.Admit(f); err != nil {
			t.Fatalf("flow from %s: %v", c, err)
		}
		kept = append(kept, f)
	}
	if err := admit("10.1.0.5:1002"); err != ErrClientCap {
		t.Errorf("third flow of 10.1.0.5: %v, want ErrClientCap", err)
	}
	if err := admit("10.1.0.6:1000"); err != nil {
		t.Errorf("another client: %v", err)
	}
	if n := tab.ClientLen(netip.MustParseAddr("10.1.0.5")); n != 2 {
		t.Errorf("ClientLen %d, want 2", n)
	}
	for _, c := range []string{"[2001:db8:1:2::1]:1", "[2001:db8:1:2::1]:2"} {
		if err := admit(c); err != nil {
			t.Fatalf("flow from %s: %v", c, err)
		}
	}
	if err := admit("[2001:db8:1:2::1]:3"); err != ErrClientCap {
		t.Errorf("a third flow of an IPv6 address: %v, want ErrClientCap", err)
	}
	if err := admit("[2001:db8:1:2:abcd::1]:3"); err != nil {
		t.Errorf("another address of the same /64 (client_ipv6_prefix 128): %v", err)
	}
	// With client_ipv6_prefix 64 the addresses of a /64 are one client.
	by64 := NewFlowTable(100)
	by64.SetClientIPv6Prefix(64)
	by64.SetMaxPerClient(2)
	for i, c := range []string{"[2001:db8:1:2::1]:1", "[2001:db8:1:2:ffff::9]:2", "[2001:db8:1:2:abcd::1]:3", "[2001:db8:1:3::1]:3"} {
		err := by64.Admit(NewFlow("s", "forward", netip.MustParseAddrPort(c), netip.MustParseAddrPort("10.2.0.2:80")))
		if want := map[bool]error{true: ErrClientCap, false: nil}[i == 2]; err != want {
			t.Errorf("client_ipv6_prefix 64, flow from %s: %v, want %v", c, err, want)
		}
	}
	// Link-local clients are in fe80::/64 on every link: one link's
	// client at its cap leaves the others' theirs, here by its zone.
	for i, c := range []string{"[fe80::1%guest0]:1", "[fe80::2%guest0]:2", "[fe80::3%guest0]:3", "[fe80::1%staff0]:1", "[fe80::2%staff0]:2"} {
		err := by64.Admit(NewFlow("s", "forward", netip.MustParseAddrPort(c), netip.MustParseAddrPort("[fe80::99%guest0]:80")))
		if want := map[bool]error{true: ErrClientCap, false: nil}[i == 2]; err != want {
			t.Errorf("client_ipv6_prefix 64, flow from %s: %v, want %v", c, err, want)
		}
	}
	ll := NewFlowTable(100) // client_ipv6_prefix 128: the same address on two links
	ll.SetMaxPerClient(2)
	for i, c := range []string{"fe80::1%guest0", "fe80::1%guest0", "fe80::1%guest0", "fe80::1%staff0"} {
		err := ll.Reserve(netip.MustParseAddr(c))
		if want := map[bool]error{true: ErrClientCap, false: nil}[i == 2]; err != want {
			t.Errorf("client_ipv6_prefix 128, place %d for %s: %v, want %v", i, c, err, want)
		}
	}
	tab.Ended(kept[0])
	if err := admit("10.1.0.5:1003"); err != nil {
		t.Errorf("after one of its flows ended: %v", err)
	}
	tab.Remove(kept[0]) // ended before: counted once
	if err := admit("10.1.0.5:1004"); err != ErrClientCap {
		t.Errorf("the ended flow removed too: %v, want ErrClientCap", err)
	}
	tab.Remove(kept[1])
	if err := admit("10.1.0.5:1005"); err != nil {
		t.Errorf("after one of its flows was removed: %v", err)
	}
	adopted := NewFlow("s", "forward", netip.MustParseAddrPort("10.1.0.5:2000"), netip.MustParseAddrPort("10.2.0.2:80"))
	adopted.ID = 1000
	if !tab.Adopt(adopted) {
		t.Fatal("adoption refused above the client's cap")
	}
	if n := tab.ClientLen(netip.MustParseAddr("10.1.0.5")); n != 3 {
		t.Errorf("ClientLen with the adopted flow %d, want 3", n)
	}
	tab.SetMaxPerClient(0)
	if err := admit("10.1.0.5:1006"); err != nil {
		t.Errorf("no cap: %v", err)
	}
	// A cap set by a reload counts the flows already in the table.
	later := NewFlowTable(100)
	for range 3 {
		if err := later.Admit(NewFlow("s", "forward", netip.MustParseAddrPort("10.1.0.8:1"), netip.MustParseAddrPort("10.2.0.2:80"))); err != nil {
			t.Fatal(err)
		}
	}
	later.SetMaxPerClient(3)
	if n := later.ClientLen(netip.MustParseAddr("10.1.0.8")); n != 3 {
		t.Errorf("a cap set later: ClientLen %d, want 3", n)
	}
	if err := later.Admit(NewFlow("s", "forward", netip.MustParseAddrPort("10.1.0.8:2"), netip.MustParseAddrPort("10.2.0.2:80"))); err != ErrClientCap {
		t.Errorf("a cap set later: a fourth flow %v, want ErrClientCap", err)
	}
	full := NewFlowTable(1)
	full.SetMaxPerClient(5)
	for i, want := range []error{nil, ErrFlowCap} {
		if err := full.Admit(NewFlow("s", "forward", netip.MustParseAddrPort("10.1.0.7:1"), netip.MustParseAddrPort("10.2.0.2:80"))); err != want {
			t.Errorf("flow %d of a table of 1: %v, want %v", i, err, want)
		}
	}
	if table, client := tab.Refused(); table != 0 || client != 3 {
		t.Errorf("refusals counted: %d at max_flows, %d at max_flows_per_client; want 0 and 3", table, client)
	}
	if table, client := full.Refused(); table != 1 || client != 0 {
		t.Errorf("refusals counted by the full table: %d and %d, want 1 and 0", table, client)
	}
}

// TestFlowTableReserve: places a client reserved (its SOCKS5 handshakes
// under way) count against limits.max_flows_per_client with its flows,
// in every admission; a reserved place becomes its flow without being
// counted twice, and is given back when the flow is refused; places
// reserved with no cap count once one is set.
func TestFlowTableReserve(t *testing.T) {
	tab := NewFlowTable(100)
	client := netip.MustParseAddr("10.1.0.5")
	flow := func(port uint16) *Flow {
		return NewFlow("s", "socks5", netip.AddrPortFrom(client, port), netip.MustParseAddrPort("10.2.0.2:80"))
	}
	for range 2 {
		if err := tab.Reserve(client); err != nil {
			t.Fatalf("no cap: %v", err)
		}
	}
	tab.SetMaxPerClient(2)
	if err := tab.Reserve(netip.MustParseAddr("::ffff:10.1.0.5")); err != ErrClientCap {
		t.Errorf("a third place of a client holding 2: %v, want ErrClientCap", err)
	}
	if err := tab.Admit(flow(1)); err != ErrClientCap {
		t.Errorf("a flow of a client holding 2 places: %v, want ErrClientCap", err)
	}
	if err := tab.AdmitReserved(flow(2)); err != nil {
		t.Errorf("the flow of a reserved place, at the cap: %v", err)
	}
	if n := tab.ClientLen(client); n != 1 {
		t.Errorf("ClientLen %d, want 1", n)
	}
	tab.Release(client)
	if err := tab.Admit(flow(3)); err != nil {
		t.Errorf("after a place was released: %v", err)
	}
	if err := tab.Reserve(client); err != ErrClientCap {
		t.Errorf("a place for a client with 2 flows: %v, want ErrClientCap", err)
	}
	// A reserved place whose flow is refused is given back.
	full := NewFlowTable(0)
	full.SetMaxPerClient(1)
	if err := full.Reserve(client); err != nil {
		t.Fatal(err)
	}
	if err := full.AdmitReserved(flow(4)); err != ErrFlowCap {
		t.Errorf("a full table: %v, want ErrFlowCap", err)
	}
	full.SetMax(10)
	if err := full.Reserve(client); err != nil {
		t.Errorf("the place of a refused flow was kept: %v", err)
	}
	if table, client := tab.Refused(); table != 0 || client != 3 {
		t.Errorf("refusals counted: %d at max_flows, %d at max_flows_per_client; want 0 and 3", table, client)
	}
}
