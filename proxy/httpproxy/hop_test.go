package httpproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestHopByHop: hop-by-hop fields never reach the backend (request) nor
// the client (response), the fields Connection names included; end to end
// fields pass.
func TestHopByHop(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		if req.URL.Path != "/a/hop" {
			return false
		}
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\n"+
			"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nUpgrade: h2\r\nTrailer: X-T\r\nX-End: kept\r\n\r\nok")
		return true
	}
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /a/hop HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 300\r\n"+
		"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: websocket\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nX-End: kept\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	hopReq := []string{"Connection", "X-Secret", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Upgrade", "Proxy-Authorization"}
	head := b.seen()[0]
	got, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hopReq {
		if _, ok := got.Header[h]; ok {
			t.Errorf("the backend got %s:\n%s", h, head)
		}
	}
	if got.Header.Get("X-End") != "kept" || got.Header.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("end-to-end fields lost:\n%s", head)
	}
	if _, ok := got.Header["User-Agent"]; ok {
		t.Errorf("the proxy added a User-Agent:\n%s", head)
	}
	for _, h := range []string{"Connection", "X-Internal", "Keep-Alive", "Proxy-Authenticate", "Proxy-Connection", "Upgrade", "Trailer"} {
		if _, ok := resp.Header[h]; ok {
			t.Errorf("the client got %s: %v", h, resp.Header)
		}
	}
	if resp.Header.Get("X-End") != "kept" {
		t.Errorf("end-to-end response field lost: %v", resp.Header)
	}
	t.Logf("backend got:\n%sclient got: %v", head, resp.Header)
}

// TestUnderscoredLookalikes: a request's fields that read as a framing,
// routing or client-address field with "_" for "-" never reach the
// backend (a CGI-style backend takes them for the real ones), nor do the
// fields some backends route by instead of the path (X-Original-URL) or
// the Host (X-Forwarded-Host, Forwarded's host=); other fields with
// underscores pass.
func TestUnderscoredLookalikes(t *testing.T) {
	b := startBackend(t)
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent_Length: 40\r\nX_Forwarded_For: 10.9.9.9\r\n"+
		"x_real_ip: 10.9.9.9\r\nTRANSFER_ENCODING: chunked\r\nX_App_Token: kept\r\nX-Original-URL: /admin/\r\nx-rewrite-url: /admin/\r\n"+
		"X_Original_URL: /admin/\r\nX-Forwarded-Host: secret.example\r\nforwarded: for=10.9.9.9;host=secret.example\r\nX-Real-IP: 10.9.9.9\r\n\r\nok")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	head := b.seen()[0]
	got, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
	if err != nil {
		t.Fatal(err)
	}
	for k := range got.Header {
		if strings.Contains(k, "_") && !strings.EqualFold(k, "X_App_Token") || strings.Contains(k, "Url") ||
			k == "X-Forwarded-Host" || k == "Forwarded" || k == "X-Real-Ip" {
			t.Errorf("the backend got %s:\n%s", k, head)
		}
	}
	if got.Header.Get("X_App_Token") != "kept" || got.Header.Get("X-Forwarded-For") != "127.0.0.1" || got.ContentLength != 2 {
		t.Errorf("fields lost:\n%s", head)
	}
}

// TestClientSchemeFieldsDropped: a client's X-Forwarded-Proto,
// X-Forwarded-Port, X-Forwarded-Scheme and X-Forwarded-Ssl never reach
// the backend. The proxy speaks plain HTTP and sets none of them, so a
// backend that trusts the gateway as its proxy (Rack trusts every
// private address, and reads the scheme from them even without that)
// would take the client's word for a TLS connection it never had: it
// skips its redirect to https, marks its cookies Secure, and builds its
// absolute URLs (redirects a cache behind it keeps) with the client's
// scheme and port.
func TestClientSchemeFieldsDropped(t *testing.T) {
	b := startBackend(t)
	_, addr := testService(t, b)
	codes, _ := exchangeRaw(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nX-Forwarded-Proto: https\r\nx-forwarded-port: 443\r\n"+
		"X-Forwarded-Scheme: https\r\nX-Forwarded-Ssl: on\r\nX_Forwarded_Ssl: on\r\nX-Forwarded-Prototype: kept\r\n\r\n", 1)
	if len(codes) != 1 || codes[0] != 200 {
		t.Fatalf("statuses %v, want [200]", codes)
	}
	head := b.seen()[0]
	got, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Scheme", "X-Forwarded-Ssl", "X_forwarded_ssl"} {
		if v, ok := got.Header[k]; ok {
			t.Errorf("the backend got %s: %q:\n%s", k, v, head)
		}
	}
	if got.Header.Get("X-Forwarded-Prototype") != "kept" {
		t.Errorf("another field lost:\n%s", head)
	}
}

// TestForwardedChoice: http.forwarded says what tells the backend who the
// client is. With x-forwarded-for the client's own X-Forwarded-For goes
// on, the client's address after it (the entry the proxy vouches for is
// the last); with via or none the proxy sets no X-Forwarded-For, so a
// client's never reaches the backend: one that trusts the gateway as its
// proxy (nginx's set_real_ip_from with real_ip_header X-Forwarded-For,
// Rails' remote_ip) took it for the client's address, an allow-list
// address for the asking.
func TestForwardedChoice(t *testing.T) {
	for _, c := range []struct {
		forwarded, xff, via string
	}{
		{"x-forwarded-for", "10.1.1.1, 127.0.0.1", ""},
		{"via", "", "1.1 spliced"},
		{"none", "", ""},
	} {
		b := startBackend(t)
		_, addr := testServiceWith(t, b, "      forwarded: "+c.forwarded+"\n")
		codes, _ := exchangeRaw(t, addr, "GET /a/x HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.1.1.1\r\nx_forwarded_for: 10.1.1.2\r\n\r\n", 1)
		if len(codes) != 1 || codes[0] != 200 {
			t.Fatalf("%s: statuses %v, want [200]", c.forwarded, codes)
		}
		head := b.seen()[0]
		got, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
		if err != nil {
			t.Fatal(err)
		}
		if xff := strings.Join(got.Header.Values("X-Forwarded-For"), ", "); xff != c.xff {
			t.Errorf("forwarded: %s: the backend got X-Forwarded-For %q, want %q:\n%s", c.forwarded, xff, c.xff, head)
		}
		if via := got.Header.Get("Via"); via != c.via {
			t.Errorf("forwarded: %s: the backend got Via %q, want %q:\n%s", c.forwarded, via, c.via, head)
		}
		if _, ok := got.Header["X_forwarded_for"]; ok {
			t.Errorf("forwarded: %s: the backend got the underscored lookalike:\n%s", c.forwarded, head)
		}
	}
}

func TestSameUnderscored(t *testing.T) {
	for _, c := range []struct {
		name, field string
		want        bool
	}{
		{"X_Forwarded_For", "X-Forwarded-For", true},
		{"x_forwarded_for", "X-Forwarded-For", true},
		{"Content_length", "Content-Length", true},
		{"Content_Lengths", "Content-Length", false},
		{"X_Forwarded_Fox", "X-Forwarded-For", false},
		{"X@Forwarded-For", "X-Forwarded-For", false},
		{"X`Forwarded-For", "X-Forwarded-For", false}, // '`'|0x20 is '`', '@'|0x20 is '`': not letters
	} {
		if got := sameUnderscored(c.name, c.field); got != c.want {
			t.Errorf("sameUnderscored(%q, %q) = %v", c.name, c.field, got)
		}
	}
}

// TestInterimResponses: a 1xx before the response is relayed and does not
// take the place of the response (else every later response would answer
// the request before it).
func TestInterimResponses(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		if req.URL.Path != "/a/early" {
			return false
		}
		io.WriteString(w, "HTTP/1.1 103 Early Hints\r\nLink: </a/style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
		return true
	}
	_, addr := testService(t, b)
	// http.ReadResponse returns the 103 as a response of its own.
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /a/early HTTP/1.1\r\nHost: t\r\n\r\nGET /a/next HTTP/1.1\r\nHost: t\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	var got []string
	for range 3 {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		got = append(got, fmt.Sprintf("%d %s", resp.StatusCode, body))
	}
	want := `[103  200 early 200 backend saw GET /a/next body ""]`
	if fmt.Sprint(got) != want {
		t.Errorf("responses %q, want %s", got, want)
	}
}

// TestHTTP10KeepAlive: an HTTP/1.0 client that asks for keep-alive is
// told it got it (the backend's own Connection field is hop-by-hop and
// removed), and its next request is served on the same connection; one
// that does not ask is told the connection closes.
func TestHTTP10KeepAlive(t *testing.T) {
	b := startBackend(t)
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for i := range 2 {
		fmt.Fprint(c, "GET /a/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || resp.Header.Get("Connection") != "keep-alive" {
			t.Fatalf("request %d: %d, Connection %q", i, resp.StatusCode, resp.Header.Get("Connection"))
		}
	}
	fmt.Fprint(c, "GET /a/x HTTP/1.0\r\n\r\n")
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	if !resp.Close { // net/http removes the Connection: close it read
		t.Errorf("HTTP/1.0 without keep-alive: not told the connection closes (%v)", resp.Header)
	}
}

// TestExpectContinue: a client that asks "Expect: 100-continue" and
// waits for the 100 before it sends its body gets it from the proxy,
// which then relays the body (the backend gets no Expect: the proxy
// answered it). Before, the proxy read the body before it read anything
// from the backend, and such a client waited for its own timeout (curl:
// a second) on every upload.
func TestExpectContinue(t *testing.T) {
	b := startBackend(t)
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i, body := range []string{"hello", "again"} {
		fmt.Fprintf(c, "POST /a/up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-Continue\r\n\r\n", len(body))
		// A client waits a while for the 100, then sends anyway: if it
		// does not come in 5 s, it does not come.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("request %d: no 100 Continue: %v", i, err)
		}
		if resp.StatusCode != http.StatusContinue {
			t.Fatalf("request %d: %d before the body, want 100", i, resp.StatusCode)
		}
		io.WriteString(c, body)
		if resp, err = http.ReadResponse(r, nil); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		got, _ := io.ReadAll(resp.Body)
		if want := fmt.Sprintf("backend saw POST /a/up body %q", body); resp.StatusCode != 200 || string(got) != want {
			t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, got, want)
		}
	}
	for _, head := range b.seen() {
		if strings.Contains(strings.ToLower(head), "expect") {
			t.Errorf("the backend got the Expect the proxy answered:\n%s", head)
		}
	}
}

// TestResponseProxyVersion: the status line a client gets carries the
// proxy's HTTP version, not the backend's (RFC 9110 6.2: intermediaries
// send their own). An HTTP/1.0 backend's "HTTP/1.0 200 OK" was relayed
// as it was, without the Connection field (hop-by-hop): an HTTP/1.1
// client then had to close after every response (RFC 9112 9.3: HTTP/1.0
// persists only with keep-alive), while the proxy kept the connection
// and waited for a request; a backend's "HTTP/2.0" reached the client
// on an HTTP/1.1 connection. The client now gets HTTP/1.1, with
// "Connection: close" when the backend's connection ends with the
// response.
func TestResponseProxyVersion(t *testing.T) {
	for _, c := range []struct {
		name, resp string
		close      bool // the client is told to close, and is closed
	}{
		{"1.0 keep-alive", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi", false},
		{"1.0 close", "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", true},
		{"1.0 until the close", "HTTP/1.0 200 OK\r\n\r\nhi", true},
		{"2.0", "HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", false},
		{"interim", "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := scriptedBackend(t, func(cn *net.TCPConn) {
				r := bufio.NewReader(cn)
				for readHTTPRequestHead(r) == nil {
					io.WriteString(cn, c.resp)
					if c.close {
						return
					}
				}
			})
			_, addr := testService(t, b)
			cn, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer cn.Close()
			cn.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(cn)
			for i := range 2 {
				io.WriteString(cn, "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
				var lines []string
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						t.Fatalf("request %d: %v after %q", i, err, lines)
					}
					lines = append(lines, line)
					if line == "\r\n" && !strings.HasPrefix(lines[0], "HTTP/1.1 103 ") {
						break
					}
					if line == "\r\n" {
						lines = lines[:0]
					}
				}
				if lines[0] != "HTTP/1.1 200 OK\r\n" {
					t.Errorf("request %d: status line %q, want the proxy's HTTP/1.1", i, lines[0])
				}
				told := slices.Contains(lines, "Connection: close\r\n")
				if told != c.close {
					t.Errorf("request %d: told to close %v, want %v: %q", i, told, c.close, lines)
				}
				body, _ := io.ReadAll(io.LimitReader(r, 2))
				if string(body) != "hi" {
					t.Fatalf("request %d: body %q", i, body)
				}
				if c.close {
					if _, err := r.ReadByte(); err != io.EOF {
						t.Errorf("told to close, the connection went on: %v", err)
					}
					return
				}
			}
		})
	}
}

// TestHeadResponseWithoutLength: a response to HEAD without a
// Content-Length has no body to end at the close, and its connection
// stays open. Response.Write, which wrote it, added "Connection: close"
// (an HTTP/1.1 response without a length, it reasons, ends at the
// close): the client was told to close while the proxy kept the
// connection and waited for its next request; a client that pipelined
// one took it for unanswered and sent it again elsewhere while the
// proxy served it too.
func TestHeadResponseWithoutLength(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		if req.Method != http.MethodHead {
			return false
		}
		io.WriteString(w, "HTTP/1.1 200 OK\r\nX-Head: 1\r\n\r\n")
		return true
	}
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	io.WriteString(c, "HEAD /a/x HTTP/1.1\r\nHost: t\r\n\r\nGET /a/y HTTP/1.1\r\nHost: t\r\n\r\n")
	var head []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%v after %q", err, head)
		}
		if line == "\r\n" {
			break
		}
		head = append(head, line)
	}
	if slices.Contains(head, "Connection: close\r\n") || !slices.Contains(head, "X-Head: 1\r\n") {
		t.Errorf("response to HEAD: %q, want X-Head and no Connection: close (the connection stays)", head)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("the pipelined GET: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if string(body) != `backend saw GET /a/y body ""` {
		t.Errorf("the pipelined GET: %d %q", resp.StatusCode, body)
	}
}

// TestForwardedForLinkLocal: the X-Forwarded-For entry of a client that
// connected from its link-local address is that address without the
// gateway's interface, the zone its socket address carries here
// (fe80::1%d0): backends' parsers (nginx's realip) refuse a zone, and
// the name is the gateway's business. The client and the proxy's
// listener are in a scratch namespace with a link-local address; the
// backend is where the proxy dials it.
func TestForwardedForLinkLocal(t *testing.T) {
	ns := testnet.Scratch(t)
	for _, args := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"},
		{"ip", "link", "set", "d0", "up"},
		{"ip", "link", "set", "d1", "up"},
		{"ip", "-6", "addr", "add", "fe80::1/64", "dev", "d0", "nodad"},
	} {
		if out, err := ns.Run(args[0], args[1:]...); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	b := startBackend(t)
	p, _ := testService(t, b)
	ll := netip.MustParseAddrPort("[fe80::1%d0]:0")
	var ln *net.TCPListener
	if err := ns.Do(func() (err error) {
		ln, err = net.ListenTCP("tcp6", net.TCPAddrFromAddrPort(ll))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); ln.Close(); <-done })
	var c net.Conn
	if err := ns.Do(func() (err error) {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(ll)}
		c, err = d.Dial("tcp6", ln.Addr().String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	got, err := http.ReadRequest(bufio.NewReader(strings.NewReader(b.seen()[0])))
	if err != nil {
		t.Fatal(err)
	}
	if xff := got.Header.Get("X-Forwarded-For"); xff != "fe80::1" {
		t.Errorf("X-Forwarded-For %q, want fe80::1", xff)
	}
}
