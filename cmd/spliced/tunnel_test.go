package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"spliced/testnet"
)

// TestLabBPFTunnel: the gateway reaches the server through a layer-3
// tunnel (tun devices; a VPN in tun mode, WireGuard, PPPoE and IP tunnels
// make the same kind of link): what arrives on it starts with its IP
// header, no Ethernet header before it. 16 MiB each way, spliced at a
// random moment; the server drops the test port's packets that come over
// its Ethernet link.
//
// Found (2026-12-06): on bpf the program passed every packet from the
// tunnel on untouched, as one it does not handle; the queue took it and
// the gateway took the flow back from the program at each (the queues
// took packets while the flow was on the bpf datapath). Now the program
// rewrites them too, and leaves them to the stack (a redirect from such a
// device would be dropped: it has no link-layer header to replace).
func TestLabBPFTunnel(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		v6       bool
		upstream string
	}{{false, "transparent"}, {false, "nat"}, {true, "nat"}} {
		for _, mode := range bpfModes {
			family := "ipv4"
			if c.v6 {
				family = "ipv6"
			}
			t.Run(fmt.Sprintf("%s/%s/%s", family, c.upstream, mode), func(t *testing.T) {
				sc := &scenario{v6: c.v6, upstream: c.upstream, size: 16 << 20,
					spliceAt: 1<<20 + rand.Int64N(4<<20), proof: true, timeout: 30e9, partlyStacked: true,
					setup: tunneledServer}
				lab := testnet.NewT(t, sc.lab)
				d := sc.runIn(t, lab, mode)
				out, err := lab.Server().Run("nft", "list", "chain", "inet", "wrongpath", "input")
				if err != nil || !strings.Contains(out, "counter packets 0 ") {
					t.Errorf("packets of the flow came over the server's Ethernet link: %v\n%s", err, out)
				}
				if mode != "splice-bpf" {
					return
				}
				st, err := d.Client().Status(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				// Packets queued before the promotion are dropped then
				// (stragglers), as on any interface; none may send the
				// flow back to the Go engine afterwards.
				for _, e := range st.Engines {
					if e.Datapath == "bpf" && e.BPFDemotions != 0 {
						t.Errorf("the flow went back to the Go engine %d times, want it on the program throughout", e.BPFDemotions)
					}
				}
			})
		}
	}
}

// tunneledServer joins the gateway and the server by a tun tunnel, routes
// the server's address (from the gateway) and the client's and the
// gateway's (from the server) through it, and has the server drop the
// test port's packets that come over its Ethernet link.
func tunneledServer(t *testing.T, lab *testnet.Lab) {
	t.Helper()
	gw, srv := &lab.Gateway.NS, &lab.Server().NS
	testnet.Tunnel(t, gw, "tun0", srv, "tun0", 1500)
	gwAddr := lab.GatewayServerSide[0]
	runSteps(t, []nsStep{
		{gw, []string{"ip", "route", "add", lab.Server().IPv4.String() + "/32", "dev", "tun0", "src", gwAddr.IPv4.String()}},
		{gw, []string{"ip", "-6", "route", "add", lab.Server().IPv6.String() + "/128", "dev", "tun0", "src", gwAddr.IPv6.String()}},
		{srv, []string{"ip", "route", "add", lab.Client().IPv4.String() + "/32", "dev", "tun0"}},
		{srv, []string{"ip", "route", "add", gwAddr.IPv4.String() + "/32", "dev", "tun0"}},
		{srv, []string{"ip", "-6", "route", "add", lab.Client().IPv6.String() + "/128", "dev", "tun0"}},
		{srv, []string{"ip", "-6", "route", "add", gwAddr.IPv6.String() + "/128", "dev", "tun0"}},
	})
	nft(t, srv, "add table inet wrongpath", "add chain inet wrongpath input { type filter hook input priority 0; }",
		`add rule inet wrongpath input iifname "eth0" tcp dport 5001 counter drop`)
}

// tunneledClient joins the client and the gateway by a tun tunnel and
// routes the client's traffic to the server through it (and the answers
// back).
func tunneledClient(t *testing.T, lab *testnet.Lab) {
	t.Helper()
	gw, cl := &lab.Gateway.NS, &lab.Client().NS
	testnet.Tunnel(t, cl, "tun0", gw, "tunc", 1500)
	runSteps(t, []nsStep{
		{cl, []string{"ip", "route", "add", lab.Server().IPv4.String() + "/32", "dev", "tun0", "src", lab.Client().IPv4.String()}},
		{gw, []string{"ip", "route", "add", lab.Client().IPv4.String() + "/32", "dev", "tunc"}},
	})
}

// nsStep is a command to run in a namespace.
type nsStep struct {
	ns   *testnet.NS
	args []string
}

// runSteps runs each step's command in its namespace, in order, and
// fails the test at the first that fails.
func runSteps(t *testing.T, steps []nsStep) {
	t.Helper()
	for _, s := range steps {
		if out, err := s.ns.Run(s.args[0], s.args[1:]...); err != nil {
			t.Fatalf("%s: %v: %v\n%s", s.ns.Name, s.args, err, out)
		}
	}
}
