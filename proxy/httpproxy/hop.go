package httpproxy

import (
	"net/http"
	"net/textproto"
	"strings"
)

// hopByHop are the fields that concern one connection only, which a
// proxy removes before forwarding a message either way (RFC 9110 7.6.1:
// Connection and the fields it names, Proxy-Connection, Keep-Alive, TE,
// Transfer-Encoding, Upgrade; and, from RFC 2616's list that
// intermediaries still follow, Trailer, Proxy-Authenticate and
// Proxy-Authorization: credentials meant for the gateway never go on).
// Transfer-Encoding and Content-Length are not in the header the proxy
// writes anyway: net/http writes the framing it chose.
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
// Connection names.
func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopByHop {
		delete(h, name)
	}
}
