package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"spliced/config"
)

// Limits of a request head. nginx allows about 32 KiB by default, Go's
// server 1 MiB; a head is read into memory before anything is decided,
// so it is bounded.
const (
	maxHeadBytes = 64 << 10
	maxHeadLines = 200
	// maxEmptyLines is how many empty lines before a request line are
	// skipped (RFC 9112 section 2.2: some clients send a CRLF after a
	// POST body).
	maxEmptyLines = 4
)

// requestError is a request the proxy refuses: the client gets status
// and the connection closes.
type requestError struct {
	status int
	reason string
}

func (e *requestError) Error() string { return e.reason }

func badRequest(format string, args ...any) error {
	return &requestError{status: http.StatusBadRequest, reason: fmt.Sprintf(format, args...)}
}

// request is a request as the proxy routes and forwards it: the
// http.Request is what goes to the backend (writeRequest), host and path
// what it was routed on; they are the same values, so a backend sees
// exactly the target the proxy decided on.
type request struct {
	*http.Request
	host string // lower case, without a trailing dot; the port kept
	path string // normalised (normalizePath); "*" for OPTIONS *
	// alt are the other ways a backend might read path (path
	// parameters dropped, %2F or %5C taken as a slash): each must route
	// like path, or the request is refused as ambiguous.
	alt []string
	// upgrade: the client asks for a protocol switch (WebSocket) that
	// the proxy passes on; the Upgrade and Connection fields are kept
	// for it, and only a 101 response makes the connection a tunnel.
	upgrade bool
	// body reads the request body from the client (nil: none), and
	// tells whether it failed.
	body bodyReader
}

// readRequest reads one request from r: its head strictly (readHead,
// checkHead), its body framed by the proxy itself (a Content-Length, or
// chunked, never both; see body.go), its target normalised
// (normalizePath), its hop-by-hop fields removed. It returns io.EOF when
// the client closed between requests, a *requestError for a request to
// refuse, and other errors from the connection.
//
// net/http alone (http.ReadRequest) accepts, among others: Content-Length
// with Transfer-Encoding (it drops the Content-Length), repeated equal
// Content-Length fields, Transfer-Encoding on an HTTP/1.0 request
// (ignored: the chunked body would be read as the next request), obs-fold,
// bare LF line ends, "Transfer-Encoding : chunked" (a field named
// "Transfer-Encoding " that it would forward), chunk sizes followed by
// spaces, HTTP/1.1 without Host, "HTTP/2.0" on a 1.x request line, and
// paths with dot segments, which it neither resolves nor rejects. So the
// head is checked here first, and parsed (parseRequest, as ReadRequest
// would) only when it passed.
//
// A head that fits in r's buffer (the common case) is checked and parsed
// where it lies (peekHead); a longer one is read into memory first.
func readRequest(r *bufio.Reader) (*request, error) {
	var f headFacts
	var req *http.Request
	n, empty, err := peekHead(r)
	switch {
	case err != nil:
		return nil, err
	case n > 0:
		head, _ := r.Peek(n)
		if f, err = checkHead(head); err != nil {
			return nil, err
		}
		if req, err = parseRequest(head, &f); err != nil {
			return nil, err
		}
		r.Discard(n)
	default:
		head, err := readHead(r, empty)
		if err != nil {
			return nil, err
		}
		if f, err = checkHead(head); err != nil {
			return nil, err
		}
		if req, err = parseRequest(head, &f); err != nil {
			return nil, err
		}
	}
	rq := &request{Request: req}
	// RequestURI is the target checkRequestLine checked: both split
	// the request line at its two single spaces.
	if err := rq.setTarget(req.RequestURI); err != nil {
		return nil, err
	}
	if err := rq.setHost(&f); err != nil {
		return nil, err
	}
	// The body: the proxy reads it from the connection with its own
	// strict framing.
	req.Trailer = nil // request trailers are dropped (RFC 9110 6.5.1 allows it)
	switch {
	case f.chunked:
		rq.body = &chunkedReader{r: r}
		req.Body = io.NopCloser(rq.body)
		req.ContentLength = -1
		req.TransferEncoding = []string{"chunked"}
	case f.length > 0:
		rq.body = &lengthReader{r: r, left: f.length}
		req.Body = io.NopCloser(rq.body)
		req.ContentLength = f.length
		req.TransferEncoding = nil
	default:
		req.Body = http.NoBody
		req.ContentLength = 0
		req.TransferEncoding = nil
	}
	rq.upgrade = req.ProtoAtLeast(1, 1) && headerHas(req.Header, "Connection", "upgrade") && req.Header.Get("Upgrade") != ""
	upgradeTo := req.Header.Values("Upgrade")
	if rq.upgrade && headerHasProtocol(req.Header, "h2c") {
		// An h2c upgrade would make the connection HTTP/2 to one
		// backend, every later stream unrouted: it is not passed on
		// (the request is served in HTTP/1.1, as RFC 9113 allows), in
		// any version ("h2c/1": a 101 naming h2c agrees to it).
		rq.upgrade = false
	}
	removeHopByHop(req.Header)
	removeLookalikes(req.Header)
	delete(req.Header, "Http2-Settings") // as net/http's parser spells it
	if rq.upgrade {
		req.Header["Connection"] = []string{"Upgrade"}
		req.Header["Upgrade"] = upgradeTo
	}
	if _, ok := req.Header["User-Agent"]; !ok {
		// req.Write would add Go's own (writeRequest falls back on it
		// for targets it does not know); a proxy adds nothing.
		req.Header["User-Agent"] = []string{""}
	}
	return rq, nil
}

// setTarget normalises the request target and makes it the one writeRequest
// sends, in origin form.
func (rq *request) setTarget(target string) error {
	req := rq.Request
	if strings.ContainsAny(target, "#") {
		return badRequest("request target with a fragment")
	}
	switch {
	case req.Method == http.MethodConnect:
		return &requestError{status: http.StatusMethodNotAllowed, reason: "CONNECT: the gateway is not a forward proxy"}
	case target == "*":
		if req.Method != http.MethodOptions {
			return badRequest("asterisk-form target with %s", req.Method)
		}
		rq.path = "*"
		req.URL = &url.URL{Opaque: "*"}
		return nil
	case target[0] != '/':
		// absolute-form (RFC 9112 3.2.2): its authority replaces Host,
		// which parseRequest did; the path is read like origin-form.
		i := strings.Index(target, "://")
		if i < 0 || !strings.EqualFold(target[:i], "http") && !strings.EqualFold(target[:i], "https") {
			return badRequest("request target %q is neither a path nor an http URI", target)
		}
		rest := target[i+3:]
		end := strings.IndexAny(rest, "/?")
		if end < 0 {
			end = len(rest)
		}
		if auth := rest[:end]; auth == "" || strings.Contains(auth, "@") {
			return badRequest("absolute URI without a host, or with user information")
		}
		target = rest[end:]
		if target == "" && req.Method == http.MethodOptions {
			// The server in general, as "OPTIONS *": the last proxy
			// sends it so (RFC 9112 3.2.4), not as a request for /.
			rq.path = "*"
			req.URL = &url.URL{Opaque: "*"}
			return nil
		}
		if target == "" || target[0] == '?' {
			target = "/" + target
		}
	}
	p, query, hasQuery := strings.Cut(target, "?")
	norm, alt, err := normalizePath(p)
	if err != nil {
		return err
	}
	rq.path, rq.alt = norm, alt
	// Opaque is sent as it is: the normalised path, then the query as
	// the client sent it.
	req.URL = &url.URL{Opaque: norm, RawQuery: query, ForceQuery: hasQuery && query == ""}
	return nil
}

// setHost checks and normalises the host the request is routed on:
// the absolute-form target's authority or else Host (parseRequest chose
// it), lower case, a trailing dot of a name removed (a.example. and
// a.example are the same host to DNS and to nginx).
func (rq *request) setHost(f *headFacts) error {
	req := rq.Request
	if req.ProtoAtLeast(1, 1) && f.hosts == 0 {
		return badRequest("HTTP/1.1 request without Host")
	}
	host := strings.ToLower(req.Host)
	if !validHost(host) {
		return badRequest("invalid host %q", req.Host)
	}
	name, port := host, ""
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.HasSuffix(host, "]") {
		name, port = host[:i], host[i:]
	}
	name = strings.TrimSuffix(name, ".")
	if !strings.HasPrefix(name, "[") && (strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".") || strings.Contains(name, "..")) {
		return badRequest("invalid host %q: an empty label", req.Host)
	}
	if strings.HasPrefix(name, "[") {
		// An IP literal is an IPv6 address (RFC 3986 3.2.2): "[]",
		// "[10.9.9.9]" or "[10.9.2313]" are none, and a backend that
		// takes the brackets off reads the last as 10.9.9.9
		// (inet_aton), past the check below and a route for it.
		if a, err := netip.ParseAddr(name[1 : len(name)-1]); err != nil || !a.Is6() {
			return badRequest("invalid host %q: not an IPv6 address in brackets", req.Host)
		}
	} else if config.EndsInNumber(name) {
		if a, err := netip.ParseAddr(name); err != nil || !a.Is4() {
			return badRequest("invalid host %q: an IPv4 address must be written as four decimal numbers without leading zeros (10.0.0.5)", req.Host)
		}
	}
	rq.host = name + port
	req.Host = rq.host
	return nil
}

// validHost: empty, or a reg-name or IPv4 address, or an IPv6 literal in
// brackets, then an optional :port. Percent-encoding and user
// information are refused.
func validHost(h string) bool {
	if h == "" {
		return true
	}
	name := h
	if strings.HasPrefix(h, "[") {
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return false
		}
		for _, c := range []byte(h[1:end]) {
			if !isHex(c) && c != ':' && c != '.' {
				return false
			}
		}
		name = ""
		h = h[end+1:]
		if h != "" && h[0] != ':' {
			return false
		}
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 {
		name, h = h[:i], h[i:]
	} else {
		h = ""
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~') {
			return false
		}
	}
	if h != "" { // ":port"
		port := h[1:]
		if port == "" || len(port) > 5 {
			return false
		}
		for _, c := range []byte(port) {
			if c < '0' || c > '9' {
				return false
			}
		}
	}
	return true
}

// peekHead waits until r's buffer holds a whole request head, the
// request line through the empty line that ends it, and returns its
// length, reading nothing more: r.Peek(n) is the head. Empty lines before
// the request line are skipped (a few; empty says how many). n is 0 when
// the head does not fit in r's buffer: readHead reads it then. io.EOF
// means the client closed before a request began. The limits and errors
// are readHead's.
func peekHead(r *bufio.Reader) (n, empty int, err error) {
	scanned, lines := 0, 0 // bytes of whole lines looked at; lines of the head
	for {
		buf, _ := r.Peek(r.Buffered())
		for {
			i := bytes.IndexByte(buf[scanned:], '\n')
			if i < 0 {
				break
			}
			line := buf[scanned : scanned+i+1]
			scanned += i + 1
			if lines == 0 && string(line) == "\r\n" && empty < maxEmptyLines {
				empty++
				r.Discard(2)
				buf, scanned = buf[2:], scanned-2
				continue
			}
			lines++
			if lines > 1 && (string(line) == "\r\n" || string(line) == "\n") {
				return scanned, empty, nil
			}
			if lines > maxHeadLines {
				return 0, empty, &requestError{status: http.StatusRequestHeaderFieldsTooLarge, reason: fmt.Sprintf("request head over %d lines", maxHeadLines)}
			}
		}
		if len(buf) == r.Size() {
			return 0, empty, nil // longer than the buffer
		}
		if _, err := r.Peek(len(buf) + 1); err != nil && r.Buffered() == len(buf) {
			if errors.Is(err, io.EOF) && len(buf) > 0 {
				return 0, empty, badRequest("incomplete request head")
			}
			return 0, empty, err
		}
	}
}

// readHead reads a request head, the request line through the empty line
// that ends it, and nothing more: the body and any pipelined request stay
// in r. Empty lines before the request line are skipped (a few, less the
// empty already skipped). io.EOF means the client closed before a request
// began.
func readHead(r *bufio.Reader, empty int) ([]byte, error) {
	var head []byte
	lines := 0
	for {
		line, err := r.ReadSlice('\n')
		head = append(head, line...)
		if len(head) > maxHeadBytes {
			return nil, &requestError{status: http.StatusRequestHeaderFieldsTooLarge, reason: fmt.Sprintf("request head over %d bytes", maxHeadBytes)}
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue // a line longer than the buffer: read on
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(head) > 0 {
				return nil, badRequest("incomplete request head")
			}
			return nil, err
		}
		line = head[bytes.LastIndexByte(head[:len(head)-1], '\n')+1:]
		if lines == 0 && string(line) == "\r\n" && empty < maxEmptyLines {
			empty++
			head = head[:0]
			continue
		}
		lines++
		if lines > 1 && (string(line) == "\r\n" || string(line) == "\n") {
			return head, nil
		}
		if lines > maxHeadLines {
			return nil, &requestError{status: http.StatusRequestHeaderFieldsTooLarge, reason: fmt.Sprintf("request head over %d lines", maxHeadLines)}
		}
	}
}

// headFacts is what checkHead learned from a head.
type headFacts struct {
	http10  bool  // the version is HTTP/1.0
	hosts   int   // Host fields
	chunked bool  // Transfer-Encoding: chunked
	length  int64 // Content-Length, 0 when absent
}

// checkHead checks a request head against RFC 9112 strictly, refusing
// what a parser in front of or behind the proxy could read another way:
//   - every line ends in CRLF: a bare LF or a bare CR is refused (2.2);
//   - request line: method SP target SP HTTP/1.0 or HTTP/1.1, single
//     spaces, no control bytes (3); other versions get 505;
//   - field lines: a token name, a colon with no space before it (5.1),
//     no obs-fold (5.2), no CR, LF, NUL or other control byte in a value
//     (RFC 9110 5.5);
//   - framing (6): Transfer-Encoding must be exactly "chunked" (any case),
//     in one field, never in an HTTP/1.0 request, never with
//     Content-Length; Content-Length one field of digits. Those two fields
//     may have one space after the colon and nothing else around the
//     value: legitimate senders write them so, and the variants are what
//     desynchronisation attacks use;
//   - at most one Host.
//
// A head that passes costs no allocation.
func checkHead(head []byte) (headFacts, error) {
	var f headFacts
	var te, cl int
	for n := 0; len(head) > 0; n++ {
		i := bytes.IndexByte(head, '\n')
		line := head[:i+1]
		head = head[i+1:]
		if i == 0 || line[i-1] != '\r' {
			return f, badRequest("line ending in a bare LF")
		}
		line = line[:i-1]
		if bytes.IndexByte(line, '\r') >= 0 {
			return f, badRequest("bare CR in a line")
		}
		if n == 0 {
			if err := checkRequestLine(line, &f); err != nil {
				return f, err
			}
			continue
		}
		if len(line) == 0 {
			break // the end of the head
		}
		if line[0] == ' ' || line[0] == '\t' {
			return f, badRequest("obs-fold (a field line continued on the next line)")
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return f, badRequest("field line without a name and colon: %q", truncate(line))
		}
		name, value := line[:colon], line[colon+1:]
		for _, c := range name {
			if !isTchar(c) {
				return f, badRequest("invalid field name %q", truncate(name))
			}
		}
		for _, c := range value {
			if c < ' ' && c != '\t' || c == 0x7f {
				return f, badRequest("control byte in field %s", name)
			}
		}
		switch {
		case bytes.EqualFold(name, []byte("Host")):
			f.hosts++
			if f.hosts > 1 {
				return f, badRequest("more than one Host")
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			te++
			if v := strictValue(value); !bytes.EqualFold(v, []byte("chunked")) {
				return f, badRequest("Transfer-Encoding %q: only a single \"chunked\" is accepted", truncate(value))
			}
			f.chunked = true
		case bytes.EqualFold(name, []byte("Content-Length")):
			cl++
			v := strictValue(value)
			if len(v) == 0 || len(v) > 18 || !allDigits(v) {
				return f, badRequest("invalid Content-Length %q", truncate(value))
			}
			for _, c := range v {
				f.length = f.length*10 + int64(c-'0')
			}
		}
	}
	switch {
	case te > 1:
		return f, badRequest("more than one Transfer-Encoding")
	case cl > 1:
		return f, badRequest("more than one Content-Length")
	case te > 0 && cl > 0:
		return f, badRequest("both Transfer-Encoding and Content-Length")
	case te > 0 && f.http10:
		return f, badRequest("Transfer-Encoding in an HTTP/1.0 request")
	}
	return f, nil
}

// checkRequestLine checks method SP request-target SP HTTP-version and
// notes an HTTP/1.0 version in f.
func checkRequestLine(line []byte, f *headFacts) error {
	method, rest, ok1 := bytes.Cut(line, []byte(" "))
	target, version, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 || len(method) == 0 || len(target) == 0 || bytes.IndexByte(version, ' ') >= 0 {
		return badRequest("malformed request line %q", truncate(line))
	}
	for _, c := range method {
		if !isTchar(c) {
			return badRequest("invalid method %q", truncate(method))
		}
	}
	for _, c := range target {
		if c <= ' ' || c == 0x7f {
			return badRequest("control byte in the request target")
		}
	}
	switch {
	case string(version) == "HTTP/1.1":
	case string(version) == "HTTP/1.0":
		f.http10 = true
	default:
		if len(version) == 8 && bytes.HasPrefix(version, []byte("HTTP/")) && isDigit(version[5]) && version[6] == '.' && isDigit(version[7]) {
			return &requestError{status: http.StatusHTTPVersionNotSupported, reason: "version " + string(version)}
		}
		return badRequest("malformed HTTP version %q", truncate(version))
	}
	return nil
}

// strictValue returns a framing field's value: one optional space after
// the colon, and nothing else around it (anything else returns nothing,
// which no caller accepts).
func strictValue(v []byte) []byte {
	v = bytes.TrimPrefix(v, []byte(" "))
	if len(v) == 0 || v[0] == ' ' || v[0] == '\t' || v[len(v)-1] == ' ' || v[len(v)-1] == '\t' {
		return nil
	}
	return v
}

func allDigits(b []byte) bool {
	for _, c := range b {
		if !isDigit(c) {
			return false
		}
	}
	return true
}

func truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isHex(c byte) bool { return isDigit(c) || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

// isTchar: a byte of a token (RFC 9110 5.6.2).
func isTchar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', isDigit(c):
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
