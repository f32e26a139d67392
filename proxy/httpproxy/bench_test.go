package httpproxy

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"strconv"
	"testing"
)

// rawBackend answers every request head it reads (one read each) with
// resp, allocating nothing per request: what a benchmark counts is the
// proxy's.
func rawBackend(b *testing.B, resp []byte) *fakeBackend {
	return scriptedBackend(b, func(c *net.TCPConn) {
		buf := make([]byte, 8192)
		have := 0
		for {
			n, err := c.Read(buf[have:])
			if err != nil {
				return
			}
			have += n
			if bytes.HasSuffix(buf[:have], []byte("\r\n\r\n")) {
				have = 0
				if _, err := c.Write(resp); err != nil {
					return
				}
			}
		}
	})
}

// readRaw reads one response with a Content-Length from r, allocating
// nothing.
func readRaw(r *bufio.Reader) error {
	length := -1
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) == 2 {
			break
		}
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(k, []byte("Content-Length")) {
			length, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if length < 0 {
		return fmt.Errorf("no Content-Length")
	}
	_, err := r.Discard(length)
	return err
}

// BenchmarkRelay: one keep-alive client through the proxy (relaying) to
// a backend; allocs/op are the proxy's per request and response.
func BenchmarkRelay(b *testing.B) {
	for _, size := range []int{0, 4 << 10, 64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			resp := fmt.Appendf(nil, "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 05:33:07 GMT\r\n"+
				"Content-Type: application/octet-stream\r\nContent-Length: %d\r\nLast-Modified: Wed, 02 Dec 2026 05:32:07 GMT\r\n"+
				"Connection: keep-alive\r\nETag: \"692e79b7-1000\"\r\nAccept-Ranges: bytes\r\n\r\n", size)
			resp = append(resp, make([]byte, size)...)
			be := rawBackend(b, resp)
			_, addr := testService(b, be)
			c, err := net.Dial("tcp4", addr)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			req := []byte("GET /a/small.bin HTTP/1.1\r\nHost: 10.2.0.2\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
			r := bufio.NewReaderSize(c, 64<<10)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(req); err != nil {
					b.Fatal(err)
				}
				if err := readRaw(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
