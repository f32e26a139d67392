package httpproxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// manyFields is a header of more fields than writeFields sorts on the
// stack.
func manyFields() string {
	var b strings.Builder
	for i := range maxSortedFields + 5 {
		fmt.Fprintf(&b, "X-Field-%02d: %d\r\n", maxSortedFields+5-i, i)
	}
	return b.String()
}

// TestWriteRequestAsNetHTTP: for the requests readRequest makes, the
// proxy's writer sends the bytes Request.Write sends, body included.
func TestWriteRequestAsNetHTTP(t *testing.T) {
	for _, raw := range []string{
		"GET /a/b?x=1 HTTP/1.1\r\nHost: Example.COM\r\nUser-Agent: curl/8\r\nAccept: */*\r\nX-B: 1\r\nX-A: 2\r\nX-A: 3\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent:\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent:   spaced out  \r\nX-Tab: \tv\t\r\n\r\n",
		"GET /q? HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
		"GET /q?a=%20b&c HTTP/1.1\r\nHost: h:8080\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n",
		"GET http://H.example:8080/abs?z HTTP/1.1\r\nHost: other\r\n\r\n",
		"GET /old HTTP/1.0\r\n\r\n",
		"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n",
		"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
		"DELETE /d HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
		"PUT /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: h\r\n" + manyFields() + "\r\n",
	} {
		for _, keepalive := range []bool{false, true} {
			write := func(w func(*sendBuf, *http.Request) error) (string, error) {
				rq, err := readRequest(bufio.NewReader(strings.NewReader(raw)))
				if err != nil {
					t.Fatalf("%q: %v", raw, err)
				}
				if keepalive {
					rq.Close = false // as relay does for an upstream kept alive
				}
				rq.Header["X-Forwarded-For"] = []string{"192.0.2.1"}
				var got bytes.Buffer
				out := newSendBuf()
				out.reset(&got)
				err = w(out, rq.Request)
				if err == nil {
					err = out.Flush()
				}
				return got.String(), err
			}
			want, err := write(func(out *sendBuf, req *http.Request) error { return req.Write(out) })
			if err != nil {
				t.Fatalf("%q: req.Write: %v", raw, err)
			}
			var s scratch
			got, err := write(func(out *sendBuf, req *http.Request) error { return writeRequest(out, req, &s) })
			if err != nil || got != want {
				t.Errorf("%q (keepalive %v):\nwriteRequest %q, %v\nreq.Write    %q", raw, keepalive, got, err, want)
			}
		}
	}
}

// TestWriteRequestShortBody: a body that ends before its length is an
// error, not a shorter request.
func TestWriteRequestShortBody(t *testing.T) {
	raw := "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello"
	rq, err := readRequest(bufio.NewReader(strings.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	out := newSendBuf()
	out.reset(io.Discard)
	var s scratch
	if err := writeRequest(out, rq.Request, &s); err == nil {
		t.Fatal("a body of 5 bytes of 10 written without an error")
	}
	if rq.bodyFailed() == nil {
		t.Error("the body reader does not say it failed")
	}
}

// TestWriteResponseAsNetHTTP: the proxy's response writer sends the bytes
// Response.Write sends (it writes the common response itself and leaves
// the others to it), but for a status line without a reason phrase,
// which it does not make up, and the "Connection: close" Response.Write
// adds to a response to HEAD without a length.
func TestWriteResponseAsNetHTTP(t *testing.T) {
	for _, c := range []struct {
		raw, method string
		close       bool
		want        string // when it differs from Response.Write's
	}{
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: nginx\r\nContent-Type: text/plain\r\nDate: x\r\n\r\nhello"},
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", close: true},
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", close: true},
		{raw: "HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!"},
		{raw: "HTTP/1.1 299 Custom  Reason \r\nContent-Length: 1\r\n\r\nx"},
		{raw: "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"},
		{raw: "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nhi"},
		{raw: "HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nhi", want: "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nhi"},
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"},
		{raw: "HTTP/1.1 204 No Content\r\n\r\n"},
		{raw: "HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"},
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method: http.MethodHead},
		// Response.Write adds "Connection: close" (TestHeadResponseWithoutLength).
		{raw: "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", method: http.MethodHead, want: "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"},
		{raw: "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", method: http.MethodHead, close: true},
		{raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
		{raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"},
		{raw: "HTTP/1.1 200 OK\r\n\r\nuntil the close"},
		{raw: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + manyFields() + "\r\nhi"},
	} {
		method := c.method
		if method == "" {
			method = http.MethodGet
		}
		write := func(w func(*sendBuf, *http.Response) error) (string, error) {
			req := &http.Request{Method: method}
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(c.raw)), req)
			if err != nil {
				t.Fatalf("%q: %v", c.raw, err)
			}
			resp.Close = resp.Close || c.close
			var got bytes.Buffer
			out := newSendBuf()
			out.reset(&got)
			err = w(out, resp)
			if err == nil {
				err = out.Flush()
			}
			return got.String(), err
		}
		want := c.want
		if want == "" {
			var err error
			if want, err = write(func(out *sendBuf, resp *http.Response) error { return resp.Write(out) }); err != nil {
				t.Fatalf("%q: resp.Write: %v", c.raw, err)
			}
		}
		var s scratch
		got, err := write(func(out *sendBuf, resp *http.Response) error { return writeResponse(out, resp, &s) })
		if err != nil || got != want {
			t.Errorf("%q (%s, close %v):\nwriteResponse %q, %v\nwant          %q", c.raw, method, c.close, got, err, want)
		}
	}
}

// TestWriteResponseShortBody: a backend's body that ends before its
// Content-Length is an error.
func TestWriteResponseShortBody(t *testing.T) {
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")), &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatal(err)
	}
	out := newSendBuf()
	out.reset(io.Discard)
	var s scratch
	if err := writeResponse(out, resp, &s); err == nil {
		t.Fatal("a body of 5 bytes of 10 written without an error")
	}
}

// TestWriteHeadNoFraming: the head of a spliced response is its status
// line and fields as they are, Content-Length included.
func TestWriteHeadNoFraming(t *testing.T) {
	resp := &http.Response{Status: "200 OK", StatusCode: 200, ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Length": {"10"}, "Server": {"s"}, "Bad Name": {"x"}, "Split": {"a\r\nInjected: 1"}}}
	var got bytes.Buffer
	out := newSendBuf()
	out.reset(&got)
	var s scratch
	writeHead(out, resp, &s)
	out.Flush()
	want := "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nServer: s\r\nSplit: a  Injected: 1\r\n\r\n"
	if got.String() != want {
		t.Errorf("writeHead: %q, want %q", got.String(), want)
	}
}

// TestWriteHeadsAllocateNothing: writing the head of a common request
// and of a common response, and the response's body, allocates nothing.
func TestWriteHeadsAllocateNothing(t *testing.T) {
	rq, err := readRequest(bufio.NewReader(strings.NewReader("GET /static/site.css?v=2 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0\r\n" +
		"Accept: text/css,*/*;q=0.1\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader("HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n"+
		"Content-Type: text/css\r\nContent-Length: 4096\r\nLast-Modified: Wed, 02 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"1-2\"\r\nAccept-Ranges: bytes\r\n\r\n")), rq.Request)
	if err != nil {
		t.Fatal(err)
	}
	removeHopByHop(resp.Header)
	body := bytes.Repeat([]byte("b"), 4096)
	src := bytes.NewReader(body)
	resp.Body = io.NopCloser(src)
	out := newSendBuf()
	out.reset(io.Discard)
	var s scratch
	for _, c := range []struct {
		name string
		f    func() error
	}{
		{"writeRequest", func() error { return writeRequest(out, rq.Request, &s) }},
		{"writeResponse", func() error { src.Reset(body); return writeResponse(out, resp, &s) }},
		{"writeHead", func() error { writeHead(out, resp, &s); return nil }},
	} {
		if n := testing.AllocsPerRun(100, func() {
			if err := c.f(); err != nil {
				t.Fatal(err)
			}
			out.Flush()
		}); n != 0 {
			t.Errorf("%s: %.0f allocations, want 0", c.name, n)
		}
	}
}
