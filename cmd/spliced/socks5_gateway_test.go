package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// socksConnect sends a greeting (no authentication) and a CONNECT for
// req (ATYP and address, port) on c and returns the reply's 10 bytes,
// or what came before the connection ended.
func socksConnect(t *testing.T, c net.Conn, req []byte) []byte {
	t.Helper()
	c.Write(append([]byte{5, 1, 0, 5, 1, 0}, req...))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 2+10)
	n, _ := io.ReadFull(c, got)
	return got[:n]
}

func atypAddr(ap netip.AddrPort) []byte {
	var b []byte
	if ap.Addr().Is4() {
		b = append([]byte{1}, ap.Addr().AsSlice()...)
	} else {
		b = append([]byte{4}, ap.Addr().AsSlice()...)
	}
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func atypName(name string, port uint16) []byte {
	b := append([]byte{3, byte(len(name))}, name...)
	return binary.BigEndian.AppendUint16(b, port)
}

// TestLabSOCKSGateway: a SOCKS5 service with no rules is no relay into
// the gateway. With debug.pprof on 127.0.0.1 (loopback only, as it
// exposes the daemon's memory), a client of the gateway could CONNECT to
// it through the proxy and read the daemon's command line, heap and
// goroutines; so too the gateway's own addresses (the SOCKS listener
// itself) and loopback by name. Each gets 0x02 now, and nothing reaches
// them.
func TestLabSOCKSGateway(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	gw := lab.GatewayClientSide[0]
	socks := netip.AddrPortFrom(gw.IPv4, 1080)
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: debug
debug:
  pprof: "127.0.0.1:6060"
services:
  - name: socks
    proxy: socks5
    listen_on: ["%s", "%s"]
    splice:
      mode: never
`, socks, netip.AddrPortFrom(gw.IPv6, 1080)))
	for name, req := range map[string][]byte{
		"pprof 127.0.0.1:6060":        atypAddr(netip.MustParseAddrPort("127.0.0.1:6060")),
		"pprof ::ffff:127.0.0.1:6060": atypAddr(netip.AddrPortFrom(netip.AddrFrom16(netip.MustParseAddr("127.0.0.1").As16()), 6060)),
		"pprof localhost:6060":        atypName("localhost", 6060),
		"the SOCKS listener itself":   atypAddr(socks),
		"the gateway's server side":   atypAddr(netip.AddrPortFrom(lab.GatewayServerSide[0].IPv4, 1080)),
	} {
		c, err := lab.Client().Dial(socks, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		got := socksConnect(t, c, req)
		if bytes.Equal(got, []byte{5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0}) {
			c.Close()
			continue
		}
		detail := ""
		if len(got) >= 4 && got[3] == 0 && strings.HasPrefix(name, "pprof") {
			fmt.Fprintf(c, "GET /debug/pprof/cmdline HTTP/1.0\r\n\r\n")
			body, _ := io.ReadAll(io.LimitReader(c, 4096))
			detail = fmt.Sprintf("; GET /debug/pprof/cmdline through it answered:\n%s", body)
		}
		c.Close()
		t.Errorf("%s: got %x, want 0x02%s", name, got, detail)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "socks5: request refused" && strings.Contains(fmt.Sprint(l["err"]), "a socks5 rule that allows it must name it")
	}); err != nil {
		t.Errorf("no log line says why: %v", err)
	}
}
