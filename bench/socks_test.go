package bench

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// TestSOCKSConnect drives the bench's SOCKS5 client against a scripted
// server: what it sends, and how it reads each kind of reply.
func TestSOCKSConnect(t *testing.T) {
	v4 := netip.MustParseAddrPort("10.2.0.2:7000")
	v6 := netip.MustParseAddrPort("[fd00:2::2]:7000")
	for _, tc := range []struct {
		name            string
		dst             netip.AddrPort
		method, reply   []byte
		wantReq         []byte
		wantBound, fail string
	}{
		{name: "ipv4", dst: v4, method: []byte{5, 0}, reply: []byte{5, 0, 0, 1, 10, 2, 0, 1, 0x9c, 0x40},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, wantBound: "10.2.0.1:40000"},
		{name: "ipv6", dst: v6, method: []byte{5, 0}, reply: append(append([]byte{5, 0, 0, 4}, netip.MustParseAddr("fd00:2::1").AsSlice()...), 0, 80),
			wantReq: append(append([]byte{5, 1, 0, 4}, v6.Addr().AsSlice()...), 0x1b, 0x58), wantBound: "[fd00:2::1]:80"},
		{name: "domain bound", dst: v4, method: []byte{5, 0}, reply: []byte{5, 0, 0, 3, 3, 'g', 'w', 'x', 0, 1},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, wantBound: "invalid AddrPort"},
		{name: "refused", dst: v4, method: []byte{5, 0}, reply: []byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, fail: "0x05 (connection refused)"},
		{name: "not allowed", dst: v4, method: []byte{5, 0}, reply: []byte{5, 2, 0, 1, 0, 0, 0, 0, 0, 0},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, fail: "not allowed by ruleset"},
		{name: "no method", dst: v4, method: []byte{5, 0xff}, fail: "no authentication refused"},
		{name: "bad address type", dst: v4, method: []byte{5, 0}, reply: []byte{5, 0, 0, 9},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, fail: "address type 9"},
		{name: "truncated reply", dst: v4, method: []byte{5, 0}, reply: []byte{5, 0, 0, 1, 10, 2},
			wantReq: []byte{5, 1, 0, 1, 10, 2, 0, 2, 0x1b, 0x58}, fail: "reply address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			got := make(chan []byte, 1)
			go func() {
				defer server.Close()
				greeting := make([]byte, 3)
				if _, err := io.ReadFull(server, greeting); err != nil || !bytes.Equal(greeting, []byte{5, 1, 0}) {
					got <- nil
					return
				}
				server.Write(tc.method)
				if tc.reply == nil {
					got <- nil
					return
				}
				req := make([]byte, len(tc.wantReq))
				io.ReadFull(server, req)
				got <- req
				server.Write(tc.reply)
			}()
			bound, err := socksConnect(client, tc.dst)
			if tc.fail != "" {
				if err == nil || !strings.Contains(err.Error(), tc.fail) {
					t.Errorf("error %v, want one with %q", err, tc.fail)
				}
			} else if err != nil || bound.String() != tc.wantBound {
				t.Errorf("bound %v, %v; want %s", bound, err, tc.wantBound)
			}
			if req := <-got; tc.wantReq != nil && !bytes.Equal(req, tc.wantReq) {
				t.Errorf("request % x, want % x", req, tc.wantReq)
			}
		})
	}
}

func TestParentPid(t *testing.T) {
	for stat, want := range map[string]int{
		"4242 (danted) S 4200 4242 4200 0 -1":          4200,
		"4243 (danted: io-chil) S 4242 4242 4200 0 -1": 4242,
		"7 (a) b) R 1 7 7":                             1,
	} {
		if got, ok := parentPid(stat); !ok || got != want {
			t.Errorf("parentPid(%q) = %d, %v; want %d", stat, got, ok, want)
		}
	}
	if _, ok := parentPid("garbage"); ok {
		t.Error("parentPid accepted a line without a command")
	}
}

func TestDanteConfig(t *testing.T) {
	cfg := danteConfig(netip.MustParseAddrPort("10.1.0.1:1080"), netip.MustParseAddr("10.2.0.1"), netip.MustParsePrefix("10.1.0.0/24"), "/tmp/x/danted.log")
	for _, want := range []string{
		"logoutput: /tmp/x/danted.log\n", "internal: 10.1.0.1 port = 1080\n", "external: 10.2.0.1\n",
		"clientmethod: none\n", "socksmethod: none\n", "user.privileged: root\n", "user.unprivileged: nobody\n",
		"client pass {\n    from: 10.1.0.0/24 to: 0.0.0.0/0\n}", "socks pass {\n    from: 10.1.0.0/24 to: 0.0.0.0/0\n    command: connect\n}",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("danted.conf lacks %q:\n%s", want, cfg)
		}
	}
}
