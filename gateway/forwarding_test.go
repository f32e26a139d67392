package gateway

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"spliced/proxy"
)

// TestSpliceRefusalsFollowTheirCause: the status lists the latest
// refusal of each cause (a family's setting on an interface) while that
// cause lasts: one interface fixed takes its warning away, not the
// other's, and an IPv4 cause fixed leaves the IPv6 one.
func TestSpliceRefusalsFollowTheirCause(t *testing.T) {
	g := quietGateway(t)
	var r spliceRefusal
	f := proxy.NewFlow("svc", "forward", netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	r.refuse(g, f, refusalCause{4, 2}, "v4 on c0, first")
	r.refuse(g, f, refusalCause{4, 2}, "v4 on c0")
	r.refuse(g, f, refusalCause{4, 3}, "v4 on s0")
	r.refuse(g, f, refusalCause{6, 2}, "v6 on c0")
	off := map[refusalCause]bool{{4, 2}: true, {4, 3}: true, {6, 2}: true}
	lasts := func(c refusalCause) bool { return off[c] }
	if got, want := r.current(lasts), []string{"v4 on c0", "v4 on s0", "v6 on c0"}; !slices.Equal(got, want) {
		t.Errorf("refusals %q, want %q", got, want)
	}
	off[refusalCause{4, 2}], off[refusalCause{4, 3}] = false, false
	if got, want := r.current(lasts), []string{"v6 on c0"}; !slices.Equal(got, want) {
		t.Errorf("after IPv4 forwarding was turned on: %q, want %q", got, want)
	}
	off[refusalCause{4, 2}] = true // off again: forgotten until refused again
	if got := r.current(lasts); !slices.Equal(got, []string{"v6 on c0"}) {
		t.Errorf("a cause back without a refusal: %q", got)
	}
}

// TestRefusalsForgottenOnceFixedEverywhere: a refusal's warning goes
// when its cause is fixed and does not come back with the cause alone,
// also when the fix leaves no interface at fault at all (the common fix:
// net.ipv4.ip_forward=1, rp_filter=2 everywhere). Before, the status then
// kept the old reasons, and showed them again, unrefused, as soon as
// forwarding was off (strict filtering on) again anywhere they named.
func TestRefusalsForgottenOnceFixedEverywhere(t *testing.T) {
	g := quietGateway(t)
	f := proxy.NewFlow("svc", "forward", netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	setOff := func(off4 map[int]string) {
		g.fwd.mu.Lock()
		g.fwd.off4, g.fwd.off6, g.fwd.read = off4, map[int]string{}, time.Now()
		g.fwd.mu.Unlock()
	}
	setStrict := func(strict map[int]string) {
		g.rpf.mu.Lock()
		g.rpf.strict, g.rpf.read = strict, time.Now()
		g.rpf.mu.Unlock()
	}
	setOff(map[int]string{2: "c0"})
	setStrict(map[int]string{2: "c0"})
	g.fwd.refusals.refuse(g, f, refusalCause{4, 2}, "forwarding off on c0")
	g.rpf.refusals.refuse(g, f, refusalCause{4, 2}, "strict on c0")
	if got := append(g.forwardingWarnings(), g.reversePathWarnings()...); len(got) != 2 {
		t.Fatalf("warnings %q, want both refusals", got)
	}
	setOff(map[int]string{})
	setStrict(map[int]string{})
	if got := append(g.forwardingWarnings(), g.reversePathWarnings()...); len(got) != 0 {
		t.Errorf("warnings %q once fixed everywhere", got)
	}
	setOff(map[int]string{2: "c0"})
	setStrict(map[int]string{2: "c0"})
	if got := append(g.forwardingWarnings(), g.reversePathWarnings()...); len(got) != 0 {
		t.Errorf("warnings %q back without a refusal", got)
	}
}
