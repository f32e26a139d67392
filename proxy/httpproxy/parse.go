package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
)

// The proxy parses the heads it reads itself: net/http's ReadRequest and
// ReadResponse read a head line by line through a textproto reader,
// canonicalise every name and allocate each value; with their callers
// they were 13% of the CPU a small response cost (pprof, 4 KiB
// responses, 64 connections). Here a head is converted to one string
// and its fields are substrings of it.
//
// A request head is parsed only after checkHead accepted it, strictly; a
// response head is parsed here when it has the common shape (a status
// line, CRLF field lines of token names, a single Content-Length, no
// Transfer-Encoding, a status that has a body, not a response to HEAD),
// and every other response is left to http.ReadResponse, whose rules
// for them are what the proxy relays by.

// parseRequest makes the request of a head checkHead accepted (f is what
// it found), as http.ReadRequest would, but the fields a proxy leaves
// alone (ReadRequest adds a Cache-Control for a Pragma: no-cache) and the
// URL (setTarget sets it).
func parseRequest(head []byte, f *headFacts) (*http.Request, error) {
	s := string(head)
	i := strings.Index(s, "\r\n")
	line, fields := s[:i], s[i+2:]
	method, rest, _ := strings.Cut(line, " ")
	target, version, _ := strings.Cut(rest, " ")
	req := &http.Request{Method: method, RequestURI: target, Proto: version, ProtoMajor: 1, ProtoMinor: 1}
	if f.http10 {
		req.ProtoMinor = 0
	}
	req.Header = make(http.Header, strings.Count(fields, "\n"))
	if !parseFields(fields, req.Header) {
		// checkHead accepted what parseFields refuses: a bug, not the
		// client's fault, but nothing to forward either.
		return nil, badRequest("unparsable request head")
	}
	req.Host = absoluteAuthority(target)
	if req.Host == "" {
		req.Host = req.Header.Get("Host")
	}
	delete(req.Header, "Host")
	if f.chunked {
		delete(req.Header, "Transfer-Encoding") // the proxy frames the body
	}
	req.Close = shouldClose(req.ProtoMinor, req.Header)
	return req, nil
}

// absoluteAuthority is the authority of an absolute-form target
// ("http://host:port/path"), else "".
func absoluteAuthority(target string) string {
	if target == "" || target[0] == '/' || target == "*" {
		return ""
	}
	_, rest, ok := strings.Cut(target, "://")
	if !ok {
		return ""
	}
	if end := strings.IndexAny(rest, "/?"); end >= 0 {
		rest = rest[:end]
	}
	// User information is not part of the host (setTarget refuses it).
	return rest[strings.LastIndexByte(rest, '@')+1:]
}

// shouldClose: the connection ends after this message (RFC 9112 9.3):
// HTTP/1.1 unless it says close, HTTP/1.0 unless it says keep-alive.
func shouldClose(minor int, h http.Header) bool {
	if headerHas(h, "Connection", "close") {
		return true
	}
	return minor == 0 && !headerHas(h, "Connection", "keep-alive")
}

// parseFields adds the field lines of s to h: each "name: value\r\n",
// the last one followed by the empty line "\r\n" that ends the head.
// Names are canonicalised as net/http does; values lose the blanks
// around them. It reports false, leaving h partly filled, for anything
// but that shape: a line not ending in CRLF, a bare CR, an obs-fold, a
// name that is not a token, a control byte in a value.
func parseFields(s string, h http.Header) bool {
	var backing []string // one value per field, sliced from one allocation
	for {
		i := strings.IndexByte(s, '\n')
		if i < 1 || s[i-1] != '\r' {
			return false
		}
		line := s[:i-1]
		s = s[i+1:]
		if line == "" {
			return s == ""
		}
		colon := strings.IndexByte(line, ':')
		if colon <= 0 {
			return false
		}
		name, value := line[:colon], strings.Trim(line[colon+1:], " \t")
		for j := 0; j < len(name); j++ {
			if !isTchar(name[j]) {
				return false
			}
		}
		for j := 0; j < len(value); j++ {
			if c := value[j]; c < ' ' && c != '\t' || c == 0x7f {
				return false
			}
		}
		key := textproto.CanonicalMIMEHeaderKey(name) // no copy when canonical already
		if vs, ok := h[key]; ok {
			h[key] = append(vs, value)
			continue
		}
		if len(backing) == 0 {
			backing = make([]string, strings.Count(s, "\n")+1)
		}
		backing[0] = value
		h[key] = backing[:1:1]
		backing = backing[1:]
	}
}

// respBody reads a response body of known length from the upstream
// reader. Close does not read the rest: a response the proxy did not
// relay whole ends the upstream connection.
type respBody struct {
	r    *bufio.Reader
	left int64
}

func (b *respBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *respBody) Close() error { return nil }

// readResponse reads the head of the response to req from r, parsing
// it here when it has the common shape (body is then its Body), and
// with http.ReadResponse otherwise.
//
// Every head must fit in r's buffer (nginx refuses heads larger than
// its proxy_buffer_size, 4 or 8 KiB), and what http.ReadResponse would
// read differently from the bytes, or frame in a way RFC 9112 calls
// faulty, is refused (badResponse): the response is not relayed and its
// connection is not used again. A connection that goes back to the
// shared pool after a response framed one way by the proxy and another
// by its backend would hand the rest of that response to the next
// client whose request it carries.
func readResponse(r *bufio.Reader, req *http.Request, body *respBody) (*http.Response, error) {
	n, bareLF, err := peekResponseHead(r)
	if err != nil {
		return nil, err
	}
	head, _ := r.Peek(n)
	if !bareLF && req.Method != http.MethodHead {
		if resp := parseResponse(head, req); resp != nil {
			r.Discard(n)
			*body = respBody{r: r, left: resp.ContentLength}
			resp.Body = body
			return resp, nil
		}
	}
	if err := checkResponseHead(head); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(r, req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode < 100 {
		// ReadResponse takes any three digits, "099" and "+99" too; the
		// proxy would take it for an interim response and read its
		// body as the next response. (Its body is not closed: Close
		// would read it to its end; the connection is not used again.)
		return nil, badResponse("status " + resp.Status[:min(len(resp.Status), 3)] + " below 100")
	}
	return resp, nil
}

// A badResponse is a response head the proxy refuses to relay.
type badResponse string

func (e badResponse) Error() string { return "malformed response: " + string(e) }

// maxInterimResponses bounds the interim (1xx) responses relayed before
// a request's final response: a few are usual (100 Continue, 103 Early
// Hints); Go's HTTP client allows 5.
const maxInterimResponses = 16

// errTooManyInterim: the backend sent more interim responses than
// maxInterimResponses.
var errTooManyInterim = badResponse("more than 16 interim (1xx) responses")

// errResponseHeadTooLarge: the head did not fit in the upstream reader's
// buffer (upReadSize).
var errResponseHeadTooLarge = badResponse("the head is larger than 16 KiB")

// peekResponseHead waits until r's buffer holds a whole response head
// and returns its length, reading nothing, and whether a line of it ends
// in a bare LF (http.ReadResponse reads those, the fast path does not).
// A head that does not fit in the buffer is errResponseHeadTooLarge.
func peekResponseHead(r *bufio.Reader) (n int, bareLF bool, err error) {
	scanned := 0 // bytes of whole lines looked at
	for {
		buf, _ := r.Peek(r.Buffered())
		for {
			i := bytes.IndexByte(buf[scanned:], '\n')
			if i < 0 {
				break
			}
			end := scanned + i
			empty := end == scanned
			if end > scanned && buf[end-1] == '\r' {
				empty = end == scanned+1
			} else {
				bareLF = true
			}
			if scanned > 0 && empty {
				return end + 1, bareLF, nil // the empty line
			}
			scanned = end + 1
		}
		if len(buf) == r.Size() {
			return 0, false, errResponseHeadTooLarge
		}
		if _, err := r.Peek(len(buf) + 1); err != nil && r.Buffered() == len(buf) {
			if errors.Is(err, io.EOF) && len(buf) > 0 {
				return 0, false, io.ErrUnexpectedEOF
			}
			return 0, false, err
		}
	}
}

// checkResponseHead refuses the heads that http.ReadResponse reads
// differently from what a client or the backend may mean by them:
//   - Transfer-Encoding with Content-Length (RFC 9112 6.3: "ought to be
//     handled as an error"; ReadResponse drops the length), and
//     Transfer-Encoding in an HTTP/1.0 response (6.1: the framing is
//     faulty; ReadResponse ignores the coding);
//   - a control byte in the status line (ReadResponse keeps a bare CR
//     in the reason phrase, which a client may take for a line end);
//   - white space between a field name and its colon (RFC 9112 5.1):
//     ReadResponse takes "Content-Length : 5" for a field named
//     "Content-Length " (go.dev/issue/34540), which frames nothing, and
//     would read to the connection's close a body its backend framed by
//     that length (or chunked).
//
// Field values need no check here: ReadResponse refuses control bytes
// in them.
func checkResponseHead(head []byte) error {
	line, rest, _ := bytes.Cut(head, []byte{'\n'})
	line = bytes.TrimSuffix(line, []byte{'\r'})
	for _, c := range line {
		if c < ' ' && c != '\t' || c == 0x7f {
			return badResponse("a control byte in the status line")
		}
	}
	var te, cl bool
	for len(rest) > 0 {
		var field []byte
		field, rest, _ = bytes.Cut(rest, []byte{'\n'})
		name, _, ok := bytes.Cut(field, []byte{':'})
		if !ok {
			continue
		}
		if len(name) > 0 && (name[len(name)-1] == ' ' || name[len(name)-1] == '\t') && name[0] != ' ' && name[0] != '\t' {
			// (A line that starts with white space continues the one
			// before it, obs-fold, which ReadResponse joins to it.)
			return badResponse("white space before the colon of field " + strconv.Quote(string(bytes.TrimRight(name, " \t"))))
		}
		switch {
		case asciiEqualFold(string(name), "Transfer-Encoding"):
			te = true
		case asciiEqualFold(string(name), "Content-Length"):
			cl = true
		}
	}
	switch {
	case te && cl:
		return badResponse("Transfer-Encoding and Content-Length together")
	case te && bytes.HasPrefix(head, []byte("HTTP/1.0")):
		return badResponse("Transfer-Encoding in an HTTP/1.0 response")
	}
	return nil
}

// parseResponse makes the response of head as http.ReadResponse would,
// if it has the common shape, else nil.
func parseResponse(head []byte, req *http.Request) *http.Response {
	// "HTTP/1.x NNN", then a reason phrase after a space, or nothing.
	if len(head) < 12 || string(head[:7]) != "HTTP/1." || head[7] != '0' && head[7] != '1' || head[8] != ' ' ||
		!isDigit(head[9]) || !isDigit(head[10]) || !isDigit(head[11]) {
		return nil
	}
	code := int(head[9]-'0')*100 + int(head[10]-'0')*10 + int(head[11]-'0')
	if code < 200 || !bodyAllowed(code) {
		return nil
	}
	s := string(head)
	i := strings.Index(s, "\r\n")
	line, fields := s[:i], s[i+2:]
	if len(line) > 12 && line[12] != ' ' {
		return nil
	}
	for j := 13; j < len(line); j++ {
		if c := line[j]; c < ' ' && c != '\t' || c == 0x7f {
			return nil
		}
	}
	resp := &http.Response{Status: line[9:], StatusCode: code, Proto: line[:8], ProtoMajor: 1, ProtoMinor: int(head[7] - '0'), Request: req}
	resp.Header = make(http.Header, strings.Count(fields, "\n"))
	if !parseFields(fields, resp.Header) {
		return nil
	}
	if _, ok := resp.Header["Transfer-Encoding"]; ok {
		return nil
	}
	cl := resp.Header["Content-Length"]
	if len(cl) != 1 {
		return nil
	}
	n := int64(0)
	if len(cl[0]) == 0 || len(cl[0]) > 18 {
		return nil
	}
	for j := 0; j < len(cl[0]); j++ {
		c := cl[0][j]
		if !isDigit(c) {
			return nil
		}
		n = n*10 + int64(c-'0')
	}
	if n == 0 {
		return nil // Response.Write and ReadResponse have their own rules for empty bodies
	}
	resp.ContentLength = n
	resp.Close = shouldClose(resp.ProtoMinor, resp.Header)
	if resp.Close && resp.ProtoMinor == 1 {
		delete(resp.Header, "Connection") // as ReadResponse does
	}
	return resp
}
