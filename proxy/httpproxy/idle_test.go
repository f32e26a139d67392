package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// accepted is how many connections b accepted.
func (b *fakeBackend) accepted() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.peers)
}

// backendStats returns the counters of the /a/ route's backend.
func backendStats(t *testing.T, p *Proxy) BackendStats {
	t.Helper()
	for _, s := range p.Stats() {
		if s.Route == "/a/" && s.Backend != "" {
			return s
		}
	}
	t.Fatal("no stats for the /a/ backend")
	return BackendStats{}
}

// oneRequest sends raw on a new client connection and returns the
// response's status and body.
func oneRequest(t *testing.T, addr, raw string) (int, string) {
	t.Helper()
	codes, bodies := exchangeRaw(t, addr, raw, 1)
	if len(codes) != 1 {
		t.Fatalf("%q: %d responses %q, want 1", raw, len(codes), bodies)
	}
	return codes[0], bodies[0]
}

// TestUpstreamReuse: clients that send one request per connection
// (Connection: close, or HTTP/1.0) share one upstream connection, which
// the backend is never told to close; with upstream_keepalive 0 each
// client connection has its own and the close is passed on.
func TestUpstreamReuse(t *testing.T) {
	for _, c := range []struct {
		name, keys      string
		dialed, reused  uint64
		closeAtBackend  bool
		idleAfter       int
		backendAccepted int
	}{
		{name: "default", dialed: 1, reused: 9, idleAfter: 1, backendAccepted: 1},
		{name: "keepalive off", keys: "      upstream_keepalive: 0\n", dialed: 10, closeAtBackend: true, backendAccepted: 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := startBackend(t)
			p, addr := testServiceWith(t, b, c.keys)
			for i := range 10 {
				raw := fmt.Sprintf("GET /a/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", i)
				if i%2 == 1 {
					raw = fmt.Sprintf("GET /a/%d HTTP/1.0\r\n\r\n", i)
				}
				code, body := oneRequest(t, addr, raw)
				if want := fmt.Sprintf("backend saw GET /a/%d body \"\"", i); code != 200 || body != want {
					t.Fatalf("request %d: %d %q, want 200 %q", i, code, body, want)
				}
				// The proxy gives the upstream connection back after the
				// response went out: a client that comes sooner gets
				// another one, which this test does not count.
				if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
					t.Fatal("flows still open")
				}
			}
			st := backendStats(t, p)
			if st.Dialed != c.dialed || st.Reused != c.reused || st.Idle != c.idleAfter || st.Active != 0 || st.Retries != 0 {
				t.Errorf("stats %+v, want dialed %d, reused %d, idle %d, none active, no retry", st, c.dialed, c.reused, c.idleAfter)
			}
			if n := b.accepted(); n != c.backendAccepted {
				t.Errorf("the backend accepted %d connections, want %d", n, c.backendAccepted)
			}
			for _, h := range b.seen() {
				if got := strings.Contains(strings.ToLower(h), "connection: close"); got != c.closeAtBackend {
					t.Errorf("request head at the backend says Connection: close %v, want %v:\n%s", got, c.closeAtBackend, h)
				}
			}
		})
	}
}

// TestUpstreamNotReused: an upstream connection goes back to the idle
// ones only when it can serve another client: not when the backend said
// it closes, not after a response the client did not take whole, and not
// once idle for upstream_idle_timeout.
func TestUpstreamNotReused(t *testing.T) {
	t.Run("backend closes", func(t *testing.T) {
		b := startBackend(t)
		b.respond = func(w io.Writer, req *http.Request) bool {
			fmt.Fprint(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
			w.(net.Conn).Close()
			return true
		}
		p, addr := testService(t, b)
		for range 3 {
			if code, body := oneRequest(t, addr, "GET /a/ HTTP/1.1\r\nHost: x\r\n\r\n"); code != 200 || body != "ok" {
				t.Fatalf("%d %q", code, body)
			}
		}
		if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
			t.Fatal("flows still open")
		}
		if st := backendStats(t, p); st.Dialed != 3 || st.Reused != 0 || st.Idle != 0 {
			t.Errorf("stats %+v, want 3 dialed, none reused or idle", st)
		}
	})
	t.Run("client leaves mid-response", func(t *testing.T) {
		b := startBackend(t)
		big := strings.Repeat("x", 64<<20) // more than the socket buffers hold
		b.respond = func(w io.Writer, req *http.Request) bool {
			fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
			return true
		}
		p, addr := testService(t, b)
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(c, "GET /a/ HTTP/1.1\r\nHost: x\r\n\r\n")
		if _, err := io.ReadFull(c, make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
			t.Fatal("flows still open")
		}
		if st := backendStats(t, p); st.Idle != 0 {
			t.Errorf("stats %+v: an upstream connection with a response half relayed was kept", st)
		}
	})
	t.Run("idle timeout", func(t *testing.T) {
		b := startBackend(t)
		p, addr := testServiceWith(t, b, "      upstream_idle_timeout: 20ms\n")
		oneRequest(t, addr, "GET /a/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		// The idle connection is closed after 20 ms (by the janitor, or
		// found expired when taken): well before 200 ms.
		time.Sleep(200 * time.Millisecond)
		if code, _ := oneRequest(t, addr, "GET /a/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); code != 200 {
			t.Fatalf("status %d", code)
		}
		if st := backendStats(t, p); st.Dialed != 2 || st.Reused != 0 {
			t.Errorf("stats %+v, want 2 dialed, none reused", st)
		}
	})
}

// TestUpstreamClosedWhileIdle: a backend that closes its connection after
// each response without saying so costs nothing but a new connection:
// the proxy sees the close before it uses the idle connection, or, when
// the close comes too late for that, sends the request again.
func TestUpstreamClosedWhileIdle(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(req.URL.Path), req.URL.Path)
		w.(net.Conn).Close()
		return true
	}
	p, addr := testService(t, b)
	for i := range 20 {
		path := fmt.Sprintf("/a/%d", i)
		if code, body := oneRequest(t, addr, "GET "+path+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); code != 200 || body != path {
			t.Fatalf("request %d: %d %q", i, code, body)
		}
	}
	if st := backendStats(t, p); st.Dialed != 20 || st.Failures != 0 {
		t.Errorf("stats %+v, want 20 dialed, no failure", st)
	}
}

// TestUpstreamRetry: when the backend closes a used connection just as a
// request goes out on it (after the proxy checked it), a GET is sent
// again on a new connection and answered; a POST with a body is not sent
// again (it may have been acted on) and gets 502.
func TestUpstreamRetry(t *testing.T) {
	b := startBackend(t)
	var mu sync.Mutex
	served := map[io.Writer]int{}
	b.respond = func(w io.Writer, req *http.Request) bool {
		mu.Lock()
		served[w]++
		n := served[w]
		mu.Unlock()
		if n > 1 {
			// The request was read, and the connection closes unanswered:
			// what a backend closing an idle connection at that moment does.
			w.(net.Conn).Close()
			return true
		}
		body, _ := io.ReadAll(req.Body)
		msg := req.Method + " " + req.URL.Path + " " + string(body)
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(msg), msg)
		return true
	}
	p, addr := testService(t, b)
	get := "GET /a/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
	for _, name := range []string{"first", "second"} {
		if code, body := oneRequest(t, addr, fmt.Sprintf(get, name)); code != 200 || body != "GET /a/"+name+" " {
			t.Fatalf("%s GET: %d %q", name, code, body)
		}
		// Its upstream connection is given back before the next.
		if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
			t.Fatal("flows still open")
		}
	}
	if st := backendStats(t, p); st.Retries != 1 || st.Dialed != 2 || st.Reused != 1 {
		t.Errorf("after the GETs: stats %+v, want 1 retry, 2 dialed, 1 reused", st)
	}
	code, _ := oneRequest(t, addr, "POST /a/p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndata")
	if code != http.StatusBadGateway {
		t.Errorf("POST on a connection closed under it: status %d, want 502", code)
	}
	if st := backendStats(t, p); st.Retries != 1 {
		t.Errorf("after the POST: stats %+v, want still 1 retry", st)
	}
	posts := 0
	for _, l := range firstLines(b.seen()) {
		if strings.HasPrefix(l, "POST") {
			posts++
		}
	}
	if posts != 1 {
		t.Errorf("the backend read the POST %d times, want once", posts)
	}
}

// TestUpstreamClosedOnStop: when the proxy stops serving (a stop, or a
// reload that replaces it), its idle upstream connections close, and one
// a flow still open gives back later is closed too.
func TestUpstreamClosedOnStop(t *testing.T) {
	b := startBackend(t)
	p, _ := testService(t, b) // its configuration, for a proxy this test stops
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	p2 := &Proxy{Base: proxy.Base{Service: p.Service, Flows: proxy.NewFlowTable(10)}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p2.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); ln.Close(); <-done; p2.CloseFlows() }()
	// A flow that stays open over the stop, holding an upstream
	// connection it will give back, and one that leaves its upstream
	// connection idle.
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	fmt.Fprint(c, "GET /a/open HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, err := http.ReadResponse(r, nil); err != nil || resp.StatusCode != 200 {
		t.Fatal(resp, err)
	} else {
		io.ReadAll(io.LimitReader(resp.Body, resp.ContentLength))
	}
	oneRequest(t, ln.Addr().String(), "GET /a/idle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	if err := poll(func() bool { return p2.Flows.Len() == 1 && b.active.Load() == 2 }); err != nil {
		t.Fatalf("backend connections open: %d, want 2", b.active.Load())
	}
	cancel()
	ln.Close()
	<-done
	if err := poll(func() bool { return b.active.Load() == 1 }); err != nil {
		t.Fatalf("after the stop: backend connections open %d, want 1 (the open flow's)", b.active.Load())
	}
	fmt.Fprint(c, "GET /a/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	if resp, err := http.ReadResponse(r, nil); err != nil || resp.StatusCode != 200 {
		t.Fatal(resp, err)
	}
	if err := poll(func() bool { return b.active.Load() == 0 }); err != nil {
		t.Fatalf("after the last flow: backend connections open %d, want 0", b.active.Load())
	}
}

// TestClientIdleTimeout: a client connection idle between requests for
// idle_timeout is closed, not sooner than deadlineSlack before it; a
// client that keeps asking keeps its connection past it, and a body that
// takes longer than it to come is not cut (the deadline moves only now
// and then, and with each read of a body).
func TestClientIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	b := startBackend(t)
	_, addr := testServiceIdle(t, b, "", idle.String())
	dial := func() (*net.TCPConn, *bufio.Reader) {
		conn, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		return conn.(*net.TCPConn), bufio.NewReader(conn)
	}
	expect := func(r *bufio.Reader, want string) {
		t.Helper()
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(body) != want {
			t.Fatalf("%d %q, want 200 %q", resp.StatusCode, body, want)
		}
	}

	t.Run("idle between requests", func(t *testing.T) {
		c, r := dial()
		io.WriteString(c, "GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n")
		expect(r, `backend saw GET /a/1 body ""`)
		start := time.Now()
		if n, err := r.ReadByte(); err != io.EOF {
			t.Fatalf("read %q, %v; want the proxy's close (EOF)", n, err)
		}
		if waited := time.Since(start); waited < idle-min(deadlineSlack, idle/16) {
			t.Errorf("closed after %v idle, idle_timeout is %v", waited, idle)
		}
	})
	t.Run("asking across the timeout", func(t *testing.T) {
		c, r := dial()
		start := time.Now()
		for i := 0; time.Since(start) < 3*idle; i++ {
			fmt.Fprintf(c, "GET /a/%d HTTP/1.1\r\nHost: x\r\n\r\n", i)
			expect(r, fmt.Sprintf(`backend saw GET /a/%d body ""`, i))
			time.Sleep(idle / 4)
		}
	})
	t.Run("slow body", func(t *testing.T) {
		c, r := dial()
		io.WriteString(c, "GET /a/0 HTTP/1.1\r\nHost: x\r\n\r\n") // the deadline is set
		expect(r, `backend saw GET /a/0 body ""`)
		io.WriteString(c, "POST /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
		for _, s := range []string{"s", "l", "o", "w"} {
			time.Sleep(idle / 2)
			io.WriteString(c, s)
		}
		expect(r, `backend saw POST /a/1 body "slow"`)
	})
}

// clearingSplicer fails every splice after clearing the client's read
// deadline, as the gateway's drain leaves it.
type clearingSplicer struct {
	calls atomic.Int32
	tried chan struct{} // one per call, buffered
}

func (s *clearingSplicer) Splice(_ context.Context, _ *proxy.Flow, client, _ *net.TCPConn) error {
	s.calls.Add(1)
	client.SetReadDeadline(time.Time{})
	s.tried <- struct{}{}
	return errors.New("no splice in this test")
}

// TestIdleTimeoutAfterFailedSplice: a response whose splice failed is
// relayed, and the connection still times out idle afterwards (the
// splice attempt cleared the deadline the proxy had set).
func TestIdleTimeoutAfterFailedSplice(t *testing.T) {
	const idle = 300 * time.Millisecond
	b := startBackend(t)
	p, addr := testServiceMode(t, b, "      splice_min: 1\n      splice_policy: always\n", idle.String(), "immediate")
	sp := &clearingSplicer{tried: make(chan struct{}, 4)}
	p.SetSplicer(sp)
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	io.WriteString(conn, "GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if want := `backend saw GET /a/1 body ""`; resp.StatusCode != 200 || string(body) != want {
		t.Fatalf("%d %q, want 200 %q", resp.StatusCode, body, want)
	}
	// The whole body may reach the client before the proxy tries the
	// splice (a small body goes out with the head).
	select {
	case <-sp.tried:
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy never tried to splice the response")
	}
	if n, err := r.ReadByte(); err != io.EOF {
		t.Fatalf("read %q, %v; want the proxy's close after idle_timeout (EOF)", n, err)
	}
	if n := sp.calls.Load(); n != 1 {
		t.Fatalf("%d splices tried, want 1", n)
	}
}

// TestStalledBodyTimesOut: a client that sends a request head with a
// body and then nothing more (or stops halfway through the body) holds
// its connection, and one to the backend, only for idle_timeout, as
// idle_timeout promises ("nothing moved either way for this long"):
// before, the deadline was lifted for the body and nothing ended the
// wait but the client.
func TestStalledBodyTimesOut(t *testing.T) {
	const idle = 300 * time.Millisecond
	b := startBackend(t)
	_, addr := testServiceIdle(t, b, "", idle.String())
	for _, c := range []struct{ name, raw string }{
		{"length", "POST /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"},
		{"chunked", "POST /a/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"},
		// An upgrade request is no tunnel until its 101: its body is
		// a body like any (before, the deadline lifted for the tunnel
		// to come let it stall for ever).
		{"upgrade", "POST /a/1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 10\r\n\r\nab"},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			io.WriteString(conn, c.raw)
			start := time.Now()
			conn.SetReadDeadline(start.Add(5 * time.Second))
			_, err = io.ReadAll(conn)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the proxy still holds a stalled body after %v (idle_timeout %v)", time.Since(start).Round(time.Millisecond), idle)
			}
		})
	}
}

// TestStalledReaderTimesOut: a client that asks for a large response and
// never reads it holds its connection only for idle_timeout: the proxy's
// write to it waits that long at most, as its reads do.
func TestStalledReaderTimesOut(t *testing.T) {
	const idle = 300 * time.Millisecond
	b := startBackend(t)
	body := strings.Repeat("x", 32<<20)
	b.respond = func(w io.Writer, req *http.Request) bool {
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		return true
	}
	p, addr := testServiceIdle(t, b, "", idle.String())
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n")
	// The client reads nothing: the proxy's write fills the sockets'
	// buffers and waits.
	if err := poll(func() bool { return p.Flows.Len() == 0 }); err != nil {
		t.Fatalf("the proxy still holds a client that reads nothing after 5s (idle_timeout %v)", idle)
	}
}

// TestUpstreamTimeout: a backend that stops answering or reading holds a
// client's connection for http.upstream_timeout, not for ever. Before
// any of the response the client gets a 504; in the middle of a body its
// connection ends.
func TestUpstreamTimeout(t *testing.T) {
	const keys = "      upstream_timeout: 300ms\n"
	// hang holds a backend's connection without a word until the test
	// ends.
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })
	// readAll reads what the proxy sends the client; a read that times
	// out means the proxy still waits for the backend.
	readAll := func(t *testing.T, c net.Conn) string {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the proxy still waits for a backend that stopped (upstream_timeout 300ms); the client got %q", got)
		}
		return string(got)
	}
	// get asks a backend that answers with respond for /a/1 and returns
	// what the client got.
	get := func(t *testing.T, respond func(io.Writer, *http.Request) bool) string {
		t.Helper()
		b := startBackend(t)
		b.respond = respond
		_, addr := testServiceWith(t, b, keys)
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprint(c, "GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n")
		return readAll(t, c)
	}
	t.Run("no response", func(t *testing.T) {
		got := get(t, func(io.Writer, *http.Request) bool { <-hang; return true })
		if !strings.HasPrefix(got, "HTTP/1.1 504 ") || !strings.Contains(got, "upstream_timeout") {
			t.Errorf("the client got %q, want a 504 that names http.upstream_timeout", got)
		}
	})
	t.Run("body stops", func(t *testing.T) {
		got := get(t, func(w io.Writer, _ *http.Request) bool {
			fmt.Fprint(w, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
			<-hang
			return true
		})
		if !strings.HasPrefix(got, "HTTP/1.1 200 ") || !strings.HasSuffix(got, "\r\n\r\n0123456789") {
			t.Errorf("the client got %q, want the head and the 10 bytes sent, then the end", got)
		}
	})
	// deafUpload sends a 1 GiB body to a backend that reads the request's
	// head and none of its body, chunk bytes at a time with pause between
	// them, until the proxy stops reading; it returns what the client got.
	deafUpload := func(t *testing.T, chunk int, pause time.Duration) string {
		t.Helper()
		b := scriptedBackend(t, func(c *net.TCPConn) {
			c.SetReadBuffer(4 << 10)
			http.ReadRequest(bufio.NewReader(c))
			<-hang
		})
		_, addr := testServiceWith(t, b, keys)
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		const size = 1 << 30 // far more than the sockets' buffers hold
		fmt.Fprintf(c, "POST /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", size)
		go func() {
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			buf := make([]byte, chunk)
			for n := 0; n < size; n += len(buf) {
				if _, err := c.Write(buf); err != nil {
					return
				}
				time.Sleep(pause)
			}
		}()
		return readAll(t, c)
	}
	t.Run("request not read", func(t *testing.T) {
		if got := deafUpload(t, 256<<10, 0); !strings.HasPrefix(got, "HTTP/1.1 504 ") || !strings.Contains(got, "upstream_timeout") {
			t.Errorf("the client got %q, want a 504 that names http.upstream_timeout", got)
		}
	})
	t.Run("slow request not read", func(t *testing.T) {
		// The proxy's write to the backend times out while it flushes
		// what it read before reading the client again: still the
		// backend's fault, not the client's.
		if got := deafUpload(t, 16<<10, time.Millisecond); !strings.HasPrefix(got, "HTTP/1.1 504 ") {
			t.Errorf("the client got %q, want a 504", got)
		}
	})
	t.Run("idle connection kept", func(t *testing.T) {
		// An upstream connection kept idle for longer than the timeout
		// is still used: the timeout runs only while the proxy waits.
		b := startBackend(t)
		p, addr := testServiceWith(t, b, "      upstream_timeout: 100ms\n")
		for range 2 {
			if code, _ := oneRequest(t, addr, "GET /a/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); code != 200 {
				t.Fatalf("status %d", code)
			}
			time.Sleep(300 * time.Millisecond)
		}
		if st := backendStats(t, p); st.Dialed != 1 || st.Reused != 1 {
			t.Errorf("stats %+v, want 1 dialed and reused once", st)
		}
	})
}

// TestUpstreamTimeoutConfig: upstream_timeout defaults to 60s, 0 turns it
// off, and a negative one is refused with the key and the fix named
// (by config.Duration).
func TestUpstreamTimeoutConfig(t *testing.T) {
	for _, c := range []struct {
		line, want, err string
	}{
		{line: "", want: "1m0s"},
		{line: "      upstream_timeout: 0s\n", want: "0s"},
		{line: "      upstream_timeout: 5m\n", want: "5m0s"},
		{line: "      upstream_timeout: -1s\n", err: "http.upstream_timeout"},
	} {
		cfg, err := config.Parse("test", []byte(`
services:
  - name: web
    listen: 15080
    ports: ["80"]
    proxy: http
    http:
`+c.line+`      routes:
        - path: /
          backends: ["10.2.0.2:80"]
`))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "use a positive value") {
				t.Errorf("%q: error %v, want one naming %s and the fix", c.line, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", c.line, err)
		}
		if got := cfg.Services[0].Section().(*Config).UpstreamTimeout.D().String(); got != c.want {
			t.Errorf("%q: upstream_timeout %s, want %s", c.line, got, c.want)
		}
	}
}
