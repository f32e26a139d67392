package httpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestEarlyResponse: a backend that answers an upload before it has read
// the body (a 413 or 401 for a body it will not take) has its response
// relayed to the client, whether it then closes the connection, keeps it
// without reading, or reads the rest: not a 504 after
// http.upstream_timeout (0 here: for ever), nor nothing at all. The
// client's connection closes after it (the rest of its body cannot be
// read as a request). An interim 100 Continue is no early response: the
// body still goes to a backend that reads it late.
func TestEarlyResponse(t *testing.T) {
	const size = 256 << 20 // far more than the sockets between them hold
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })
	readLate := make(chan int64, 1)
	for _, c := range []struct {
		name string
		// backend answers a request whose head it read.
		backend func(c *net.TCPConn, br *bufio.Reader)
		status  int
		early   uint64
	}{
		{"close", func(c *net.TCPConn, _ *bufio.Reader) {
			fmt.Fprint(c, "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\n\r\nlarge")
			c.Close() // unread data: a reset
		}, 413, 1},
		{"hold", func(c *net.TCPConn, _ *bufio.Reader) {
			fmt.Fprint(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nwho's")
			<-hang
		}, 401, 1},
		{"drain", func(c *net.TCPConn, br *bufio.Reader) {
			fmt.Fprint(c, "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge")
			c.CloseWrite()
			time.Sleep(3 * earlyPoll) // the proxy's writes wait meanwhile
			io.Copy(io.Discard, br)
		}, 413, 1},
		// A response that does not refuse the body (a streaming
		// upload's 200) lets the body go on to a backend that reads it
		// late.
		{"ok then read", func(c *net.TCPConn, br *bufio.Reader) {
			fmt.Fprint(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			time.Sleep(3 * earlyPoll) // the proxy's writes wait meanwhile
			n, _ := io.CopyN(io.Discard, br, size)
			readLate <- n
			<-hang
		}, 200, 0},
		{"continue", func(c *net.TCPConn, br *bufio.Reader) {
			fmt.Fprint(c, "HTTP/1.1 100 Continue\r\n\r\n")
			time.Sleep(3 * earlyPoll) // the proxy's writes wait meanwhile
			n, _ := io.CopyN(io.Discard, br, size)
			msg := fmt.Sprint(n)
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(msg), msg)
			<-hang
		}, 200, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := scriptedBackend(t, func(bc *net.TCPConn) {
				br := bufio.NewReader(bc)
				for {
					l, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if l == "\r\n" {
						break
					}
				}
				c.backend(bc, br)
			})
			p, addr := testServiceWith(t, b, "      upstream_timeout: 0s\n")
			cl, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			fmt.Fprintf(cl, "POST /a/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n", size)
			go sendBody(cl, size)
			// A guard, not a measure: without the early response the
			// proxy waits for ever.
			cl.SetReadDeadline(time.Now().Add(30 * time.Second))
			br := bufio.NewReader(cl)
			resp, err := http.ReadResponse(br, nil)
			if err == nil && resp.StatusCode == http.StatusContinue {
				resp, err = http.ReadResponse(br, nil)
			}
			if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("no response: the proxy still sends the body to a backend that answered")
			}
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != c.status {
				t.Fatalf("the client got %d %q (%v), want %d", resp.StatusCode, body, err, c.status)
			}
			if c.name == "continue" && string(body) != fmt.Sprint(size) {
				t.Errorf("the backend read %s bytes of the body, want %d", body, size)
			}
			if c.name == "ok then read" {
				if n := <-readLate; n != size {
					t.Errorf("the backend read %d bytes of the body, want %d", n, size)
				}
			}
			if c.early > 0 {
				if !resp.Close {
					t.Errorf("the response says the connection stays open (header %v); the rest of the body would be read as a request", resp.Header)
				}
				// The proxy ends the client's connection: EOF, or a
				// reset for the body it did not read.
				if n, err := br.Read(make([]byte, 1)); n > 0 || err == nil || strings.Contains(err.Error(), "timeout") {
					t.Errorf("after the response: %d bytes, %v; want the connection's end", n, err)
				}
			}
			var early uint64
			for _, s := range p.Stats() {
				early += s.EarlyResponses
			}
			if early != c.early {
				t.Errorf("early responses counted: %d, want %d", early, c.early)
			}
		})
	}
}

func TestFinalStatus(t *testing.T) {
	for _, c := range []struct {
		data string
		want int
	}{
		{"", 0},
		{"HTTP/1.1 41", 0}, // too little to tell
		{"HTTP/1.1 413 Payload Too Large\r\n", 413},
		{"HTTP/1.1 200 OK\r\n", 200},
		{"HTTP/1.1 100 Continue\r\n", 0},
		{"HTTP/1.1 100 Continue\r\n\r\n", 0},
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", 0},
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized", 401},
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.", 0},
		// What follows a 101 is the new protocol's, not a response.
		{"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nHELLO-WORLD!", 0},
		{"garbage that is no response", 999}, // read, and refused as unreadable
		{"HTTP/1.1 4x3 Nope\r\n", 999},
	} {
		if got := finalStatus([]byte(c.data)); got != c.want {
			t.Errorf("finalStatus(%q) = %d, want %d", c.data, got, c.want)
		}
	}
}

// TestRefusedUploadLingers: a client whose upload the proxy refuses (a
// denied path here) reads the 403 and finishes sending its body without
// a reset: the proxy sends its FIN and discards what still comes
// (lingerClient), as nginx does, instead of resetting a connection with
// unread data, which can take the response with it.
func TestRefusedUploadLingers(t *testing.T) {
	b := startBackend(t)
	_, addr := testService(t, b)
	cl, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	const size = 64 << 20
	fmt.Fprintf(cl, "POST /admin/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", size)
	sent := make(chan error, 1)
	go func() {
		if err := sendBody(cl, size); err != nil {
			sent <- err
			return
		}
		sent <- cl.(*net.TCPConn).CloseWrite()
	}()
	cl.SetReadDeadline(time.Now().Add(30 * time.Second)) // a guard
	br := bufio.NewReader(cl)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("the client got %v, %v; want 403", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	if err := <-sent; err != nil {
		t.Errorf("the client could not finish its upload: %v", err)
	}
	if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("after the response: %d bytes, %v; want the end (EOF)", n, err)
	}
}

// TestNoLingerAfterStall: a client that stalled in its request body for
// idle_timeout gets no lingering close: its connection ends at once,
// and a further write of it meets a reset, not a proxy that reads on for
// lingerTimeout.
func TestNoLingerAfterStall(t *testing.T) {
	b := startBackend(t)
	_, addr := testServiceIdle(t, b, "", "300ms")
	cl, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	fmt.Fprint(cl, "POST /a/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
	cl.SetReadDeadline(time.Now().Add(10 * time.Second)) // a guard
	if _, err := io.ReadAll(cl); err != nil {
		t.Fatalf("the proxy did not end the stalled connection: %v", err)
	}
	// Short of lingerTimeout: a lingering proxy takes every write until
	// then.
	until := time.Now().Add(lingerTimeout - time.Second)
	for {
		if _, err := cl.Write([]byte("x")); err != nil {
			return
		}
		if time.Now().After(until) {
			t.Fatal("the proxy still reads a client that stalled for idle_timeout (a lingering close)")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sendBody writes size zero bytes to c, 64 KiB at a time.
func sendBody(c net.Conn, size int) error {
	buf := make([]byte, 64<<10)
	for n := 0; n < size; n += len(buf) {
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("after %d bytes: %w", n, err)
		}
	}
	return nil
}
