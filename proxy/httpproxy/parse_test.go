package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// requestCorpus is every request head the package's tests and fuzz
// corpus hold.
func requestCorpus(t testing.TB) [][]byte {
	var out [][]byte
	for _, c := range smuggleCases {
		out = append(out, []byte(c.raw))
	}
	for _, raw := range []string{
		"GET /a HTTP/1.1\r\nHost: h\r\nPragma: no-cache\r\n\r\n",
		"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
		"GET /a HTTP/1.0\r\nConnection: Keep-Alive, foo\r\nHost: x\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: h\r\nConnection: foo, close\r\n\r\n",
		"GET http://Example.COM:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n",
		"GET https://[::1]:8443 HTTP/1.1\r\nHost: other\r\n\r\n",
		"GET /a HTTP/1.1\r\nhost: h\r\nx-lower-case: 1\r\nX_Under: 2\r\nACCEPT: */*\r\nAccept: a, b\r\nEmpty:\r\nObs-Text: \xe9t\xe9\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
		"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
	} {
		out = append(out, []byte(raw))
	}
	files, _ := filepath.Glob("testdata/fuzz/FuzzReadRequest/*")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		// go test fuzz v1, then []byte("...")
		lines := strings.SplitN(string(b), "\n", 2)
		if len(lines) == 2 {
			var v []byte
			if _, err := fmt.Sscanf(strings.TrimSpace(lines[1]), "[]byte(%q)", &v); err == nil {
				out = append(out, v)
			}
		}
	}
	return out
}

// TestParseRequestAsNetHTTP: for every head checkHead accepts,
// parseRequest makes the request http.ReadRequest makes (but the
// Cache-Control net/http adds for a Pragma: no-cache, and the URL, which
// setTarget replaces).
func TestParseRequestAsNetHTTP(t *testing.T) {
	checked := 0
	for _, raw := range requestCorpus(t) {
		r := bufio.NewReaderSize(bytes.NewReader(raw), 64<<10)
		n, _, err := peekHead(r)
		if err != nil || n == 0 {
			continue
		}
		head, _ := r.Peek(n)
		f, err := checkHead(head)
		if err != nil {
			continue
		}
		want, werr := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
		got, gerr := parseRequest(head, &f)
		if werr != nil {
			// ReadRequest refuses what checkHead let through only
			// for its URL: setTarget refuses those.
			if gerr == nil {
				rq := &request{Request: got}
				if err := rq.setTarget(got.RequestURI); err == nil {
					t.Errorf("%q: ReadRequest: %v; parseRequest and setTarget accept it", head, werr)
				}
			}
			continue
		}
		if gerr != nil {
			t.Errorf("%q: parseRequest: %v; ReadRequest accepts it", head, gerr)
			continue
		}
		if p := got.Header["Pragma"]; len(p) > 0 && p[0] == "no-cache" && got.Header["Cache-Control"] == nil {
			delete(want.Header, "Cache-Control")
		}
		if got.Method != want.Method || got.RequestURI != want.RequestURI || got.Proto != want.Proto ||
			got.ProtoMajor != want.ProtoMajor || got.ProtoMinor != want.ProtoMinor || got.Host != want.Host ||
			got.Close != want.Close || !reflect.DeepEqual(got.Header, want.Header) {
			t.Errorf("%q:\nparseRequest %s %q %s %d.%d host %q close %v %v\nReadRequest  %s %q %s %d.%d host %q close %v %v", head,
				got.Method, got.RequestURI, got.Proto, got.ProtoMajor, got.ProtoMinor, got.Host, got.Close, got.Header,
				want.Method, want.RequestURI, want.Proto, want.ProtoMajor, want.ProtoMinor, want.Host, want.Close, want.Header)
		}
		checked++
	}
	if checked < 20 {
		t.Fatalf("only %d heads compared", checked)
	}
}

// responseCorpus are response heads of the shapes backends send, and
// of shapes parseResponse leaves to net/http.
var responseCorpus = []string{
	"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x, Close\r\n\r\nhello",
	"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
	"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
	"HTTP/1.1 404 Not Found\r\nContent-Length:   3  \r\nset-cookie: a=1\r\nSet-Cookie: b=2\r\nx_under: u\r\nEmpty:\r\n\r\nno!",
	"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 299 Odd\treason \r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Obs: \xe9t\xe9\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!",
	"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\n\r\nuntil the close",
	"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\x00b\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\rb\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n: novalue\r\n\r\nhi",
	"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
	"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 999 Big\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
	"HTTP/1.1 200 OK\r\nContent-Len",
	"",
	"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.1 +99 Odd\r\nContent-Length: 2\r\n\r\nhi",
	"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nhi",
}

// refusedResponses are the heads of responseCorpus that readResponse
// refuses although net/http reads them (badResponse).
var refusedResponses = map[string]string{
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nhi\r\n0\r\n\r\n": "Transfer-Encoding and Content-Length",
	"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n":            "Transfer-Encoding and Content-Length",
	"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n":                      "HTTP/1.0 response",
	"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nhi":                                             "control byte",
	"HTTP/1.1 200 OK\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nhi":                                "control byte",
	"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nhi":                                                "below 100",
	"HTTP/1.1 +99 Odd\r\nContent-Length: 2\r\n\r\nhi":                                                "below 100",
	"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi":                                                "white space before the colon",
}

// TestReadResponseRefuses: readResponse refuses the heads net/http reads
// otherwise than a client or backend may mean them, with the reason,
// and no other head of the corpus.
func TestReadResponseRefuses(t *testing.T) {
	for _, raw := range responseCorpus {
		_, err := readResponse(bufio.NewReader(strings.NewReader(raw)), &http.Request{Method: http.MethodGet}, &respBody{})
		var refused badResponse
		want, ok := refusedResponses[raw]
		switch {
		case ok && !errors.As(err, &refused):
			t.Errorf("%q: %v, want it refused (%s)", raw, err, want)
		case ok && !strings.Contains(err.Error(), want):
			t.Errorf("%q: %v, want a reason with %q", raw, err, want)
		case !ok && errors.As(err, &refused):
			t.Errorf("%q refused: %v", raw, err)
		}
	}
	// A head that does not fit in the reader's buffer.
	big := "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", 5000) + "\r\nContent-Length: 2\r\n\r\nhi"
	_, err := readResponse(bufio.NewReaderSize(strings.NewReader(big), 4096), &http.Request{Method: http.MethodGet}, &respBody{})
	if !errors.Is(err, errResponseHeadTooLarge) {
		t.Errorf("a 5 KB head through a 4 KiB reader: %v, want errResponseHeadTooLarge", err)
	}
}

// compareResponse reads raw with readResponse and with http.ReadResponse
// and reports how they differ ("" when they agree). A response
// readResponse parsed itself must read as net/http reads it, and what
// net/http refuses readResponse must leave to it. What readResponse
// refuses on purpose (badResponse: framing net/http reads one way and a
// backend may mean another, a head larger than the reader's buffer)
// net/http may take.
func compareResponse(raw []byte, method string) (parsed bool, diff string) {
	req := &http.Request{Method: method}
	var body respBody
	got, gerr := readResponse(bufio.NewReader(bytes.NewReader(raw)), req, &body)
	want, werr := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), req)
	parsed = gerr == nil && got.Body == &body
	var refused badResponse
	switch {
	case werr != nil && gerr != nil:
		return parsed, ""
	case werr == nil && errors.As(gerr, &refused):
		return parsed, ""
	case werr != nil || gerr != nil:
		return parsed, fmt.Sprintf("readResponse: %v, ReadResponse: %v", gerr, werr)
	}
	gb, gberr := io.ReadAll(got.Body)
	wb, wberr := io.ReadAll(want.Body)
	if got.Status != want.Status || got.StatusCode != want.StatusCode || got.Proto != want.Proto ||
		got.ProtoMajor != want.ProtoMajor || got.ProtoMinor != want.ProtoMinor || got.ContentLength != want.ContentLength ||
		got.Close != want.Close || !reflect.DeepEqual(got.Header, want.Header) || !bytes.Equal(gb, wb) || (gberr == nil) != (wberr == nil) {
		return parsed, fmt.Sprintf("\nreadResponse %q %d %s %d.%d length %d close %v %v body %q %v\nReadResponse %q %d %s %d.%d length %d close %v %v body %q %v",
			got.Status, got.StatusCode, got.Proto, got.ProtoMajor, got.ProtoMinor, got.ContentLength, got.Close, got.Header, gb, gberr,
			want.Status, want.StatusCode, want.Proto, want.ProtoMajor, want.ProtoMinor, want.ContentLength, want.Close, want.Header, wb, wberr)
	}
	return parsed, ""
}

// TestReadResponseAsNetHTTP: readResponse reads every response as
// http.ReadResponse does, parsing the common ones itself.
func TestReadResponseAsNetHTTP(t *testing.T) {
	parsedCount := 0
	for _, raw := range responseCorpus {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			parsed, diff := compareResponse([]byte(raw), method)
			if diff != "" {
				t.Errorf("%q (%s): %s", raw, method, diff)
			}
			if parsed {
				parsedCount++
				if method == http.MethodHead {
					t.Errorf("%q: parsed itself a response to HEAD", raw)
				}
			}
		}
	}
	// The common shapes must take the fast path, or it is dead code.
	if parsedCount < 12 {
		t.Errorf("parsed %d responses itself, want the 12 of the common shape", parsedCount)
	}
}

// FuzzReadResponse: whatever the bytes, readResponse reads them as
// http.ReadResponse does.
func FuzzReadResponse(f *testing.F) {
	for _, raw := range responseCorpus {
		f.Add([]byte(raw))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if _, diff := compareResponse(raw, http.MethodGet); diff != "" {
			t.Fatalf("%q: %s", raw, diff)
		}
	})
}

// TestParseAllocations: parsing a common request head after checkHead,
// and a common response head, costs the request or response, its
// header map (three allocations above 8 fields), one string, one slice
// of values and a name not in canonical form (ETag). http.ReadResponse
// makes 15 of this response.
func TestParseAllocations(t *testing.T) {
	reqHead := []byte("GET /static/site.css?v=2 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0\r\n" +
		"Accept: text/css,*/*;q=0.1\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n")
	f, err := checkHead(reqHead)
	if err != nil {
		t.Fatal(err)
	}
	respHead := []byte("HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\nContent-Type: text/css\r\nContent-Length: 4096\r\n" +
		"Last-Modified: Wed, 02 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"1-2\"\r\nAccept-Ranges: bytes\r\n\r\n")
	req := &http.Request{Method: http.MethodGet}
	for _, c := range []struct {
		name string
		max  float64
		f    func() bool
	}{
		{"parseRequest", 5, func() bool { r, err := parseRequest(reqHead, &f); return err == nil && r.Host == "www.example.com" }},
		{"parseResponse", 7, func() bool { r := parseResponse(respHead, req); return r != nil && r.ContentLength == 4096 }},
	} {
		if n := testing.AllocsPerRun(100, func() {
			if !c.f() {
				t.Fatalf("%s failed", c.name)
			}
		}); n > c.max {
			t.Errorf("%s: %.0f allocations, want at most %.0f", c.name, n, c.max)
		}
	}
}
