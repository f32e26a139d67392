package httpproxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// chunkedSource returns data in random pieces and, like a connection's
// flushReader, flushes out before some of its reads.
type chunkedSource struct {
	data []byte
	rng  *rand.Rand
	out  *sendBuf
}

func (s *chunkedSource) Read(p []byte) (int, error) {
	if len(s.data) == 0 {
		return 0, io.EOF
	}
	if s.rng.IntN(2) == 0 {
		if err := s.out.Flush(); err != nil {
			return 0, err
		}
	}
	n := min(len(p), len(s.data), 1+s.rng.IntN(3*sendBufSize/2))
	copy(p, s.data[:n])
	s.data = s.data[n:]
	return n, nil
}

// countWrites records what reaches the socket.
type countWrites struct {
	bytes.Buffer
	writes int
}

func (c *countWrites) Write(p []byte) (int, error) {
	c.writes++
	return c.Buffer.Write(p)
}

// TestSendBufOrder: whatever mixes of writes, strings and copies from a
// reader that flushes in the middle of a read, the bytes reach the
// socket whole and in order.
func TestSendBufOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		var sock countWrites
		b := newSendBuf()
		b.reset(&sock)
		var want bytes.Buffer
		for range 1 + rng.IntN(8) {
			data := make([]byte, rng.IntN(3*sendBufSize))
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			want.Write(data)
			switch rng.IntN(4) {
			case 3:
				for _, c := range data {
					b.WriteByte(c)
				}
			case 0:
				b.Write(data)
			case 1:
				b.WriteString(string(data))
			case 2:
				n, err := io.Copy(b, &chunkedSource{data: data, rng: rng, out: b})
				if err != nil || n != int64(len(data)) {
					t.Fatalf("case %d: copied %d of %d: %v", i, n, len(data), err)
				}
			}
		}
		if err := b.Flush(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(sock.Bytes(), want.Bytes()) {
			t.Fatalf("case %d: the socket got %d bytes, not the %d written in order", i, sock.Len(), want.Len())
		}
	}
}

// TestSendBufCoalesces: a head written in pieces and a small body are one
// write, and the buffer allocates nothing.
func TestSendBufCoalesces(t *testing.T) {
	var sock countWrites
	b := newSendBuf()
	body := bytes.Repeat([]byte("x"), 4096)
	src := bytes.NewReader(body)
	allocs := testing.AllocsPerRun(100, func() {
		sock.Reset()
		sock.writes = 0
		b.reset(&sock)
		b.WriteString("HTTP/1.1 200 OK\r\n")
		for range 10 {
			b.WriteString("Name")
			b.WriteString(": ")
			b.WriteString("value")
			b.WriteString("\r\n")
		}
		b.WriteString("\r\n")
		src.Reset(body)
		b.ReadFrom(src)
		b.Flush()
	})
	if sock.writes != 1 {
		t.Errorf("%d writes for a head and 4 KiB, want 1", sock.writes)
	}
	if allocs != 0 {
		t.Errorf("%.0f allocations per message, want 0", allocs)
	}
}

// TestStreamingResponses: the proxy gathers what it writes, but never
// holds back what it relayed while it waits for the backend: an interim
// response, the head and first chunk of a chunked response, and the
// first part of a body with a length reach the client while the backend
// is still silent.
func TestStreamingResponses(t *testing.T) {
	b := startBackend(t)
	next := make(chan struct{})
	b.respond = func(w io.Writer, req *http.Request) bool {
		var first, rest string
		switch req.URL.Path {
		case "/a/chunked":
			first, rest = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n", "4\r\nrest\r\n0\r\n\r\n"
		case "/a/length":
			first, rest = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfirst", "rest"
		case "/a/interim":
			first, rest = "HTTP/1.1 103 Early Hints\r\nLink: </a/x>\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfirstrest"
		default:
			return false
		}
		io.WriteString(w, first)
		<-next
		io.WriteString(w, rest)
		return true
	}
	_, addr := testService(t, b)
	for _, path := range []string{"/a/chunked", "/a/length", "/a/interim"} {
		t.Run(strings.TrimPrefix(path, "/a/"), func(t *testing.T) {
			c, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(c)
			resp, err := http.ReadResponse(r, nil)
			if err != nil {
				t.Fatalf("before the backend's rest: %v", err)
			}
			if path == "/a/interim" {
				if resp.StatusCode != 103 {
					t.Fatalf("status %d, want the 103 first", resp.StatusCode)
				}
			} else {
				got := make([]byte, 5)
				if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != "first" {
					t.Fatalf("before the backend's rest: read %q, %v", got, err)
				}
			}
			next <- struct{}{}
			if path == "/a/interim" {
				if resp, err = http.ReadResponse(r, nil); err != nil {
					t.Fatal(err)
				}
			}
			all, err := io.ReadAll(resp.Body)
			if err != nil || !strings.HasSuffix(string(all), "rest") {
				t.Fatalf("the rest: %q, %v", all, err)
			}
		})
	}
}

// TestLargeBodies: a body larger than the send buffer arrives whole,
// the connection then serves the next request, and a backend that ends
// the body early gets the client's connection closed rather than a
// response read as shorter.
func TestLargeBodies(t *testing.T) {
	b := startBackend(t)
	body := strings.Repeat("0123456789abcdef", (4*sendBufSize+100000)/16)
	b.respond = func(w io.Writer, req *http.Request) bool {
		switch req.URL.Path {
		case "/a/large":
			fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		case "/a/short":
			fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body)+1, body)
			w.(net.Conn).Close()
		default:
			return false
		}
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
	for _, path := range []string{"/a/large", "/a/x", "/a/large", "/a/short"} {
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		got, err := io.ReadAll(resp.Body)
		switch path {
		case "/a/large":
			if err != nil || string(got) != body {
				t.Fatalf("%s: %d bytes (want %d), %v", path, len(got), len(body), err)
			}
		case "/a/short":
			if err == nil {
				t.Fatalf("%s: a body cut short read as whole (%d bytes)", path, len(got))
			}
		default:
			if err != nil || !strings.HasPrefix(string(got), "backend saw GET /a/x") {
				t.Fatalf("%s: %q, %v", path, got, err)
			}
		}
	}
}

// TestStreamingRequestBody: the head and first part of a request body
// reach the backend while the client is still sending the rest.
func TestStreamingRequestBody(t *testing.T) {
	b := startBackend(t)
	b.respond = func(w io.Writer, req *http.Request) bool {
		if req.URL.Path != "/a/upload" {
			return false
		}
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return true
	}
	_, addr := testService(t, b)
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "POST /a/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nfirst")
	if err := poll(func() bool { return len(b.seen()) > 0 }); err != nil {
		t.Fatal("the backend got no head while the body was incomplete")
	}
	fmt.Fprint(c, "-rest")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
}

// TestClientGoneStopsRelay: when the client goes away in the middle of a
// response, the proxy stops reading the backend. Response.Write closes
// net/http's body when a write fails, which reads the body to its end;
// the proxy's reads of the backend failed after a failed write only
// while the send buffer held bytes, and a chunk of 32 KiB or more goes
// to the socket directly. So a client that asked for an endless chunked
// stream (server-sent events, a log tail) or a large download and left
// had the proxy read it from the backend for nothing, for ever for a
// stream that keeps sending: a client could pile up such connections at
// no cost of its own.
func TestClientGoneStopsRelay(t *testing.T) {
	for _, c := range []struct{ name, head, piece string }{
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "400\r\n" + strings.Repeat("x", 1024) + "\r\n"},
		{"chunked, large chunks", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "10000\r\n" + strings.Repeat("x", 64<<10) + "\r\n"},
		// A head net/http reads (a bare LF): its body has a length.
		{"length, read by net/http", "HTTP/1.1 200 OK\nContent-Length: 1000000000000\n\n", strings.Repeat("x", 1024)},
		{"length, read by net/http, large pieces", "HTTP/1.1 200 OK\nContent-Length: 1000000000000\n\n", strings.Repeat("x", 64<<10)},
	} {
		t.Run(c.name, func(t *testing.T) {
			stopped := make(chan int, 1)
			b := scriptedBackend(t, func(conn *net.TCPConn) {
				if readHTTPRequestHead(bufio.NewReader(conn)) != nil {
					return
				}
				io.WriteString(conn, c.head)
				n := 0
				deadline := time.Now().Add(10 * time.Second)
				for time.Now().Before(deadline) {
					if _, err := io.WriteString(conn, c.piece); err != nil {
						break
					}
					n++
					time.Sleep(time.Millisecond)
				}
				stopped <- n
			})
			_, addr := testService(t, b)
			conn, err := net.Dial("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(conn, "GET /a/stream HTTP/1.1\r\nHost: t\r\n\r\n")
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil {
				t.Fatal(err)
			}
			// The client stops reading for a while (the proxy's writes
			// to it fill its socket and wait), then leaves.
			time.Sleep(300 * time.Millisecond)
			conn.Close()
			select {
			case n := <-stopped:
				t.Logf("the backend wrote %d pieces", n)
			case <-time.After(3 * time.Second):
				t.Errorf("3 s after the client left, the proxy still reads the backend's response")
				<-stopped
			}
		})
	}
}
