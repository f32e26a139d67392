package main

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabECNAcrossLegs: a client that asks for ECN (Apple's systems,
// Linux with tcp_ecn=1) gets it from the gateway's socket (tcp_ecn=2,
// the default, accepts it), while the gateway's own connection to the
// server does not ask. Spliced, the client's ECN-capable packets reached
// a server that never negotiated ECN (27 of 51 in a 1 MiB transfer): a
// router marks such packets CE instead of dropping them, the server
// ignores the mark, and the client never slows down. Now the server gets
// them Not-ECT, and a CE mark on the client's side (every 16th of its ECN-capable packets,
// marked as they leave it) becomes the drop it stands for: the client
// retransmits, the data arrives intact, and on the bpf datapath the flow
// stays there. The same after an unsplice and a second splice: the
// rebuilt sockets have no ECN state (TCP_REPAIR restores none), and the
// capture took both legs for ones without ECN. IPv4 and IPv6, on both
// datapaths.
func TestLabECNAcrossLegs(t *testing.T) {
	t.Parallel()
	for _, datapath := range []string{"nfqueue", "bpf"} {
		t.Run(datapath, func(t *testing.T) {
			t.Parallel()
			lab := testnet.NewT(t, testnet.Options{})
			lab.Client().MustRun("sysctl", "-qw", "net.ipv4.tcp_ecn=1")
			lab.Client().MustRun("nft", `add table inet ecntest
add chain inet ecntest out { type filter hook output priority 0; }
add rule inet ecntest out tcp dport 5001 ip ecn { ect0, ect1 } counter
add rule inet ecntest out tcp dport 5001 ip6 ecn { ect0, ect1 } counter
add rule inet ecntest out tcp dport 5001 ip ecn { ect0, ect1 } numgen inc mod 16 == 0 ip ecn set ce counter
add rule inet ecntest out tcp dport 5001 ip6 ecn { ect0, ect1 } numgen inc mod 16 == 0 ip6 ecn set ce counter`)
			lab.Server().MustRun("nft", `add table inet ecntest
add chain inet ecntest in { type filter hook input priority 0; }
add rule inet ecntest in tcp dport 5001 ip ecn != not-ect counter
add rule inet ecntest in tcp dport 5001 ip6 ecn != not-ect counter`)
			d := testnet.StartDaemon(t, lab, splicingForwardConfig("debug", "  datapath: "+datapath+"\n"))
			var conns [][2]*net.TCPConn
			for _, v6 := range []bool{false, true} {
				c, s := connectThrough(t, lab, netip.AddrPortFrom(lab.Server().Addr(v6), 5001))
				defer c.Close()
				defer s.Close()
				conns = append(conns, [2]*net.TCPConn{c, s})
			}
			want := "flow spliced"
			if datapath == "bpf" {
				want = "flow promoted to the bpf datapath"
			}
			if err := testnet.Poll(10*time.Second, func() error {
				if n := countMsg(d, want); n < 2 {
					return fmt.Errorf("%d of 2 flows: %q", n, want)
				}
				return nil
			}); err != nil {
				t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
			}
			transfer := func(what string) {
				t.Helper()
				for i, cs := range conns {
					data := make([]byte, 4<<20)
					for j := range data {
						data[j] = byte(rand.Uint32())
					}
					for _, pair := range [][2]*net.TCPConn{cs, {cs[1], cs[0]}} {
						go pair[0].Write(data)
						pair[1].SetReadDeadline(time.Now().Add(30 * time.Second))
						got := make([]byte, len(data))
						if _, err := io.ReadFull(pair[1], got); err != nil || !bytes.Equal(got, data) {
							t.Fatalf("%s, flow %d: %v (intact: %v)\n%s", what, i, err, bytes.Equal(got, data), tail(d.Log(), 20))
						}
					}
				}
			}
			transfer("spliced")
			// Unspliced, the gateway's sockets are rebuilt with
			// TCP_REPAIR, which restores no ECN state; spliced again,
			// the legs are still told apart.
			for i := range conns {
				id := uint64(i + 1)
				if _, err := d.Client().Unsplice(t.Context(), id); err != nil {
					t.Fatalf("unsplice %d: %v", id, err)
				}
				if f, err := d.Client().Splice(t.Context(), id); err != nil || f.Datapath != datapath {
					t.Fatalf("splice %d again: %+v, %v", id, f, err)
				}
			}
			transfer("spliced again")
			sent := nftCounters(t, &lab.Client().NS, "ecntest")
			if sent[0] == 0 || sent[1] == 0 || sent[2] == 0 || sent[3] == 0 {
				t.Fatalf("the client sent ECT %d (IPv4) %d (IPv6) and CE %d %d packets; the test needs some of each", sent[0], sent[1], sent[2], sent[3])
			}
			if got := nftCounters(t, &lab.Server().NS, "ecntest"); got[0] != 0 || got[1] != 0 {
				t.Errorf("the server, which negotiated no ECN, got %d (IPv4) and %d (IPv6) ECN-capable or CE packets", got[0], got[1])
			}
			if e := spliceEngine(t, d); e.Verdicts["drop_ce"] == 0 {
				t.Errorf("no CE mark was dropped: verdicts %v", e.Verdicts)
			}
			if datapath == "bpf" {
				if n := countMsg(d, "promoting again a flow the bpf datapath passed back"); n > 0 {
					t.Errorf("flows came back from the bpf datapath %d times", n)
				}
				for i := range conns {
					id := uint64(i + 1)
					if f, err := d.Client().Flow(t.Context(), id); err != nil || f.Datapath != "bpf" {
						t.Errorf("flow %d: %+v, %v; want it on bpf", id, f, err)
					}
				}
			}
		})
	}
}
