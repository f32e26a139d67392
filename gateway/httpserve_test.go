package gateway

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// TestHTTPListenerLimits: a client of the metrics (or pprof) listener
// kept a connection for ever by sending one request and then nothing,
// and could keep as many as it liked, each a descriptor of the daemon's.
// Idle connections now close, and connections beyond the cap are closed
// at once while the others are served.
func TestHTTPListenerLimits(t *testing.T) {
	oldIdle, oldMax := httpIdleTimeout, httpMaxConns
	// The idle timeout must not close the first connections before the
	// one over the cap is tried (a few ms later; a second on a busy
	// machine is ample).
	httpIdleTimeout, httpMaxConns = time.Second, 4
	defer func() { httpIdleTimeout, httpMaxConns = oldIdle, oldMax }()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stop := serveHTTP(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") }), time.Second)
	defer stop()

	// get sends one request on c and reports whether it was answered.
	get := func(c net.Conn) bool {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return false
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	var kept []net.Conn
	defer func() {
		for _, c := range kept {
			c.Close()
		}
	}()
	for i := range httpMaxConns {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, c)
		if !get(c) {
			t.Fatalf("connection %d of %d (the cap) was not served", i+1, httpMaxConns)
		}
	}
	over, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if get(over) {
		t.Errorf("a connection beyond the cap of %d was served", httpMaxConns)
	}
	over.Close()
	// The kept connections idle past the timeout: the server closes them.
	for i, c := range kept {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("idle connection %d: read %d bytes, %v; want EOF (closed by the server)", i+1, n, err)
		}
	}
	// Their slots are free again.
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !get(c) {
		t.Error("after the idle connections closed, a new one was not served")
	}
}

// TestHTTPListenerSlowBody: a client that sends a request with a body
// and then stops sending keeps its connection, and so its slot, unless
// the server bounds the time it reads a request: the handlers read no
// body, the server then reads what is left of it (up to 256 KiB) to
// reuse the connection, and neither the header nor the idle timeout
// covers that read. httpMaxConns such clients would lock every scraper
// out for as long as they liked.
func TestHTTPListenerSlowBody(t *testing.T) {
	oldIdle, oldMax, oldRead := httpIdleTimeout, httpMaxConns, httpReadTimeout
	httpIdleTimeout, httpMaxConns, httpReadTimeout = 300*time.Millisecond, 1, 300*time.Millisecond
	defer func() { httpIdleTimeout, httpMaxConns, httpReadTimeout = oldIdle, oldMax, oldRead }()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stop := serveHTTP(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") }), 0)
	defer stop()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx"); err != nil {
		t.Fatal(err)
	}
	// The server may answer first; it must close the connection.
	c.SetReadDeadline(time.Now().Add(httpReadTimeout + 5*time.Second))
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("a connection whose request body stopped coming was still open 5 s after the read timeout: it holds its slot for ever")
	}
}

// TestCappedConnCloseWrite: the connection wrapper of the listener cap
// passes a half-close through (http.Server's closeWriteAndWait looks for
// CloseWrite): the peer reads EOF while the connection still reads what
// the peer sends. The wrapper hid it before, and the server closed at
// once, with a reset where the client's request had bytes left unread.
func TestCappedConnCloseWrite(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	raw, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	slots := make(chan struct{}, 1)
	slots <- struct{}{}
	var served net.Conn = &cappedConn{Conn: raw, slots: slots}
	defer served.Close()
	cw, ok := served.(interface{ CloseWrite() error })
	if !ok {
		t.Fatal("cappedConn has no CloseWrite")
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	peer.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := peer.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("peer read after the half-close: %d, %v; want EOF", n, err)
	}
	if _, err := io.WriteString(peer, "late"); err != nil {
		t.Fatal(err)
	}
	served.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 4)
	if _, err := io.ReadFull(served, b); err != nil || string(b) != "late" {
		t.Fatalf("read after the half-close: %q, %v", b, err)
	}
}
