package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"spliced/testnet"
)

// TestLabMarkRouting: the router routes the flows to the server by
// firewall mark, over a second link that only marked packets take (ip
// rule fwmark 0x10/0x10 lookup 200), and the server drops the test
// port's packets that come over the first, as a second uplink or a VPN
// would not carry them. 16 MiB each way, spliced at a random moment.
//
// "per packet": a prerouting chain marks what the client sends, an
// output chain what the gateway sends to the server (OpenWrt's pbr).
// Found (2026-12-05): on bpf both flows stalled (the redirect's route
// lookup runs before the chains set the mark: the client's writes timed
// out after 2.7 and 7.1 MB, the server dropped 21 and 19 packets that came
// the main table's way), and on nfqueue the payload a splice takes over,
// sent whole through a packet socket on the device of the daemon's own
// route lookup, came the wrong way too (7 and 10 packets dropped, sent
// again by TCP). Now the program leaves what it rewrites to the stack,
// the payload goes through the IP output path, and the server drops
// nothing.
//
// "per connection": the connection's mark is set when it starts and
// copied to its packets (meta mark set ct mark, as mwan3 does with
// CONNMARK). A spliced flow's packets are untracked: before, every
// spliced flow stalled on both datapaths. Now its splice is refused, it
// stays proxied, and the daemon says why. NAT only: a transparent
// upstream connection has the client's 4-tuple, so conntrack takes the
// two connections for one, whose window tracking then finds some of
// their packets invalid, without a connection mark: even proxied
// ("copy"), one run in two stalled in this lab.
//
// IPv4 only: in this lab an IPv6 connection rerouted by the output
// chain's mark never completed, whatever sent it (a plain socket of the
// gateway's too).
func TestLabMarkRouting(t *testing.T) {
	t.Parallel()
	for _, marks := range []string{"per packet", "per connection"} {
		for _, mode := range bpfModes {
			for _, upstream := range []string{"transparent", "nat"} {
				if marks == "per connection" && upstream == "transparent" {
					continue
				}
				t.Run(fmt.Sprintf("%s/%s/%s", marks, mode, upstream), func(t *testing.T) {
					sc := &scenario{upstream: upstream, size: 16 << 20,
						spliceAt: 1<<20 + rand.Int64N(4<<20), proof: true, timeout: 20e9,
						refused: marks == "per connection", stacked: true, rawInjection: true,
						setup: func(t *testing.T, lab *testnet.Lab) { markRoutedUplink(t, lab, marks) }}
					lab := testnet.NewT(t, sc.lab)
					d := sc.runIn(t, lab, mode)
					if spliceMode(mode) && !sc.refused {
						// run checks this, runIn does not: the payload
						// the splice took over went through the IP
						// output path, no packet socket sent it.
						checkInjectedGSO(t, d, spliceEngine(t, d), !sc.rawInjection)
					}
					out, err := lab.Server().Run("nft", "list", "chain", "inet", "wrongpath", "input")
					if err != nil || !strings.Contains(out, "counter packets 0 ") {
						t.Errorf("packets of the flow came the main table's way: %v\n%s", err, out)
					}
					if mode == "copy" {
						return
					}
					check, err := d.Run("-config", d.Config, "-check")
					want := map[string]string{
						"per packet/splice":         "payload a splice takes over goes through the IP output path, where table inet pbr chain output",
						"per packet/splice-bpf":     "the bpf program leaves what it rewrites to the kernel's forwarding path on every interface, where table inet pbr chain prerouting",
						"per connection/splice":     "splices refused, flows stay proxied: table inet mwan chain prerouting",
						"per connection/splice-bpf": "splices refused, flows stay proxied: table inet mwan chain prerouting",
					}[marks+"/"+mode]
					if err != nil || !strings.Contains(check, "# mark routing: "+want) {
						t.Errorf("spliced -check: %v, want %q in\n%s", err, want, check)
					}
					if marks == "per packet" {
						if mode == "splice-bpf" && d.FindLog(func(l map[string]any) bool {
							return strings.HasPrefix(fmt.Sprint(l["msg"]), "ip rules route by firewall mark and a chain sets it at prerouting")
						}) == nil {
							t.Errorf("no log line saying the program leaves spliced packets to the stack\n%s", tail(d.Log(), 20))
						}
						return
					}
					if d.FindLog(func(l map[string]any) bool {
						return strings.HasPrefix(fmt.Sprint(l["msg"]), "a prerouting chain restores the packet mark from the connection's")
					}) == nil {
						t.Errorf("no warning about the connection marks\n%s", tail(d.Log(), 20))
					}
					st, err := d.Client().Status(context.Background())
					if err != nil {
						t.Fatal(err)
					}
					if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "splices refused: the packet mark is restored from the connection's") {
						t.Errorf("status warnings %q, want the refusal", st.Warnings)
					}
				})
			}
		}
	}
}

// markRoutedUplink gives the gateway a second link to the server (s0b,
// 10.3.0.0/24) that only packets marked 0x10 take, marks as the test
// says, and has the server drop the test port's packets that come the
// main table's way (its first link).
func markRoutedUplink(t *testing.T, lab *testnet.Lab, marks string) {
	t.Helper()
	gw, srv := &lab.Gateway.NS, &lab.Server().NS
	ruleset := `table inet pbr {
	chain prerouting { type filter hook prerouting priority mangle; iifname "c0" meta mark set meta mark | 0x10; }
	chain output { type route hook output priority mangle; ip daddr 10.2.0.0/24 meta mark set meta mark | 0x10; }
}`
	if marks == "per connection" {
		// Before spliced's prerouting chain, whose TPROXY mark the
		// copied mark would overwrite.
		ruleset = `table inet mwan {
	chain prerouting { type filter hook prerouting priority mangle - 10; iifname "c0" ct state new ct mark set 0x10; ct mark != 0 meta mark set ct mark; }
	chain output { type route hook output priority mangle; ip daddr 10.2.0.0/24 ct state new ct mark set 0x10; ct mark != 0 meta mark set ct mark; }
}`
	}
	runSteps(t, []nsStep{
		{gw, []string{"ip", "link", "add", "s0b", "type", "veth", "peer", "name", "eth1", "netns", srv.Name}},
		{gw, []string{"ip", "link", "set", "s0b", "up"}},
		{gw, []string{"ip", "addr", "add", "10.3.0.1/24", "dev", "s0b"}},
		{srv, []string{"ip", "link", "set", "eth1", "up"}},
		{srv, []string{"ip", "addr", "add", "10.3.0.2/24", "dev", "eth1"}},
		// The server takes packets to its first link's address on the
		// second, and answers on the first.
		{srv, []string{"sysctl", "-w", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.eth1.rp_filter=0"}},
		{gw, []string{"ip", "route", "add", "10.2.0.0/24", "via", "10.3.0.2", "dev", "s0b", "table", "200"}},
		{gw, []string{"ip", "rule", "add", "fwmark", "0x10/0x10", "lookup", "200", "priority", "30000"}},
		{gw, []string{"nft", ruleset}},
		{srv, []string{"nft", `table inet wrongpath {
	chain input { type filter hook input priority 0; iifname "eth0" tcp dport 5001 counter drop; }
}`}},
	})
}
