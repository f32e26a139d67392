package gateway

import (
	"net/netip"
	"testing"

	"spliced/splice"
)

// TestResetPackets: the resets reach each end from the address and port
// it talks to, at the sequence number it expects next, with valid
// checksums, for IPv4 NAT and IPv6 transparent flows.
func TestResetPackets(t *testing.T) {
	cases := []struct {
		name                   string
		client, server, gwSide string
	}{
		{"ipv4 nat", "10.1.0.2:40000", "10.2.0.2:80", "10.2.0.1:50000"},
		{"ipv6 transparent", "[fd00:1::2]:40000", "[fd00:2::2]:80", "[fd00:1::2]:40000"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			client, server, gw := netip.MustParseAddrPort(c.client), netip.MustParseAddrPort(c.server), netip.MustParseAddrPort(c.gwSide)
			p := splice.Params{
				Client: splice.Conn{Local: server, Remote: client, SndNxt: 1000, RcvNxt: 2000, SndWnd: 65535, RcvWnd: 65535, MSS: 1460},
				Server: splice.Conn{Local: gw, Remote: server, SndNxt: 0xfffffff0, RcvNxt: 7000, SndWnd: 65535, RcvWnd: 65535, MSS: 1460},
			}
			f, err := splice.NewFlow(&p, 1)
			if err != nil {
				t.Fatal(err)
			}
			pkts := resetPackets(f, p.Keys())
			want := map[netip.AddrPort]struct {
				from netip.AddrPort
				seq  splice.Seq
			}{
				client: {server, 1000},   // the client expects the gateway's client leg's next byte
				server: {gw, 0xfffffff0}, // the server expects the server leg's next byte
			}
			if len(pkts) != 2 {
				t.Fatalf("%d packets, want one per end", len(pkts))
			}
			for _, b := range pkts {
				var pk splice.Packet
				if r := pk.Parse(b); r != splice.OK {
					t.Fatalf("parse: %v", r)
				}
				tcp := pk.TCP()
				src, _ := netip.AddrFromSlice(pk.Src())
				dst, _ := netip.AddrFromSlice(pk.Dst())
				from, to := netip.AddrPortFrom(src, tcp.SrcPort()), netip.AddrPortFrom(dst, tcp.DstPort())
				w, ok := want[to]
				if !ok || from != w.from || tcp.Seq() != w.seq || tcp.Flags() != splice.FlagRST {
					t.Errorf("packet %v -> %v seq %d flags %#x; want from %v seq %d, RST", from, to, tcp.Seq(), tcp.Flags(), w.from, w.seq)
				}
				delete(want, to)
				sum := tcp.Checksum()
				tcp.SetChecksum(0)
				if got := splice.TCPChecksum(pk.Src(), pk.Dst(), pk.Segment()); got != sum {
					t.Errorf("TCP checksum %#x, want %#x", sum, got)
				}
				if !pk.IsIPv6() {
					ip := splice.IPv4(b)
					hs := ip.Checksum()
					ip.UpdateChecksum()
					if ip.Checksum() != hs {
						t.Errorf("IPv4 header checksum %#x, want %#x", hs, ip.Checksum())
					}
				}
			}
		})
	}
}
