package httpproxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Backend responses whose framing the proxy could read differently from
// the backend (and the rest of one response answer the next request, on
// a connection the pool gives another client), heads without bound, and
// connections kept after their backend sent something unasked.

// readHTTPRequestHead reads one request head (up to its empty line) from r.
func readHTTPRequestHead(r *bufio.Reader) error {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if line == "\r\n" {
			return nil
		}
	}
}

// rawClient sends raw on a new connection, then reads everything until
// the proxy closes (or 3 s pass) and returns it.
func rawClient(t *testing.T, addr, raw string) string {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, raw)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	b, _ := io.ReadAll(c)
	return string(b)
}

// TestResponseStatusBelow100Refused: "HTTP/1.1 099" is a final response
// with a body to net/http (ReadResponse takes any three digits), but the
// proxy's interim loop (StatusCode >= 200) took it for a 1xx, never read
// its body and parsed the body as the next response head: the client got
// a status the backend never sent (999) and then a response the backend
// wrote as body bytes. It gets 502.
func TestResponseStatusBelow100Refused(t *testing.T) {
	forged := "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: 1\r\n\r\nforged"
	b := scriptedBackend(t, func(c *net.TCPConn) {
		if readHTTPRequestHead(bufio.NewReader(c)) != nil {
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 099 Odd\r\nContent-Length: %d\r\n\r\n%s", len(forged), forged)
		io.Copy(io.Discard, c) // until the proxy closes
	})
	_, addr := testService(t, b)
	got := rawClient(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
	if err != nil {
		t.Fatalf("client got %q: %v", got, err)
	}
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("the backend sent one response, status 099 with a %d-byte body; the client got, instead of 502:\n%q", len(forged), got)
	}
}

// TestResponseChunkedToHTTP10Client: a chunked response to an HTTP/1.0
// client is relayed chunked (Response.Write keeps the backend's
// Transfer-Encoding), which RFC 9112 6.1 forbids: a 1.0 client takes the
// chunk framing for body bytes, and one that asked for keep-alive gets a
// response with no length that the proxy does not end with a close: it
// waits for idle_timeout.
func TestResponseChunkedToHTTP10Client(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
		return true
	}
	_, addr := testService(t, b)
	t.Run("close", func(t *testing.T) {
		got := rawClient(t, addr, "GET /a/x HTTP/1.0\r\n\r\n")
		if strings.Contains(strings.ToLower(got), "transfer-encoding") || !strings.HasSuffix(got, "\r\n\r\nhello") {
			t.Errorf("HTTP/1.0 client got %q, want a body of \"hello\" without chunked coding", got)
		}
	})
	t.Run("keep-alive", func(t *testing.T) {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /a/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(time.Second))
		b, _ := io.ReadAll(c)
		got := string(b)
		head, _, _ := strings.Cut(got, "\r\n\r\n")
		h := strings.ToLower(head)
		if strings.Contains(h, "transfer-encoding") || !strings.Contains(h, "content-length") && strings.Contains(h, "keep-alive") {
			t.Errorf("HTTP/1.0 keep-alive client got %q: no length an HTTP/1.0 client can use, and no close", got)
		}
	})
}

// TestResponseAmbiguousFramingNotPooled: a response with both
// Transfer-Encoding and Content-Length was framed as net/http frames it
// (chunked; the length dropped) and its connection went back to the
// idle pool. A backend that framed it by Content-Length and sent the rest
// of its body late had that rest read as the answer to the next client's
// request, from another client. Such a response is refused (502, as
// RFC 9112 6.3 advises) and its connection closed.
func TestResponseAmbiguousFramingNotPooled(t *testing.T) {
	tail := "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
	var conns atomic.Int32
	b := scriptedBackend(t, func(c *net.TCPConn) {
		first := conns.Add(1) == 1
		r := bufio.NewReader(c)
		for {
			if readHTTPRequestHead(r) != nil {
				return
			}
			if first {
				// Framed by Content-Length: "0\r\n\r\n" and the tail are
				// its body, the tail still being generated.
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 5+len(tail))
				// The tail comes later (the next request's arrival
				// stands in for "later" to make the test deterministic).
				if readHTTPRequestHead(r) != nil {
					return
				}
				io.WriteString(c, tail)
				first = false
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
		}
	})
	p, addr := testService(t, b)
	code, body := oneRequest(t, addr, "GET /a/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	if code != http.StatusBadGateway {
		t.Errorf("client A: %d %q, want 502", code, body)
	}
	if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
		t.Fatal("flows still open")
	}
	if st := backendStats(t, p); st.Idle != 0 {
		t.Errorf("an upstream connection whose response had Transfer-Encoding and Content-Length was kept idle: %+v", st)
	}
	code, body = oneRequest(t, addr, "GET /a/2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	if code != http.StatusOK || body != "real" {
		t.Errorf("client B got %d %q, want 200 \"real\" (\"forged\" is the rest of client A's response)", code, body)
	}
}

// TestResponseHTTP10TransferEncodingNotPooled: an HTTP/1.0 response with
// Transfer-Encoding must be treated as faulty and its connection closed
// (RFC 9112 6.1); net/http ignores the coding, and the connection went
// back to the pool. It is refused (502) and closed.
func TestResponseHTTP10TransferEncodingNotPooled(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		io.WriteString(w, "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\nhi")
		return true
	}
	p, addr := testService(t, b)
	if code, body := oneRequest(t, addr, "GET /a/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"); code != http.StatusBadGateway {
		t.Errorf("got %d %q, want 502", code, body)
	}
	if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
		t.Fatal("flows still open")
	}
	if st := backendStats(t, p); st.Idle != 0 {
		t.Errorf("an HTTP/1.0 response with Transfer-Encoding left its connection idle for reuse: %+v", st)
	}
}

// TestResponseHeadBounded: a response head longer than the upstream
// buffer (16 KiB) went to http.ReadResponse, which has no limit: the
// proxy read a backend's endless header line into memory (48 MiB, all
// the test sent). Such a head is refused (502) and the connection closed.
func TestResponseHeadBounded(t *testing.T) {
	const total = 48 << 20
	var written atomic.Int64
	done := make(chan struct{})
	b := scriptedBackend(t, func(c *net.TCPConn) {
		defer close(done)
		if readHTTPRequestHead(bufio.NewReader(c)) != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Big: ")
		chunk := []byte(strings.Repeat("a", 1<<20))
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		for written.Load() < total {
			n, err := c.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("backend still writing")
	}
	if n := written.Load(); n >= total {
		t.Errorf("the proxy took a %d MiB response head (no limit)", n>>20)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusBadGateway {
		t.Errorf("client got %v, %v; want 502", resp, err)
	}
}

// TestHeldUpstreamUnaskedResponse: between two requests of one client
// connection the proxy kept its upstream connection without the check
// the idle pool makes (quiet): a backend that ends an idle connection
// with an unasked 408 (as some servers do) had that 408 answer the
// client's next request. A client that asks again heldUpstreamCheck or
// later after its last response now has its request sent on another
// connection when the backend sent anything meanwhile.
func TestHeldUpstreamUnaskedResponse(t *testing.T) {
	var conns atomic.Int32
	firstDone := make(chan struct{})
	b := scriptedBackend(t, func(c *net.TCPConn) {
		first := conns.Add(1) == 1
		if first {
			defer close(firstDone)
		}
		r := bufio.NewReader(c)
		for {
			if readHTTPRequestHead(r) != nil {
				return
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			if first {
				io.WriteString(c, "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
				return
			}
		}
	})
	_, addr := testService(t, b)
	status, _ := getsOnOneConnection(t, addr, 2, func(i int) {
		if i == 0 {
			<-firstDone // the 408 was written (on loopback: received)
			time.Sleep(heldUpstreamCheck)
		}
	})
	for i, st := range status {
		if st != 200 {
			t.Errorf("request %d: status %d, want 200 (the backend's unasked 408 answered it)", i, st)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d backend connections, want 2", n)
	}
}

// TestResponseBareCRInStatusLine: a bare CR in the backend's reason
// phrase reached the client as it was (the fast path refuses the head,
// but ReadResponse kept it and both writers copy the reason); a client
// that ends lines at a bare CR read a header the backend's head did not
// have. Such a head is refused (502).
func TestResponseBareCRInStatusLine(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nhi")
		return true
	}
	_, addr := testService(t, b)
	got := rawClient(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	if strings.Contains(strings.ReplaceAll(got, "\r\n", ""), "\r") {
		t.Errorf("bare CR relayed to the client: %q", got)
	}
	if !strings.HasPrefix(got, "HTTP/1.1 502 ") {
		t.Errorf("client got %q, want 502", got)
	}
}

// TestWebSocketUpgradeNeedsAccept: a 101 to a WebSocket upgrade opens a
// tunnel (every byte after it goes to the backend unrouted) only with
// the Sec-WebSocket-Accept of the request's key (RFC 6455 4.2.2). A
// backend whose status a client can choose (a status echo) answered 101
// without it, and the client's next "request" reached the backend past
// the deny routes; now the client gets 502 and nothing more goes on.
func TestWebSocketUpgradeNeedsAccept(t *testing.T) {
	const key = "dGhlIHNhbXBsZSBub25jZQ=="
	for _, c := range []struct {
		name, accept string
		tunnel       bool
	}{
		{"valid", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", true}, // RFC 6455's example
		{"missing", "", false},
		{"wrong", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			after := make(chan string, 1)
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				r := bufio.NewReader(conn)
				if readHTTPRequestHead(r) != nil {
					return
				}
				io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n")
				if c.accept != "" {
					io.WriteString(conn, "Sec-WebSocket-Accept: "+c.accept+"\r\n")
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
			io.WriteString(conn, "GET /a/ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "+key+"\r\n\r\n")
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(conn, "GET /private/ HTTP/1.1\r\n")
			got := <-after
			if c.tunnel {
				if resp.StatusCode != http.StatusSwitchingProtocols || got != "GET /private/ HTTP/1.1\r\n" {
					t.Errorf("valid handshake: status %d, the backend read %q after it; want 101 and a tunnel", resp.StatusCode, got)
				}
				return
			}
			if resp.StatusCode != http.StatusBadGateway || got != "" {
				t.Errorf("status %d, the backend read %q after it; want 502 and nothing", resp.StatusCode, got)
			}
		})
	}
}

// TestHeldUpstreamKeptAfterUpstreamTimeout: a client that asks again
// after a pause longer than http.upstream_timeout keeps its upstream
// connection (the check of heldUpstreamCheck read it past the last
// exchange's deadline, took the timeout for a closed connection and
// dialled again).
func TestHeldUpstreamKeptAfterUpstreamTimeout(t *testing.T) {
	b := startBackend(t)
	_, addr := testServiceWith(t, b, "      upstream_timeout: 200ms\n")
	getsOnOneConnection(t, addr, 2, func(int) { time.Sleep(400 * time.Millisecond) }) // past upstream_timeout
	if n := b.accepted(); n != 1 {
		t.Errorf("%d backend connections for two requests of one client connection, want 1", n)
	}
}

// TestUnsplicedKeepsUpstream: after a spliced response the client's next
// request goes on the same backend connection (after the unsplice the
// upstream reader is new and empty, which the check for bytes beyond a
// response took for such bytes: every request after a splice dialled
// again).
func TestUnsplicedKeepsUpstream(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
		return true
	}
	p, addr := testServiceMode(t, b, "      splice_min: 1\n      splice_policy: always\n", "5s", "immediate")
	p.SetSplicer(&pumpSplicer{p: p})
	_, bodies := getsOnOneConnection(t, addr, 3, nil)
	for i, body := range bodies {
		if body != "hello" {
			t.Errorf("response %d: %q", i, body)
		}
	}
	if n := b.accepted(); n != 1 {
		t.Errorf("%d backend connections for three spliced responses on one client connection, want 1", n)
	}
}

// getsOnOneConnection sends n requests for /a/x one after the other on
// one connection to addr, calling between(i) after response i (when not
// nil), and returns each response's status and body.
func getsOnOneConnection(t *testing.T, addr string, n int, between func(i int)) (status []int, bodies []string) {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i := range n {
		io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		status, bodies = append(status, resp.StatusCode), append(bodies, string(body))
		if between != nil {
			between(i)
		}
	}
	return status, bodies
}

// TestResponseInterimBounded: a backend that answered with 1xx responses
// only was relayed for as long as it sent them: the client never got a
// final response, and the proxy never stopped. After
// maxInterimResponses the client gets 502, and the backend's connection
// is closed.
func TestResponseInterimBounded(t *testing.T) {
	var sent atomic.Int32
	closed := make(chan struct{})
	b := scriptedBackend(t, func(c *net.TCPConn) {
		defer close(closed)
		if readHTTPRequestHead(bufio.NewReader(c)) != nil {
			return
		}
		for range 10000 {
			if _, err := io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"); err != nil {
				return
			}
			sent.Add(1)
		}
		io.Copy(io.Discard, c) // until the proxy closes
	})
	_, addr := testService(t, b)
	got := rawClient(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	r := bufio.NewReader(strings.NewReader(got))
	interim := 0
	for {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("after %d interim responses the client got %q...: %v", interim, got[:min(len(got), 200)], err)
		}
		if resp.StatusCode == http.StatusEarlyHints {
			interim++
			continue
		}
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("final status %d, want 502", resp.StatusCode)
		}
		break
	}
	// Those still in the send buffer when the proxy gives up are not
	// sent: interim responses are optional.
	if interim > maxInterimResponses {
		t.Errorf("the client got %d interim responses, want at most %d", interim, maxInterimResponses)
	}
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Errorf("the backend's connection is still open (%d interim responses sent)", sent.Load())
	}
}

// TestBodilessResponseNotChunked: a 304 may carry "Transfer-Encoding:
// chunked" (RFC 9112 6.1: the coding the body would have had) and has no
// body; http.Response.Write, relaying it, wrote a last chunk ("0\r\n\r\n")
// after its head, which the client, knowing a 304 has no body, read as
// the start of the next response on the connection. The same for a
// 204 with the field (which a server must not send). The head goes on
// alone, and the next response is the next request's.
func TestBodilessResponseNotChunked(t *testing.T) {
	for _, status := range []string{"304 Not Modified", "204 No Content"} {
		t.Run(status, func(t *testing.T) {
			b := scriptedBackend(t, func(c *net.TCPConn) {
				r := bufio.NewReader(c)
				for i := 0; ; i++ {
					if readHTTPRequestHead(r) != nil {
						return
					}
					if i == 0 {
						io.WriteString(c, "HTTP/1.1 "+status+"\r\nTransfer-Encoding: chunked\r\nETag: \"x\"\r\n\r\n")
					} else {
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
					}
				}
			})
			_, addr := testService(t, b)
			c, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(c)
			// What a client that knows these statuses have no body reads.
			if err := readHTTPRequestHead(r); err != nil {
				t.Fatal(err)
			}
			io.WriteString(c, "GET /a/y HTTP/1.1\r\nHost: t\r\n\r\n")
			resp, err := http.ReadResponse(r, nil)
			if err != nil {
				t.Fatalf("the response after the %s: %v", status, err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 || string(body) != "next" {
				t.Errorf("the response after the %s: %d %q, want 200 \"next\"", status, resp.StatusCode, body)
			}
		})
	}
}

// TestInterimResponseNoLength: an interim (1xx) response has no body,
// and a server must not send Content-Length in one (RFC 9110 8.6), but
// the proxy relayed a backend's 103 or 101 with the field. A client that
// frames every response by its Content-Length read that many bytes after
// the interim head as its body: the start of the final response, or of
// the protocol the connection switched to. The field is not relayed.
func TestInterimResponseNoLength(t *testing.T) {
	const key = "dGhlIHNhbXBsZSBub25jZQ=="
	for _, c := range []struct{ name, request, response string }{
		{"103", "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
			"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"},
		{"101", "GET /a/ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + "\r\n\r\n",
			"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				if readHTTPRequestHead(bufio.NewReader(conn)) != nil {
					return
				}
				io.WriteString(conn, c.response)
				conn.CloseWrite()
				io.Copy(io.Discard, conn)
			})
			_, addr := testService(t, b)
			got := rawClient(t, addr, c.request)
			interim, _, ok := strings.Cut(got, "\r\n\r\n")
			if !ok || !strings.HasPrefix(interim, "HTTP/1.1 1") {
				t.Fatalf("client got %q, want an interim response first", got)
			}
			if strings.Contains(strings.ToLower(interim), "content-length") {
				t.Errorf("the interim response went on with a Content-Length: %q", interim)
			}
		})
	}
}

// TestResponseSpaceBeforeColon: net/http reads "Content-Length : 2" as a
// field named "Content-Length " (go.dev/issue/34540), which frames
// nothing, so the proxy read a body the backend framed by its length (or
// chunked, "Transfer-Encoding : chunked") as ending at the connection's
// close: the client waited for as long as the backend kept the
// connection, then got a body with no length, chunk framing and all. A
// field name with white space before its colon is refused (502), as
// requests are.
func TestResponseSpaceBeforeColon(t *testing.T) {
	for _, c := range []struct{ name, response string }{
		{"length", "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				r := bufio.NewReader(conn)
				for readHTTPRequestHead(r) == nil { // keep-alive: framed, it waits for the next request
					io.WriteString(conn, c.response)
				}
			})
			_, addr := testService(t, b)
			start := time.Now()
			got := rawClient(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
			if !strings.HasPrefix(got, "HTTP/1.1 502 ") {
				t.Errorf("after %v the client got %q, want 502", time.Since(start).Round(time.Millisecond), got)
			}
		})
	}
}

// TestResponseTrailerFields: the trailer section of a chunked response
// went to the client as the backend sent it once the response announced
// any trailer, fields that must not be trailers included (RFC 9110
// 6.5.1): a Content-Length, a Transfer-Encoding, a Host, a Connection.
// A client that merges trailers into the header section (RFC 7230 4.1.2
// let it, for fields allowed there) read a length, a coding or a host
// the response's head never had. Those fields are dropped, from the
// trailer section and from the Trailer field that announces it; the
// others go on.
func TestResponseTrailerFields(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nTrailer: X-Checksum, Host\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"2\r\nok\r\n0\r\nX-Checksum: abc\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
		return true
	}
	_, addr := testService(t, b)
	got := rawClient(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
	if err != nil {
		t.Fatalf("client got %q: %v", got, err)
	}
	var announced []string
	for k := range resp.Trailer {
		announced = append(announced, k)
	}
	slices.Sort(announced)
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "ok" {
		t.Fatalf("body %q, %v; the client got %q", body, err, got)
	}
	if fmt.Sprint(announced) != "[X-Checksum]" {
		t.Errorf("trailer fields announced: %q, want [X-Checksum]", announced)
	}
	if len(resp.Trailer) != 1 || resp.Trailer.Get("X-Checksum") != "abc" {
		t.Errorf("trailer fields relayed: %q, want X-Checksum: abc only; the client got %q", resp.Trailer, got)
	}
}

// TestResponseCutShortWithoutLength: a response body without a length
// (one the backend ends by closing, or a chunked one relayed to an
// HTTP/1.0 client) ends at the close of the client's connection, so the
// close is all that tells the client the body is whole. When the backend
// failed mid-body (a reset, a chunked body cut short) the proxy closed
// the client's connection as after a whole body, and the client took
// the part it got for all of it (a cache kept it so). The client's
// connection is reset instead: it knows the body was cut.
func TestResponseCutShortWithoutLength(t *testing.T) {
	for _, c := range []struct{ name, request, head, part string }{
		{"until the close, reset", "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n", "HTTP/1.1 200 OK\r\n\r\n", "partial"},
		{"chunked to HTTP/1.0, cut", "GET /a/x HTTP/1.0\r\n\r\n", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "7\r\npartial\r\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				if readHTTPRequestHead(bufio.NewReader(conn)) != nil {
					return
				}
				io.WriteString(conn, c.head+c.part)
				time.Sleep(100 * time.Millisecond) // relayed by then
				if strings.HasSuffix(c.name, "reset") {
					conn.SetLinger(0)
				}
			})
			_, addr := testService(t, b)
			conn, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			io.WriteString(conn, c.request)
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			if err == nil {
				t.Errorf("the client read %q as the whole body; the backend sent part of it and failed", body)
			}
		})
	}
}
