package main

import (
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabLinkLocalClient: a client connects from its link-local address
// (fe80::/10, as a host on a LAN without a global prefix does) to a
// server beyond the gateway, a NAT service. The gateway's sockets talk
// to each peer on its own link; spliced, the packets from and to the
// client's address would have to cross links, which IPv6 routing does
// not do (the server's went back out of the server's link): such a flow
// stays proxied, with a refusal in the log, and arrives intact. Before,
// every splicing mode stalled at the splice (the client's writes timed
// out after 0.7 of 16 MiB).
func TestLabLinkLocalClient(t *testing.T) {
	t.Parallel()
	for _, mode := range bpfModes {
		t.Run(mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			sc := &scenario{upstream: "nat", port: 5001, spliceAt: 1}
			d := testnet.StartDaemon(t, lab, scenarioConfig(sc, mode))
			out, err := lab.Client().Run("ip", "-6", "-o", "addr", "show", "dev", lab.Client().Dev, "scope", "link")
			if err != nil {
				t.Fatal(err)
			}
			var ll netip.Prefix
			f := strings.Fields(out)
			for i := range f {
				if f[i] == "inet6" && i+1 < len(f) {
					ll, _ = netip.ParsePrefix(f[i+1])
				}
			}
			if !ll.Addr().IsLinkLocalUnicast() {
				t.Fatalf("no link-local address on the client's %s:\n%s", lab.Client().Dev, out)
			}
			local := netip.AddrPortFrom(ll.Addr().WithZone(lab.Client().Dev), 0)
			srv := netip.AddrPortFrom(lab.Server().IPv6, 5001)
			ln, err := lab.Server().Listen(srv)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var c *net.TCPConn
			err = lab.Client().Do(func() error {
				d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local), Timeout: 5 * time.Second}
				nc, err := d.Dial("tcp6", srv.String())
				if err == nil {
					c = nc.(*net.TCPConn)
				}
				return err
			})
			if err != nil {
				t.Fatalf("dial from %v: %v", local, err)
			}
			ln.SetDeadline(time.Now().Add(10 * time.Second))
			s, err := ln.AcceptTCP()
			if err != nil {
				c.Close()
				t.Fatal(err)
			}
			const size = 16 << 20
			tr := testnet.Exchange(c, s, testnet.TransferOptions{C2S: size, S2C: size, Seed: rand.Uint64(), Timeout: time.Minute})
			if err := tr.Check(); err != nil {
				t.Fatalf("%v\n%s", err, tail(d.Log(), 30))
			}
			if got, want := tr.Server.Peer.Addr(), lab.GatewayServerSide[0].IPv6; got != want {
				t.Errorf("server saw %v, want %v", got, want)
			}
			if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" }) != nil {
				t.Fatalf("a flow of a link-local client was spliced\n%s", tail(d.Log(), 30))
			}
			if spliceMode(mode) && d.FindLog(func(l map[string]any) bool {
				m, _ := l["msg"].(string)
				return strings.HasPrefix(m, "splice refused: ") && strings.Contains(m, "link-local")
			}) == nil {
				t.Errorf("no splice refusal for the link-local client in the log\n%s", tail(d.Log(), 30))
			}
		})
	}
}
