// Package httpproxy is the gateway's HTTP/1.1 proxy (paper sections 2.2
// and 3.4): clients talk to one address; the proxy reads each request in
// control mode, picks a backend pool by Host and path prefix,
// forwards the request, and, when the response is large (Content-Length
// of at least splice_min) and splicing it pays by the estimates measured
// on this machine (policy.go; splice_policy always splices every large
// one), splices the connection while the response flows. The gateway watches the spliced flow: when the client sends its
// next request, it unsplices the flow and hands both sockets back, and the
// proxy reads and routes that request, to another backend if its route
// says so, and splices again.
//
// What the proxy must know across a splice is where the response ends:
// the flow's byte counters include what the engine forwarded, so after an
// unsplice in the middle of a response (a pipelining client) the proxy
// relays the rest of it before it reads the next request. Chunked
// responses are never spliced, for the same reason.
//
// Requests are read strictly (request.go, body.go): the head is checked
// against RFC 9112 before it is parsed, since net/http alone
// accepts framing that a proxy in front or the backend behind can read
// another way (Content-Length with Transfer-Encoding, repeated
// Content-Length, obs-fold, bare LF, ...); what is ambiguous gets 400 and
// the connection closes. The body is framed by the proxy and re-framed
// towards the backend (head.go). Paths are normalised before routing
// (path.go) and the normalised form is forwarded, so the target a backend
// sees is the one the proxy routed on; a path some backend could read
// another way (%2F, ;parameters, backslashes) that would then route
// elsewhere is refused. Hop-by-hop fields are removed both ways (hop.go).
// An upgrade becomes a tunnel only when the backend answers 101 naming
// a protocol the client offered (and, for WebSocket, proving it read
// the handshake).
//
// What a request costs (send.go, README "Performance"): one goroutine per
// client connection, none per request; a relayed request and its
// response cost two writes, one each way (the head and the body bytes
// already read are gathered in a pooled send buffer, flushed whenever
// the proxy is about to wait on a socket, so nothing streams late), two
// reads and the two reads the netpoller makes before it parks. The head
// is checked in place in the connection's buffer; the proxy parses
// (parse.go) and writes (head.go) both heads itself, and what allocates
// is the parsed heads: a string each, their header maps and values.
//
// Errors get what a careful proxy answers: a malformed request 400 (and
// the connection closes), a request no route matches 404, a denied route
// 403, a backend that cannot be reached 502 (it is skipped for
// backend_down_for). Upgrade requests (WebSocket) answered with 101 are
// passed through spliced for their whole life. Log lines a client can
// trigger at will are rate-limited (proxy.Base.LogLimitedTo).
package httpproxy
