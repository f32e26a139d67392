package gateway

import (
	"testing"

	"spliced/config"
)

// TestRedirectLeavesStackInterfaces: with the bpf datapath's redirect,
// what arrives on an interface with a classic tc ingress qdisc goes on
// through the stack, its reverse path filter and forward hook included.
// The checks the redirect makes moot (reversePathRefusal, checkFirewall)
// must apply to such an interface, and only to it.
func TestRedirectLeavesStackInterfaces(t *testing.T) {
	g := quietGateway(t)
	if g.config().Kernel.BPFForward != config.BPFForwardRedirect {
		t.Fatalf("kernel.bpf_forward defaults to %q", g.config().Kernel.BPFForward)
	}
	if g.redirectsSpliced() || g.redirectsFrom(3) {
		t.Fatal("redirects without the bpf datapath")
	}
	g.kpath = &kernelPath{}
	defer func() { g.kpath = nil }()
	if !g.redirectsSpliced() || !g.redirectsFrom(3) {
		t.Fatal("no redirect with the bpf datapath and no tc ingress qdisc")
	}
	g.kpath.stack.Store(&[]int{3})
	if g.redirectsSpliced() {
		t.Error("spliced packets taken for redirected everywhere while interface 3 has a tc ingress qdisc")
	}
	if g.redirectsFrom(3) {
		t.Error("packets that arrive on interface 3, which has a tc ingress qdisc, taken for redirected")
	}
	if !g.redirectsFrom(4) {
		t.Error("packets that arrive on interface 4 taken for not redirected")
	}
}
