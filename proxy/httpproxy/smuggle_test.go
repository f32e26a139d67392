package httpproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"spliced/proxy"
)

// smuggleCases are raw requests: the status codes the client must get,
// in order, and a path the backend must have been asked for (if any).
var smuggleCases = []struct {
	name, raw string
	want      []int
	backend   string // a request line the backend must have seen
}{
	// The baseline.
	{"plain", "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{200}, "GET /a/x HTTP/1.1"},
	{"pipelined allowed then denied", "GET /a/x HTTP/1.1\r\nHost: t\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{200, 403}, "GET /a/x HTTP/1.1"},
	{"leading CRLF skipped", "\r\nGET /a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{200}, "GET /a/x HTTP/1.1"},

	// Path tricks against a deny route: each is /admin/x to some server.
	{"denied", "GET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"denied without trailing slash", "GET /admin HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"dot-dot segment", "GET /x/../admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"dot-dot from an allowed route", "GET /a/../admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"dot segment", "GET /./admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"double slash", "GET //admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"above the root", "GET /../../admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"encoded unreserved", "GET /%61dmin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"encoded dots", "GET /a/%2e%2E/admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"encoded slash", "GET /a/..%2Fadmin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"encoded slash lower case", "GET /a/..%2fadmin%2fx HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"backslash", "GET /a\\..\\admin\\x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"encoded backslash", "GET /a/..%5Cadmin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"path parameter dot-dot", "GET /a/..;/admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	// Tomcat's order (encodedSolidusHandling=decode): ;parameters go
	// from each raw segment first (here ";%2F..%2Fa"), then %2F is a
	// slash: /a/../admin/x. Decoded first, the path is /a/x.
	{"path parameter hiding encoded slashes", "GET /a/..%2Fadmin;%2F..%2Fa/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	// nginx decodes %2F to a slash but %5C to a backslash, no slash on
	// Unix: /a/../admin/y\..\..\a is /admin/y\..\..\a to it; both as
	// slashes, the path is /a.
	{"encoded slash, encoded backslashes undoing it", "GET /a/..%2Fadmin/y%5C..%5C..%5Ca HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"path parameter on the denied segment", "GET /admin;x=1/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"encoded NUL", "GET /a/%00/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"bad escape", "GET /a/%zz HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"fragment", "GET /a/x#/../../admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"absolute-form denied", "GET http://t/admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"absolute-form dot-dot", "GET http://t/a/../admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"absolute-form host wins", "GET http://t/a/x HTTP/1.1\r\nHost: secret.example\r\n\r\n", []int{200}, "GET /a/x HTTP/1.1"},
	{"absolute-form denied host", "GET http://secret.example/a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{403}, ""},
	{"absolute-form with user info", "GET http://t@secret.example/a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"absolute-form other scheme", "GET ftp://t/a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"denied host trailing dot", "GET /a/x HTTP/1.1\r\nHost: secret.example.\r\n\r\n", []int{403}, ""},
	// Every spelling of a denied IPv4 host (10.9.9.9) is denied or
	// refused: a backend's inet_aton reads them all as the address.
	{"denied IPv4 host", "GET /a/x HTTP/1.1\r\nHost: 10.9.9.9\r\n\r\n", []int{403}, ""},
	{"denied IPv4 host with port and dot", "GET /a/x HTTP/1.1\r\nHost: 10.9.9.9.:80\r\n\r\n", []int{403}, ""},
	{"denied IPv4 host mapped in IPv6", "GET /a/x HTTP/1.1\r\nHost: [::ffff:10.9.9.9]\r\n\r\n", []int{403}, ""},
	{"denied IPv4 host mapped in IPv6, hex", "GET /a/x HTTP/1.1\r\nHost: [::FFFF:a09:909]:80\r\n\r\n", []int{403}, ""},
	{"denied IPv4 host in octal", "GET /a/x HTTP/1.1\r\nHost: 012.9.9.9\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host with leading zeros", "GET /a/x HTTP/1.1\r\nHost: 10.09.009.9\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host in hex", "GET /a/x HTTP/1.1\r\nHost: 0xa.9.9.0X9\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host in three parts", "GET /a/x HTTP/1.1\r\nHost: 10.9.2313\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host as one number", "GET /a/x HTTP/1.1\r\nHost: 168364297:80\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host absolute-form in hex", "GET http://0x0a090909/a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host in brackets, three parts", "GET /a/x HTTP/1.1\r\nHost: [10.9.2313]\r\n\r\n", []int{400}, ""},
	{"denied IPv4 host in brackets", "GET /a/x HTTP/1.1\r\nHost: [10.9.9.9]:80\r\n\r\n", []int{400}, ""},
	{"empty brackets", "GET /a/x HTTP/1.1\r\nHost: []\r\n\r\n", []int{400}, ""},
	{"another IPv4 host", "GET /a/x HTTP/1.1\r\nHost: 10.9.9.10\r\n\r\n", []int{200}, "GET /a/x HTTP/1.1"},
	{"name with a numeric label", "GET /a/x HTTP/1.1\r\nHost: 10.9.9.9.example\r\n\r\n", []int{200}, "GET /a/x HTTP/1.1"},
	{"host with an empty label", "GET /a/x HTTP/1.1\r\nHost: secret..example\r\n\r\n", []int{400}, ""},
	{"denied host upper case and port", "GET /a/x HTTP/1.1\r\nHost: SECRET.example:80\r\n\r\n", []int{403}, ""},
	{"normalised path is forwarded", "GET /a/b/../%7ex/./y?q=/../admin HTTP/1.1\r\nHost: t\r\n\r\n", []int{200}, "GET /a/~x/y?q=/../admin HTTP/1.1"},
	{"raw non-ASCII is encoded", "GET /a/\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n", []int{200}, "GET /a/%C3%A9 HTTP/1.1"},
	{"encoded slash within a route", "GET /a/group%2fproject HTTP/1.1\r\nHost: t\r\n\r\n", []int{200}, "GET /a/group%2Fproject HTTP/1.1"},

	// Framing: Content-Length and Transfer-Encoding.
	{"CL.TE", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"TE.CL", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n2c\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"repeated equal Content-Length", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", []int{400}, ""},
	{"differing Content-Length", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello", []int{400}, ""},
	{"Content-Length list", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello", []int{400}, ""},
	{"Content-Length sign", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello", []int{400}, ""},
	{"Content-Length padded", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length:  5\r\n\r\nhello", []int{400}, ""},
	{"Content-Length body", "POST /a/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello", []int{200}, "POST /a/x HTTP/1.1"},
	{"TE chunked, identity", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE identity", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n", []int{400}, ""},
	{"TE xchunked", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE two spaces", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE tab", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE trailing space", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE space before colon", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE twice", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"TE in HTTP/1.0", "POST /a/x HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"TE upper case", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n", []int{200}, "POST /a/x HTTP/1.1"},
	{"chunked with extension and trailer, then pipelined", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /a/y HTTP/1.1\r\nHost: t\r\n\r\n", []int{200, 200}, "GET /a/y HTTP/1.1"},

	// Field and line syntax.
	{"obs-fold", "GET /a/x HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n", []int{400}, ""},
	{"obs-fold TE", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", []int{400}, ""},
	{"bare LF everywhere", "GET /a/x HTTP/1.1\nHost: t\n\n", []int{400}, ""},
	{"bare LF in a field", "GET /a/x HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", []int{400}, ""},
	{"bare CR", "GET /a/x HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", []int{400}, ""},
	{"NUL in a value", "GET /a/x HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", []int{400}, ""},
	{"no Host in HTTP/1.1", "GET /a/x HTTP/1.1\r\n\r\n", []int{400}, ""},
	{"two Hosts", "GET /a/x HTTP/1.1\r\nHost: t\r\nHost: secret.example\r\n\r\n", []int{400}, ""},
	{"Host with a path", "GET /a/x HTTP/1.1\r\nHost: t/admin\r\n\r\n", []int{400}, ""},
	{"double space in request line", "GET  /a/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"HTTP/2.0 on a 1.x line", "GET /a/x HTTP/2.0\r\nHost: t\r\n\r\n", []int{505}, ""},
	{"HTTP/1.2", "GET /a/x HTTP/1.2\r\nHost: t\r\n\r\n", []int{505}, ""},
	{"CONNECT", "CONNECT secret.example:443 HTTP/1.1\r\nHost: secret.example:443\r\n\r\n", []int{405}, ""},
	{"head too large", "GET /a/x HTTP/1.1\r\nHost: t\r\nX: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", []int{431}, ""},

	// Chunk sizes. The head goes to the backend before the body is
	// read; a bad chunk gets 400 and both connections close, so what
	// follows never reaches the backend as a request.
	{"chunk size 0x", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", []int{400}, ""},
	{"chunk size negative", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n", []int{400}, ""},
	{"chunk size too long", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", []int{400}, ""},
	{"chunk size trailing space", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{400}, ""},
	{"chunk size bare LF", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", []int{400}, ""},
	{"chunk data overlong", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", []int{400}, ""},
	{"chunk trailer obs-fold", "POST /a/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n y\r\n\r\n", []int{400}, ""},

	// Upgrades: only a 101 makes a tunnel. The backend answers 200 here,
	// so the bytes after the request are the next request, routed.
	{"upgrade refused, then smuggled", "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{200, 403}, "GET /a/x HTTP/1.1"},
	{"h2c upgrade not passed", "GET /a/x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n", []int{200, 403}, "GET /a/x HTTP/1.1"},
}

// TestSmuggling sends each raw request through the proxy to a lenient
// backend: the client gets the expected statuses, the backend saw the
// expected request line, and no request head the backend read reaches
// /admin or secret.example under any reading.
func TestSmuggling(t *testing.T) {
	b := startBackend(t)
	p, addr := testService(t, b)
	for _, c := range smuggleCases {
		t.Run(c.name, func(t *testing.T) {
			before := len(b.seen())
			codes, bodies := exchangeRaw(t, addr, c.raw, len(c.want))
			if fmt.Sprint(codes) != fmt.Sprint(c.want) {
				t.Errorf("statuses %v, want %v (bodies %q)", codes, c.want, bodies)
			}
			b.settle(t, p)
			seen := b.seen()[before:]
			found := c.backend == ""
			for _, h := range seen {
				if why := forbidden(h); why != "" {
					t.Errorf("the backend was asked for a denied route (%s):\n%s", why, h)
				}
				if c.backend != "" && strings.HasPrefix(h, c.backend+"\r\n") {
					found = true
				}
			}
			if !found {
				t.Errorf("the backend never saw %q; it saw %q", c.backend, seen)
			}
			t.Logf("%v %q %q", codes, firstLines(seen), bodies)
		})
	}
}

// pumpSplicer stands in for the gateway's engine: it forwards what the
// backend sends to the client unseen, counting it in the flow's S2C as
// the engine's statistics do, for a while, then unsplices (hands the
// sockets back).
type pumpSplicer struct{ p *Proxy }

func (s *pumpSplicer) Splice(_ context.Context, f *proxy.Flow, client, up *net.TCPConn) error {
	s.p.Go(func() {
		buf := make([]byte, 64<<10)
		up.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		for {
			n, err := up.Read(buf)
			if n > 0 {
				client.Write(buf[:n])
				f.S2C.Add(int64(n))
			}
			if err != nil {
				break
			}
		}
		up.SetReadDeadline(time.Time{})
		f.Resume(client, up)
	})
	return nil
}

// TestSplicedResponseOverrun: a backend that, while its response is
// spliced, sends more than the response's Content-Length gets those
// bytes to the client unseen, where they answer the client's next
// request. Once the flow is back (S2C past the response's end), the
// proxy must not relay another response on the connection: each would
// answer the request after the one it belongs to, and the answer to a
// request routed to another backend would come from this one.
func TestSplicedResponseOverrun(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		if req.URL.Path != "/a/1" {
			return false
		}
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
		time.Sleep(50 * time.Millisecond) // after the splice
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake")
		return true
	}
	p, addr := testServiceMode(t, b, "      splice_min: 1\n      splice_policy: always\n", "5s", "immediate")
	p.SetSplicer(&pumpSplicer{p: p})
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	read := func() (string, error) {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			return "", err
		}
		body, err := io.ReadAll(resp.Body)
		return string(body), err
	}
	io.WriteString(conn, "GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n")
	if body, err := read(); body != "hello" {
		t.Fatalf("first response %q, %v", body, err)
	}
	time.Sleep(500 * time.Millisecond) // the flow is back with the proxy
	io.WriteString(conn, "GET /a/2 HTTP/1.1\r\nHost: x\r\n\r\n")
	// What the backend sent unasked comes first: the proxy cannot take
	// it back.
	if body, err := read(); body != "fake" {
		t.Fatalf("second response %q, %v", body, err)
	}
	if body, err := read(); err == nil {
		t.Errorf("after the backend overran a spliced response, the proxy relayed %q as the answer to the next request", body)
	}
}

// TestSplicedResponseReadAhead: bytes a backend sent past a spliced
// response's end that the proxy had read already (with the head, into
// its upstream reader) were neither relayed nor seen: the splice took
// the response's length from the reader and the rest from the socket,
// and the reader was dropped when the flow came back, with the backend
// connection kept for the client's next request. A backend that sent
// the head of a second, unasked response that way, and its body only
// later, had that body read as the answer to the next request: here a
// forged response, and every later answer one request late. The
// response is relayed instead, so the extra bytes are seen and the
// connection is not used again.
func TestSplicedResponseReadAhead(t *testing.T) {
	forged := "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
	var conns atomic.Int32
	b := scriptedBackend(t, func(c *net.TCPConn) {
		first := conns.Add(1) == 1
		r := bufio.NewReader(c)
		for i := 0; readHTTPRequestHead(r) == nil; i++ {
			if first && i == 0 {
				// The response, and the head of one nobody asked for,
				// in one write: the proxy reads them together.
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", len(forged))
				continue
			}
			if first && i == 1 {
				io.WriteString(c, forged) // the unasked response's body
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nright")
		}
	})
	p, addr := testServiceMode(t, b, "      splice_min: 1\n      splice_policy: always\n", "5s", "immediate")
	p.SetSplicer(&pumpSplicer{p: p})
	_, bodies := getsOnOneConnection(t, addr, 3, nil)
	if want := []string{"hello", "right", "right"}; !slices.Equal(bodies, want) {
		t.Errorf("bodies %q, want %q", bodies, want)
	}
}
