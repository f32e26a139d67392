package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// fakeBackend is a lenient HTTP/1.1 server (net/http's parser, as a
// backend behind the proxy might be) that records every request head it
// reads, raw, and answers 200 with the target it saw. It reads a path the
// most generous way a backend might (percent-decoded, %2F and \ as
// slashes, ;parameters dropped, dot segments resolved), so a test can
// assert that a denied path never reached it under any reading.
type fakeBackend struct {
	ln     *net.TCPListener
	mu     sync.Mutex
	heads  []string // raw request heads, in order
	peers  map[string]bool
	active atomic.Int32
	// respond, if set, writes the response to a request instead.
	respond func(w io.Writer, req *http.Request) bool
}

func startBackend(t *testing.T) *fakeBackend {
	t.Helper()
	b := &fakeBackend{peers: map[string]bool{}}
	b.ln = acceptLoopback(t, func(c *net.TCPConn) {
		b.active.Add(1)
		b.mu.Lock()
		b.peers[c.RemoteAddr().String()] = true
		b.mu.Unlock()
		go b.serve(c)
	})
	return b
}

// scriptedBackend is a backend that does what serve does with each
// connection it accepts (closed after), byte by byte, on loopback until
// the test ends.
func scriptedBackend(t testing.TB, serve func(c *net.TCPConn)) *fakeBackend {
	t.Helper()
	return &fakeBackend{ln: acceptLoopback(t, func(c *net.TCPConn) {
		go func() {
			defer c.Close()
			serve(c)
		}()
	})}
}

// acceptLoopback listens on a loopback port until the test ends and
// hands each connection to accepted, on the accepting goroutine.
func acceptLoopback(t testing.TB, accepted func(c *net.TCPConn)) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			accepted(c)
		}
	}()
	return ln
}

// recorder keeps what the backend's parser consumed.
type recorder struct {
	r   io.Reader
	buf bytes.Buffer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.buf.Write(p[:n])
	return n, err
}

func (b *fakeBackend) serve(c net.Conn) {
	defer b.active.Add(-1)
	defer c.Close()
	rec := &recorder{r: c}
	br := bufio.NewReader(rec)
	start := 0 // where the next request begins in rec.buf
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		end := rec.buf.Len() - br.Buffered()
		head := string(rec.buf.Bytes()[start:end])
		b.mu.Lock()
		b.heads = append(b.heads, head)
		b.mu.Unlock()
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return
		}
		start = rec.buf.Len() - br.Buffered()
		if b.respond != nil && b.respond(c, req) {
			continue
		}
		msg := fmt.Sprintf("backend saw %s %s body %q", req.Method, req.RequestURI, body)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(msg), msg)
	}
}

// settle waits until the proxy has no flow left, closes its idle
// upstream connections, and waits until the backend has accepted and
// finished every connection the proxy made: the kernel's
// accept queue is FIFO, so once a connection made now is accepted, all
// earlier ones were.
func (b *fakeBackend) settle(t *testing.T, p *Proxy) {
	t.Helper()
	if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
		t.Fatalf("proxy flows still open: %d", p.Flows.Len())
	}
	// The idle upstream connections the flows left are closed: the
	// backend then finishes every connection.
	for _, pl := range p.pools {
		for _, be := range pl.backends {
			be.idle.prune(time.Now(), 0)
		}
	}
	c, err := net.Dial("tcp4", b.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	me := c.LocalAddr().String()
	err = poll(func() bool { b.mu.Lock(); defer b.mu.Unlock(); return b.peers[me] })
	c.Close()
	if err != nil {
		t.Fatal("the backend does not accept")
	}
	if err := poll(func() bool { return b.active.Load() == 0 }); err != nil {
		t.Fatalf("backend connections still open: %d", b.active.Load())
	}
}

func (b *fakeBackend) seen() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.heads...)
}

// leniently is the most generous reading of a request target.
func leniently(target string) string {
	if u, err := url.Parse(target); err == nil && u.Host != "" {
		target = u.RequestURI()
	}
	p, _, _ := strings.Cut(target, "?")
	if d, err := url.PathUnescape(p); err == nil {
		p = d
	}
	p = strings.ReplaceAll(p, "\\", "/")
	segs := strings.Split(p, "/")
	for i, s := range segs {
		segs[i], _, _ = strings.Cut(s, ";")
	}
	return path.Clean("/" + strings.Join(segs, "/"))
}

// forbidden reports a request head that reached a denied route under
// some reading: a path under /admin or the host secret.example.
func forbidden(head string) string {
	line, rest, _ := strings.Cut(head, "\r\n")
	f := strings.Fields(line)
	if len(f) == 3 && (leniently(f[1]) == "/admin" || strings.HasPrefix(leniently(f[1]), "/admin/")) {
		return "path " + f[1]
	}
	for _, l := range strings.Split(rest, "\r\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, "Host") &&
			strings.TrimSuffix(strings.ToLower(strings.TrimSpace(v)), ".") == "secret.example" {
			return "host " + v
		}
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, "Host") && atonHost(strings.TrimSpace(v)) == netip.AddrFrom4([4]byte{10, 9, 9, 9}) {
			return "host " + v
		}
	}
	return ""
}

// atonHost reads a Host as leniently as a backend might: an IPv6
// literal, unmapped, or an IPv4 address in any form inet_aton takes
// (1 to 4 parts, octal with a leading 0, hexadecimal with 0x), with a
// port and a trailing dot or not.
func atonHost(h string) netip.Addr {
	if strings.HasPrefix(h, "[") {
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return netip.Addr{}
		}
		a, _ := netip.ParseAddr(h[1:end])
		return a.Unmap()
	}
	if i := strings.LastIndexByte(h, ':'); i >= 0 {
		h = h[:i]
	}
	parts := strings.Split(strings.TrimSuffix(h, "."), ".")
	if len(parts) > 4 {
		return netip.Addr{}
	}
	var n []uint64
	for _, p := range parts {
		v, err := strconv.ParseUint(p, 0, 32) // base from the prefix: 0x, 0
		if err != nil {
			return netip.Addr{}
		}
		n = append(n, v)
	}
	var v uint64
	for i, x := range n[:len(n)-1] {
		if x > 255 {
			return netip.Addr{}
		}
		v |= x << (24 - 8*i)
	}
	last := n[len(n)-1]
	if last >= 1<<(32-8*(len(n)-1)) {
		return netip.Addr{}
	}
	v |= last
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// testService starts a proxy for routes to b on a loopback listener.
func testService(t testing.TB, b *fakeBackend) (*Proxy, string) {
	t.Helper()
	return testServiceWith(t, b, "")
}

// testServiceWith is testService with more keys of the http section
// (YAML lines indented by six spaces).
func testServiceWith(t testing.TB, b *fakeBackend, httpKeys string) (*Proxy, string) {
	t.Helper()
	return testServiceIdle(t, b, httpKeys, "5s")
}

// testServiceIdle is testServiceWith with an idle_timeout.
func testServiceIdle(t testing.TB, b *fakeBackend, httpKeys, idle string) (*Proxy, string) {
	t.Helper()
	return testServiceMode(t, b, httpKeys, idle, "never")
}

// testServiceMode is testServiceIdle with a splice mode.
func testServiceMode(t testing.TB, b *fakeBackend, httpKeys, idle, mode string) (*Proxy, string) {
	t.Helper()
	cfg, err := config.Parse("test", []byte(fmt.Sprintf(`
services:
  - name: web
    listen: 15080
    ports: ["80"]
    proxy: http
    splice:
      mode: %s
    idle_timeout: %s
    http:
%s      routes:
        - host: secret.example
          action: deny
        - host: 10.9.9.9
          action: deny
        - path: /admin/
          action: deny
        - path: /a/
          backends: ["%s"]
`, mode, idle, httpKeys, b.ln.Addr())))
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Base: proxy.Base{Service: &cfg.Services[0], Flows: proxy.NewFlowTable(100)}}
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); ln.Close(); <-done; p.CloseFlows() })
	return p, ln.Addr().String()
}

// exchangeRaw sends raw bytes on a new connection and reads n responses
// (fewer if the proxy closes), then closes its side and reads anything
// more as one extra response (status -1 if it does not parse). It
// returns the status codes and bodies.
func exchangeRaw(t *testing.T, addr, raw string, n int) (codes []int, bodies []string) {
	t.Helper()
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := conn.(*net.TCPConn)
	defer c.Close()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for range n {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			return codes, bodies
		}
		b, _ := io.ReadAll(resp.Body)
		codes = append(codes, resp.StatusCode)
		bodies = append(bodies, string(b))
	}
	c.CloseWrite()
	if rest, _ := io.ReadAll(r); len(rest) > 0 {
		code := -1
		if resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(rest)), nil); err == nil {
			code = resp.StatusCode
		}
		codes = append(codes, code)
		bodies = append(bodies, string(rest))
	}
	return codes, bodies
}

func firstLines(heads []string) []string {
	var out []string
	for _, h := range heads {
		l, _, _ := strings.Cut(h, "\r\n")
		out = append(out, l)
	}
	return out
}

func poll(cond func() bool) error {
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}
