package httpproxy

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// The proxy writes the heads of what it forwards itself, into the
// exchange's send buffer: net/http's Request.Write and Response.Write
// format with fmt, allocate a transfer writer and a sorted copy of the
// header per message, and were a tenth of the CPU a small response cost
// (pprof, 4 KiB responses). The bytes are the ones net/http writes for
// the messages the proxy forwards (field order included: framing first,
// then the fields sorted by name), but for a status line without a
// reason phrase, which net/http repeats the code in.

// scratch is a connection's memory for writing heads: numbers are
// formatted in num, a body is limited by body.
type scratch struct {
	num  [32]byte
	body io.LimitedReader
}

// writeRequest writes req, as readRequest left it, to out: the request
// line in origin form (or "*"), Host, User-Agent when not empty, the
// framing of the body (Connection: close when req.Close), the other
// fields, and the body, chunked again when it came chunked. A body that
// ends early is an error, as with req.Write.
func writeRequest(out *sendBuf, req *http.Request, s *scratch) error {
	target := req.URL.Opaque
	if target == "" || strings.HasPrefix(target, "//") || req.URL.Scheme != "" || req.URL.Host != "" || req.URL.Path != "" {
		// Not a target setTarget made: net/http knows the other forms.
		return req.Write(out)
	}
	query := req.URL.ForceQuery || req.URL.RawQuery != ""
	if containsCTL(target) || containsCTL(req.URL.RawQuery) || containsCTL(req.Method) || containsCTL(req.Host) {
		return fmt.Errorf("a control character in the request line or Host of %s %q", req.Method, target)
	}
	out.WriteString(req.Method)
	out.WriteByte(' ')
	out.WriteString(target)
	if query {
		out.WriteByte('?')
		out.WriteString(req.URL.RawQuery)
	}
	out.WriteString(" HTTP/1.1\r\nHost: ")
	out.WriteString(req.Host)
	out.WriteString("\r\n")
	if ua := req.Header["User-Agent"]; len(ua) > 0 {
		if v := strings.Trim(ua[0], " \t"); v != "" {
			writeField(out, "User-Agent", v)
		}
	}
	if req.Close && !headerHas(req.Header, "Connection", "close") {
		out.WriteString("Connection: close\r\n")
	}
	chunked := len(req.TransferEncoding) > 0 && req.TransferEncoding[0] == "chunked"
	switch {
	case chunked:
		out.WriteString("Transfer-Encoding: chunked\r\n")
	case req.ContentLength > 0 || req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch:
		// A zero Content-Length too for the methods that usually
		// have a body, as net/http sends it: some servers want one.
		writeContentLength(out, req.ContentLength, s)
	}
	writeFields(out, req.Header, isRequestFraming)
	out.WriteString("\r\n")
	switch {
	case req.Body == nil || req.Body == http.NoBody:
		return out.err
	case chunked:
		_, err := io.Copy(chunkWriter{out, s}, req.Body)
		if err == nil {
			_, err = out.WriteString("0\r\n\r\n")
		}
		return err
	default:
		return copyBody(out, req.Body, req.ContentLength, s)
	}
}

// writeResponse writes resp to out, as Response.Write would. It writes the
// common response itself (a body of known, non-zero length, no trailer,
// not to HEAD) and leaves the others to Response.Write, whose rules for
// them (an empty body, a body up to the connection's close, trailers)
// are what a client expects.
func writeResponse(out *sendBuf, resp *http.Response, s *scratch) error {
	if resp.Request != nil && resp.Request.Method == http.MethodHead && resp.ContentLength < 0 &&
		len(resp.TransferEncoding) == 0 && resp.Trailer == nil {
		// Response.Write says "Connection: close" for an HTTP/1.1
		// response without a length, whose body would end at the
		// close; one to HEAD has no body, and the connection stays
		// (resp.Close says when it does not): told to close, the
		// client would take a request it pipelined for unanswered.
		writeStatusLine(out, resp, s)
		if resp.Close && !headerHas(resp.Header, "Connection", "close") {
			out.WriteString("Connection: close\r\n")
		}
		writeFields(out, resp.Header, isResponseFraming)
		_, err := out.WriteString("\r\n")
		return err
	}
	if resp.ContentLength <= 0 || len(resp.TransferEncoding) > 0 || resp.Trailer != nil ||
		resp.Request != nil && resp.Request.Method == http.MethodHead || !bodyAllowed(resp.StatusCode) {
		return resp.Write(out)
	}
	writeStatusLine(out, resp, s)
	if resp.Close && !headerHas(resp.Header, "Connection", "close") {
		out.WriteString("Connection: close\r\n")
	}
	writeContentLength(out, resp.ContentLength, s)
	writeFields(out, resp.Header, isResponseFraming)
	out.WriteString("\r\n")
	return copyBody(out, resp.Body, resp.ContentLength, s)
}

// writeHead writes a response's status line and header, without framing
// of its own (the caller set what the header must say); a write error
// shows at the next Flush.
func writeHead(out *sendBuf, resp *http.Response, s *scratch) {
	writeStatusLine(out, resp, s)
	writeFields(out, resp.Header, nil)
	out.WriteString("\r\n")
}

// writeStatusLine writes "HTTP/x.y NNN reason": the reason is what
// follows the code in resp.Status (empty when the backend sent none).
func writeStatusLine(out *sendBuf, resp *http.Response, s *scratch) {
	b := append(s.num[:0], "HTTP/"...)
	b = strconv.AppendInt(b, int64(resp.ProtoMajor), 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(resp.ProtoMinor), 10)
	b = append(b, ' ')
	code := resp.StatusCode
	if code < 100 || code > 999 {
		code = 999 // ReadResponse takes three digits only
	}
	b = append(b, byte('0'+code/100), byte('0'+code/10%10), byte('0'+code%10), ' ')
	out.Write(b)
	reason := resp.Status
	if len(reason) >= 3 && reason[:3] == string(b[len(b)-4:len(b)-1]) {
		reason = strings.TrimPrefix(reason[3:], " ")
	} else if reason == "" {
		reason = http.StatusText(resp.StatusCode)
	}
	out.WriteString(reason)
	out.WriteString("\r\n")
}

func writeContentLength(out *sendBuf, n int64, s *scratch) {
	b := append(s.num[:0], "Content-Length: "...)
	b = strconv.AppendInt(b, n, 10)
	out.Write(append(b, '\r', '\n'))
}

// maxSortedFields is how many field names writeFields sorts on the
// stack; a header with more is written through a heap slice.
const maxSortedFields = 48

// writeFields writes h's fields but those skip names, sorted by name as
// net/http writes them (a backend sees the same order whatever order the
// client used). Names that are not tokens are dropped, as net/http does;
// a value's CR and LF become spaces and its outer blanks go.
func writeFields(out *sendBuf, h http.Header, skip func(string) bool) {
	var stack [maxSortedFields]string
	names := stack[:0]
	for k := range h {
		if (skip == nil || !skip(k)) && validFieldName(k) {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	for _, k := range names {
		for _, v := range h[k] {
			writeField(out, k, v)
		}
	}
}

func writeField(out *sendBuf, name, value string) {
	out.WriteString(name)
	out.WriteString(": ")
	value = strings.Trim(value, " \t")
	if strings.ContainsAny(value, "\r\n") {
		value = strings.NewReplacer("\r", " ", "\n", " ").Replace(value)
	}
	out.WriteString(value)
	out.WriteString("\r\n")
}

// isRequestFraming: the fields writeRequest writes itself.
func isRequestFraming(k string) bool {
	switch k {
	case "Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer":
		return true
	}
	return false
}

// isResponseFraming: the fields writeResponse writes itself.
func isResponseFraming(k string) bool {
	switch k {
	case "Content-Length", "Transfer-Encoding", "Trailer":
		return true
	}
	return false
}

// bodyAllowed: a response with this status may have a body (RFC 9110:
// not 1xx, 204, 304).
func bodyAllowed(code int) bool {
	return code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
}

// copyBody copies exactly n bytes of body to out; fewer is an error.
func copyBody(out *sendBuf, body io.Reader, n int64, s *scratch) error {
	s.body = io.LimitedReader{R: body, N: n}
	m, err := out.ReadFrom(&s.body)
	s.body.R = nil
	if err == nil && m < n {
		err = fmt.Errorf("a body of Content-Length %d ended after %d bytes: %w", n, m, io.ErrUnexpectedEOF)
	}
	return err
}

// chunkWriter writes what it is given as one chunk.
type chunkWriter struct {
	out *sendBuf
	s   *scratch
}

func (w chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil // an empty chunk would end the body
	}
	b := strconv.AppendInt(w.s.num[:0], int64(len(p)), 16)
	w.out.Write(append(b, '\r', '\n'))
	w.out.Write(p)
	_, err := w.out.WriteString("\r\n")
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func containsCTL(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c == 0x7f {
			return true
		}
	}
	return false
}

// validFieldName: name is a token (RFC 9110 5.6.2).
func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if !isTchar(name[i]) {
			return false
		}
	}
	return true
}
