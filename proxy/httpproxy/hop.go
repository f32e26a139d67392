package httpproxy

import (
	"crypto/sha1"
	"encoding/base64"
	"io"
	"net/http"
	"net/textproto"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// hopByHop are the fields that concern one connection only, which a
// proxy removes before forwarding a message either way (RFC 9110 7.6.1:
// Connection and the fields it names, Proxy-Connection, Keep-Alive, TE,
// Transfer-Encoding, Upgrade; and, from RFC 2616's list that
// intermediaries still follow, Trailer, Proxy-Authenticate and
// Proxy-Authorization: credentials meant for the gateway never go on).
// Transfer-Encoding and Content-Length are not in the header the proxy
// writes anyway: the proxy writes the framing it chose (head.go).
var hopByHop = []string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
	"Proxy-Authenticate",
	"Proxy-Authorization",
}

// removeHopByHop deletes from h the hop-by-hop fields and every field
// Connection names. The usual Connection values (keep-alive, close,
// upgrade) cost no allocation.
func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for v != "" {
			var name string
			name, v, _ = strings.Cut(v, ",")
			if name = textproto.TrimString(name); name != "" && !isHopByHop(name) {
				deleteField(h, name)
			}
		}
	}
	for _, name := range hopByHop {
		delete(h, name)
	}
}

// deleteField is h.Del(name) without allocating a canonical name: the
// keys of a parsed header are canonical tokens, so the one h.Del removes
// is the key equal to name but for ASCII case.
func deleteField(h http.Header, name string) {
	for k := range h {
		if asciiEqualFold(k, name) {
			delete(h, k)
		}
	}
}

func asciiEqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if lower(a[i]) != lower(b[i]) {
			return false
		}
	}
	return true
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// isHopByHop: name is one of hopByHop (deleted anyway), in any case.
func isHopByHop(name string) bool {
	for _, h := range hopByHop {
		if asciiEqualFold(name, h) {
			return true
		}
	}
	return false
}

// removeTrailerFields deletes from a response's trailer section (or
// from the names its Trailer field announced) the fields that must not
// be trailers (RFC 9110 6.5.1): hop-by-hop ones, and those that frame,
// route, authenticate or describe the message, net/http's list
// (httpguts.ValidTrailerHeader: Content-Length, Transfer-Encoding, Host,
// Content-Type, Authorization, If-*, ...). A client that merges
// trailers into the header section would read a length, a coding or a
// host the head never had.
func removeTrailerFields(h http.Header) {
	for k := range h {
		if isHopByHop(k) || !httpguts.ValidTrailerHeader(k) {
			delete(h, k)
		}
	}
}

// trailerFilter is the body of a chunked response with a trailer
// section: net/http reads the section into trailer, the map
// Response.Write writes it from, before the body's EOF, and at the EOF
// the filter removes what must not go on (removeTrailerFields).
type trailerFilter struct {
	io.ReadCloser
	trailer http.Header
}

func (f *trailerFilter) Read(p []byte) (int, error) {
	n, err := f.ReadCloser.Read(p)
	if err == io.EOF {
		removeTrailerFields(f.trailer)
	}
	return n, err
}

// headerHas: a field key of h lists token (comma-separated, any case).
func headerHas(h http.Header, key, token string) bool {
	for _, v := range h[key] {
		for v != "" {
			var t string
			t, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// lookalikeFields are request fields that frame the message, route it or
// tell the backend who the client is. Spelled with "_" for "-"
// ("Content_Length", "X_Forwarded_For"), a field is a different one to
// the proxy, but a backend that maps names to CGI-style variables
// (HTTP_X_FORWARDED_FOR, CONTENT_LENGTH: WSGI, PHP-FPM, gunicorn before
// 22) reads it as the real one: a client's spoofed address beside the
// one the proxy adds, or a body length the proxy did not frame the
// request by. nginx drops every field with an underscore by default; the
// proxy drops these only.
var lookalikeFields = []string{"Content-Length", "Transfer-Encoding", "Host", "Connection", "Upgrade", "Expect",
	"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Scheme", "X-Forwarded-Ssl",
	"X-Real-Ip", "Forwarded", "Via", "X-Original-Url", "X-Rewrite-Url"}

// routeOverrides are request fields that some backends take the path
// from instead of the request line (Symfony and IIS: X-Original-URL,
// X-Rewrite-URL, meant to be set by a proxy in front). A client's would
// take its request past the deny routes: such a backend serves GET /a/
// with "X-Original-URL: /admin/" as /admin/. Likewise the host: a
// backend that trusts the gateway as its proxy (it sends
// X-Forwarded-For) takes the host from X-Forwarded-Host, or from
// Forwarded's host=, instead of Host (Symfony's and Laravel's
// Request::getHost, which their host and domain routes match), so a
// client's "Host: www.example" with "X-Forwarded-Host: admin.example"
// reached the routes of a host the gateway denies. Forwarded's for= is
// the client address to such a backend too, and the proxy adds no
// element of its own after a client's; so is X-Real-IP, which the proxy
// does not set (nginx's real_ip_header X-Real-IP, trusting the gateway,
// took a client's spoofed address for its allow-lists). And so are the
// scheme and port fields (X-Forwarded-Proto, -Port, -Scheme, -Ssl), which
// the proxy does not set either: it speaks plain HTTP, and a backend
// that reads them (Rack does for the scheme whoever sent them) took a
// client's "X-Forwarded-Proto: https" for a TLS connection, skipping its
// redirect to https and building its absolute URLs, and the redirects a
// cache behind it keeps, with the client's scheme and port.
var routeOverrides = []string{"X-Original-Url", "X-Rewrite-Url", "X-Forwarded-Host", "Forwarded", "X-Real-Ip",
	"X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Scheme", "X-Forwarded-Ssl"}

// removeLookalikes deletes from a request's fields the routeOverrides
// and those that read as one of lookalikeFields with "_" taken for "-".
// It allocates nothing.
func removeLookalikes(h http.Header) {
	for _, f := range routeOverrides {
		delete(h, f)
	}
	for k := range h {
		if strings.IndexByte(k, '_') < 0 {
			continue
		}
		for _, f := range lookalikeFields {
			if sameUnderscored(k, f) {
				delete(h, k)
				break
			}
		}
	}
}

// sameUnderscored reports whether name is field in any case, with "_"
// for any "-".
func sameUnderscored(name, field string) bool {
	if len(name) != len(field) {
		return false
	}
	for i := range len(name) {
		a, b := name[i], field[i]
		if a == '_' {
			a = '-'
		}
		if a == b || a|0x20 == b|0x20 && 'a' <= b|0x20 && b|0x20 <= 'z' {
			continue
		}
		return false
	}
	return true
}

// upgradeAgreed: the Upgrade field of a 101 response (resp) names at
// least one protocol, and only protocols the request (req) offered,
// compared by name without case (a version after "/" is not compared:
// "websocket/13" offered, "websocket" switched to).
func upgradeAgreed(req, resp http.Header) bool {
	n := 0
	for _, v := range resp["Upgrade"] {
		for v != "" {
			var t string
			t, v, _ = strings.Cut(v, ",")
			if t = strings.TrimSpace(t); t == "" {
				continue
			}
			if !headerHasProtocol(req, protocolName(t)) {
				return false
			}
			n++
		}
	}
	return n > 0
}

// headerHasProtocol: h's Upgrade field lists a protocol of this name
// (any version, any case).
func headerHasProtocol(h http.Header, name string) bool {
	for _, v := range h["Upgrade"] {
		for v != "" {
			var t string
			t, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(protocolName(strings.TrimSpace(t)), name) {
				return true
			}
		}
	}
	return false
}

// protocolName is an Upgrade token's protocol-name: without its
// "/" protocol-version (RFC 9110 7.8).
func protocolName(t string) string {
	name, _, _ := strings.Cut(t, "/")
	return name
}

// websocketAccept is the Sec-WebSocket-Accept a WebSocket server answers
// a handshake with key with (RFC 6455 4.2.2).
func websocketAccept(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}
