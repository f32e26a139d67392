package httpproxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestUpgradeNeedsBackendConsent: a 101 opens a tunnel (every byte after
// it goes to the backend unrouted), so it must be the backend's answer to
// the upgrade the client asked for. TestWebSocketUpgradeNeedsAccept
// covers WebSocket; a client that names any other protocol
// ("Upgrade: foo", "websocket/13") skipped that check, and a backend
// whose status a client can choose (a status echo) answering 101 without
// an Upgrade field (RFC 9110 7.8: it MUST send one) opened a tunnel past
// the deny routes.
func TestUpgradeNeedsBackendConsent(t *testing.T) {
	for _, c := range []struct {
		name, upgrade, answer string
		tunnel                bool
	}{
		{"other protocol, no Upgrade in the 101", "foo", "", false},
		{"websocket with a version, no Upgrade in the 101", "websocket/13", "", false},
		{"other protocol, a protocol not asked for", "foo", "bar", false},
		{"other protocol, agreed", "foo/2, bar", "bar", true},
		// h2c is not passed on, in any version: one 101 would make the
		// connection HTTP/2 to one backend, every later stream unrouted.
		{"h2c with a version", "h2c/1", "h2c", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			after := make(chan string, 1)
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				r := bufio.NewReader(conn)
				if readHTTPRequestHead(r) != nil {
					return
				}
				io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\n")
				if c.answer != "" {
					io.WriteString(conn, "Connection: Upgrade\r\nUpgrade: "+c.answer+"\r\n")
				}
				io.WriteString(conn, "\r\n")
				conn.SetReadDeadline(time.Now().Add(time.Second))
				line, _ := r.ReadString('\n')
				after <- line
			})
			_, addr := testService(t, b)
			conn, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			io.WriteString(conn, "GET /a/status?code=101 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: "+c.upgrade+"\r\n\r\n")
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(conn, "GET /admin/x HTTP/1.1\r\n")
			got := <-after
			if c.tunnel {
				if resp.StatusCode != http.StatusSwitchingProtocols || got != "GET /admin/x HTTP/1.1\r\n" {
					t.Errorf("status %d, the backend read %q after it; want 101 and a tunnel", resp.StatusCode, got)
				}
				return
			}
			if resp.StatusCode != http.StatusBadGateway || got != "" {
				t.Errorf("status %d, the backend read %q after it; want 502 and nothing", resp.StatusCode, got)
			}
		})
	}
}
