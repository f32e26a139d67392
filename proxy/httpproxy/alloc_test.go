package httpproxy

import (
	"bufio"
	"bytes"
	"testing"
)

// TestAllocsPerRequest: the steps of the request path made
// allocation-free stay so.
func TestAllocsPerRequest(t *testing.T) {
	head := []byte("GET /static/site.css?v=2 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n" +
		"Accept: text/css,*/*;q=0.1\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n" +
		"Content-Length: 0\r\n\r\n")
	src := bytes.NewReader(head)
	r := bufio.NewReader(src)
	for _, c := range []struct {
		name string
		f    func()
	}{
		{"normalizePath of a plain path", func() { normalizePath("/static/css/site-2.css") }},
		{"normalizePath of the root", func() { normalizePath("/") }},
		{"checkHead", func() {
			if _, err := checkHead(head); err != nil {
				t.Fatal(err)
			}
		}},
		{"peekHead", func() {
			src.Reset(head)
			r.Reset(src)
			if n, _, err := peekHead(r); n != len(head) || err != nil {
				t.Fatal(n, err)
			}
		}},
	} {
		if n := testing.AllocsPerRun(100, c.f); n != 0 {
			t.Errorf("%s: %.0f allocations, want 0", c.name, n)
		}
	}
}
