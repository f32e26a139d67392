package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/proxy"
	"spliced/tcprepair"
)

// Kind is the proxy kind flows of this package show.
const Kind = "http"

// Proxy is the HTTP proxy of one service.
type Proxy struct {
	proxy.Base
	poolsOnce sync.Once
	pools     []*pool
	// sendBufs holds the *sendBuf of exchanges not in flight: a
	// connection holds one only while it relays a request and its
	// response, not while it waits for the next request.
	sendBufs sync.Pool
	// upReaders holds the upstream readers (*bufio.Reader of
	// upReadSize) of connections between exchanges.
	upReaders sync.Pool
	// clientReaders holds the client readers (*bufio.Reader of 4 KiB)
	// of connections that ended: a connection that makes one request
	// would allocate one otherwise, half of what it allocates.
	clientReaders sync.Pool
	// splice is the splice policy's measurements and decisions.
	splice spliceState
}

// upReadSize is the buffer the proxy reads a response into: a head and
// a small body (16 KiB, HAProxy's default buffer) come in one read and
// go out in one write. A connection holds it only while a response is
// in flight.
const upReadSize = 16 << 10

// pool is the backends of one route, with its counters.
type pool struct {
	route    *Route
	host     string // route.Host, lower case, without a trailing dot
	path     string // route.Path, normalised like request paths
	backends []*backend
	next     atomic.Uint32
	requests atomic.Uint64
}

// backend is one server of a pool.
type backend struct {
	addr      netip.AddrPort
	active    atomic.Int32 // connections to it now
	downUntil atomic.Int64 // monotime; skipped until then
	requests  atomic.Uint64
	failures  atomic.Uint64
	// idle are its idle connections; dialed and reused count how
	// client connections got theirs, retries the requests sent again on
	// a new connection after the backend closed a used one (send),
	// earlyResponses the responses that came before the backend took
	// the whole request body (send).
	idle                                    idlePool
	dialed, reused, retries, earlyResponses atomic.Uint64
}

// BackendStats are the counters of one backend of one route.
type BackendStats struct {
	Route, Backend     string
	Requests, Failures uint64 // requests sent to it; connects that failed
	Active             int32  // connections to it a client connection uses now
	Idle               int    // idle connections to it kept for later requests
	// Dialed and Reused count the connections client connections got
	// by connecting and from the idle ones; Retries the requests sent
	// again on a new connection when the backend had closed a used one;
	// EarlyResponses the responses that came before the backend took
	// the whole request body.
	Dialed, Reused, Retries, EarlyResponses uint64
}

// Stats returns the counters of every route's backends, and of the
// requests each route got (Backend "", denied routes included).
func (p *Proxy) Stats() []BackendStats {
	p.initPools()
	var out []BackendStats
	for _, pl := range p.pools {
		route := pl.route.Host + pl.route.Path
		out = append(out, BackendStats{Route: route, Requests: pl.requests.Load()})
		for _, b := range pl.backends {
			out = append(out, BackendStats{Route: route, Backend: b.addr.String(), Requests: b.requests.Load(), Failures: b.failures.Load(),
				Active: b.active.Load(), Idle: b.idle.len(), Dialed: b.dialed.Load(), Reused: b.reused.Load(), Retries: b.retries.Load(),
				EarlyResponses: b.earlyResponses.Load()})
		}
	}
	return out
}

// splicing returns the splicer for responses, or nil when the service
// relays everything (splice.mode never).
func (p *Proxy) splicing() proxy.Splicer {
	if p.Service.Splice.Mode == config.SpliceNever {
		return nil
	}
	return p.Splicer()
}

// initPools builds a pool per route, once.
func (p *Proxy) initPools() {
	p.poolsOnce.Do(func() {
		for i := range p.conf().Routes {
			r := &p.conf().Routes[i]
			pl := &pool{route: r, host: hostName(strings.ToLower(r.Host)), path: routePath(r.Path)}
			for _, b := range r.Backends {
				pl.backends = append(pl.backends, &backend{addr: b.AddrPort})
			}
			p.pools = append(p.pools, pl)
		}
	})
}

// Serve accepts connections on the listeners until ctx is done.
// Connections already open keep running; CloseFlows ends them.
func (p *Proxy) Serve(ctx context.Context, listeners ...*net.TCPListener) error {
	p.initPools()
	defer p.keepIdle()()
	return p.ServeWith(ctx, listeners, p.handle)
}

// keepIdle closes idle upstream connections as they expire, until the
// returned function is called, which closes them all: a proxy that no
// longer serves (stopped, or replaced by a reload) keeps none, and
// connections its flows give back later are closed.
func (p *Proxy) keepIdle() (stop func()) {
	maxIdle := p.conf().UpstreamIdleTimeout.D()
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(max(maxIdle/4, 100*time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				for _, pl := range p.pools {
					for _, b := range pl.backends {
						b.idle.prune(now, maxIdle)
					}
				}
			}
		}
	}()
	return func() {
		close(done)
		<-exited
		for _, pl := range p.pools {
			for _, b := range pl.backends {
				b.idle.close()
			}
		}
	}
}

func (p *Proxy) handle(c *net.TCPConn) {
	svc := p.Service
	flow := proxy.NewFlow(svc.Name, Kind, proxy.AddrPort(c.RemoteAddr()), proxy.AddrPort(c.LocalAddr()))
	log, ok := p.Admit(c, flow)
	if !ok {
		return
	}
	log.Debug("http connection opened")
	p.Event(proxy.EventOpened, flow, "http")
	cn := &conn{p: p, flow: flow, log: log}
	cn.attach(c, nil)
	cn.run()
}

// route returns the pool for a host (its port ignored) and a normalised
// path, or nil.
func (p *Proxy) route(host, path string) *pool {
	host = hostName(host)
	fold := p.conf().PathsIgnoreCase
	for _, pl := range p.pools {
		if (pl.host == "" || strings.EqualFold(pl.host, host)) && pathMatches(pl.path, path, fold) {
			return pl
		}
	}
	return nil
}

// hostName is the host a route compares: without a port and a trailing
// dot, an IPv6 literal without its brackets and in its canonical form
// (RFC 5952), so that [2001:db8::1], [2001:db8:0::1]:80 and a route's
// 2001:db8::1 are one host; an IPv4-mapped literal ([::ffff:10.0.0.5])
// is the IPv4 address it maps, which a route for 10.0.0.5 must hold
// against.
func hostName(host string) string {
	switch n := strings.Count(host, ":"); {
	case strings.HasPrefix(host, "["):
		end := strings.IndexByte(host, ']')
		if end < 0 {
			return host
		}
		host = host[1:end]
	case n == 1:
		host = host[:strings.IndexByte(host, ':')]
	case n == 0:
		return strings.TrimSuffix(host, ".")
	}
	if a, err := netip.ParseAddr(host); err == nil && a.Is6() {
		return a.Unmap().String()
	}
	return strings.TrimSuffix(host, ".")
}

// routeRequest routes a request, refusing it (400) when a reading of its
// path some backend might make (rq.alt) routes elsewhere: a deny route
// must hold whatever the backend makes of the path.
//
// "OPTIONS *" asks about the server in general (RFC 9110 9.3.7), not
// about a path: it goes where the host's root goes (no route matched "*",
// and a load balancer in front that checks the gateway so, as HAProxy's
// manual suggests, got 404 and took it for down).
func (p *Proxy) routeRequest(rq *request) (*pool, error) {
	if rq.path == "*" {
		return p.route(rq.host, "/"), nil
	}
	pl := p.route(rq.host, rq.path)
	for _, a := range rq.alt {
		if p.route(rq.host, a) != pl {
			return nil, badRequest("ambiguous path: %q may be read as %q, which routes elsewhere", truncate([]byte(rq.path)), truncate([]byte(a)))
		}
	}
	if p.conf().PathsIgnoreCase {
		// The backends are Windows servers: their file names read
		// more into a path (windowsReading), of every reading above.
		for i := -1; i < len(rq.alt); i++ {
			a := rq.path
			if i >= 0 {
				a = rq.alt[i]
			}
			if w := windowsReading(a); w != a && p.route(rq.host, w) != pl {
				return nil, badRequest("ambiguous path: %q may be read as %q by a Windows server, which routes elsewhere", truncate([]byte(rq.path)), truncate([]byte(w)))
			}
		}
	}
	return pl, nil
}

// pick returns the backends of a pool in the order to try them: those not
// marked down, by the pool's balancing method.
func (pl *pool) pick(now time.Time) []*backend {
	var up []*backend
	at := monotime.Of(now)
	for _, b := range pl.backends {
		if b.downUntil.Load() <= at {
			up = append(up, b)
		}
	}
	if len(up) == 0 {
		return pl.backends // all down: try them anyway
	}
	if pl.route.Balance == "least_conn" {
		best := 0
		for i, b := range up {
			if b.active.Load() < up[best].active.Load() {
				best = i
			}
		}
		return append(up[best:], up[:best]...)
	}
	i := int(pl.next.Add(1) % uint32(len(up))) // see proxy.Pool.Pick: not negative on 32-bit
	return append(up[i:], up[:i]...)
}

// conn is one client connection and its current upstream connection.
type conn struct {
	p    *Proxy
	flow *proxy.Flow
	log  *slog.Logger

	// The connection's goroutine (run) owns the fields below; it changes
	// client and up under mu, so that a shutdown (closeConns) can close
	// them from another goroutine.
	mu     sync.Mutex
	client *net.TCPConn
	cr     *bufio.Reader
	up     *net.TCPConn
	ur     *bufio.Reader
	upTo   *backend
	// out gathers what the exchange in flight writes (nil between
	// exchanges); cr and ur read through clientRd and upRd, which
	// flush it before they read a socket.
	out            *sendBuf
	clientRd, upRd flushReader
	toClient, toUp countingWriter
	clientIO, upIO rawSock   // the sockets' reads and writes
	clientIP       string    // the X-Forwarded-For entry, once made
	xff            [1]string // the field's value for the request in flight
	scratch        scratch   // for writing heads (head.go)
	readDeadline   time.Time // of client, zero when none (idleDeadline)
	// bodyIdle is the idle timeout while a request body is read (0
	// otherwise): clientRd moves the read deadline on each read.
	bodyIdle time.Duration
	// writeDeadline is client's write deadline, zero when none
	// (writeIdle): a client that stops reading a response holds the
	// connection for the idle timeout, not for ever.
	writeDeadline time.Time
	// upDeadline is up's deadline, zero when none (upstreamDeadline): a
	// backend that stops answering or reading holds the connection for
	// http.upstream_timeout, not for ever.
	upDeadline time.Time
	// watchEarly: a request body goes to the backend, and a write that
	// waits for it looks for an early response (writeUpstream).
	watchEarly bool
	// bodyUnread: the last request has a body the proxy has not read
	// whole (refused, or answered early): its client may still be
	// sending it (lingerClient). clientStalled: a read of the client
	// timed out; it had idle_timeout already and gets no lingering.
	bodyUnread, clientStalled bool
	// cutShort: a response body that only the connection's close ends
	// failed before its end; the client's connection is reset, not
	// closed, so that the client does not take the part for the whole.
	cutShort bool
	respBody respBody // the body of a response parse.go parsed
	// respEnd is the value of flow.S2C at which the response in flight
	// ends: after an unsplice in its middle, the rest is relayed first.
	respEnd int64
	// spliceOut: a response was spliced and the flow came back; serve
	// checks that the backend sent no more than it (respEnd).
	spliceOut bool
	// relayedSample and splicedSample are the last response's, for the
	// splice policy's estimates; its delivery ends when the client's
	// next request comes (policy.go).
	relayedSample, splicedSample bodySample
	// everSpliced: the flow was spliced (its packets pass the gateway's
	// queue from then on; spliceState.diverted).
	everSpliced bool
	// upUsed: up carried an exchange before the one in flight, so its
	// backend may have closed it meanwhile (roundTrip retries).
	// upReusable: up's last exchange ended cleanly and its backend keeps
	// it open, so it may serve other clients (releaseUpstream).
	upUsed, upReusable bool
	// upHeadAt: when up's last response head was read (connect).
	upHeadAt  time.Time
	exchanges int // requests relayed on the connection
}

// heldUpstreamCheck: a client connection that asks again this long or
// longer after its last response head keeps its upstream connection
// only if the backend sent nothing meanwhile (quiet, a system call);
// one that asks sooner keeps it unchecked. A backend that ends an idle
// connection (its keep-alive timeout, seconds) may say so first (408)
// before it closes; that must not answer the client's next request.
const heldUpstreamCheck = 100 * time.Millisecond

// attach starts using new sockets (after accept, or after an unsplice).
func (c *conn) attach(client, up *net.TCPConn) {
	c.clientIO.reset(client)
	c.readDeadline, c.writeDeadline = time.Time{}, time.Time{}
	c.clientRd = flushReader{r: &c.clientIO, out: &c.out, body: c}
	cr, _ := c.p.clientReaders.Get().(*bufio.Reader)
	if cr == nil {
		cr = bufio.NewReader(nil)
	}
	cr.Reset(&c.clientRd)
	c.mu.Lock()
	c.client, c.cr = client, cr
	c.up, c.ur = up, nil
	c.mu.Unlock()
	if up != nil {
		// A fresh reader (c.ur was set to nil): nothing read from the
		// sockets before the splice is read again.
		c.upIO.reset(up)
		c.upRd = flushReader{r: &c.upIO, out: &c.out, up: c}
		c.upDeadline = time.Time{}
		c.upReader()
		c.upUsed, c.upReusable = true, false
	}
	c.flow.SetResume(func(client, up *net.TCPConn) {
		c.p.Go(func() {
			c.attach(client, up)
			c.log.Debug("http connection back from an unsplice")
			c.run()
		})
	})
}

// run serves requests until the connection ends or is spliced.
func (c *conn) run() {
	stop := context.AfterFunc(c.p.FlowContext(), c.closeConns)
	defer stop()
	reason, spliced := c.serve()
	if spliced {
		return // the gateway owns the flow; it hands it back or ends it
	}
	c.releaseUpstream() // before a lingering close: another client may use it
	switch {
	case c.cutShort:
		// A reset: a close would end the body as if it were whole.
		c.client.SetLinger(0)
	case reason != reasonClientClosed:
		c.lingerClient()
	}
	c.client.Close()
	// Spliced, the reader is left alone: an unsplice may be attaching
	// a new one already.
	c.mu.Lock()
	cr := c.cr
	c.cr = nil
	c.mu.Unlock()
	cr.Reset(nil)
	c.p.clientReaders.Put(cr)
	c.flow.SetResume(nil)
	c.flow.SetState(proxy.StateClosing)
	level := slog.LevelInfo
	switch reason {
	case reasonMalformed, reasonNoRoute, reasonDenied:
		level = slog.LevelDebug // the refusal was logged, rate-limited
	}
	if ctx := context.Background(); c.log.Enabled(ctx, level) { // the arguments would allocate
		c.log.Log(ctx, level, "http connection closed", logging.KeyReason, reason,
			logging.KeyBytesC2S, c.flow.C2S.Load(), logging.KeyBytesS2C, c.flow.S2C.Load(),
			logging.KeyDuration, time.Since(c.flow.Started).Round(time.Millisecond))
	}
	c.p.Event(proxy.EventClosed, c.flow, reason)
	c.p.Flows.Remove(c.flow)
}

// Lingering close (nginx's lingering_time and lingering_timeout): how
// long, at most, the proxy reads and discards what a client still sends
// after its connection ended, and how long it waits for each next bytes.
const (
	lingerTime    = 30 * time.Second
	lingerTimeout = 5 * time.Second
)

// lingerClient ends the client's connection gently when the client has
// sent, or may still send, what the proxy will not read (the rest of an
// upload refused with a 403 or 413, requests pipelined after a
// "Connection: close"): closing a socket with unread data resets the
// connection, and a client that
// gets the reset before it read the response (a retransmitted one, or a
// client whose system drops what it received on a reset) never sees why
// its request failed. So the proxy sends its FIN and reads and discards
// until the client closes too, stops sending for lingerTimeout, or
// lingerTime passed; a shutdown closes the socket under it.
func (c *conn) lingerClient() {
	if c.clientStalled {
		return // silent for idle_timeout already
	}
	if n, err := tcprepair.Unread(c.client); !c.bodyUnread && c.cr.Buffered() == 0 && (err != nil || n == 0) {
		return // nothing unread, nothing to come: the close is a FIN
	}
	if c.client.CloseWrite() != nil {
		return
	}
	c.bodyIdle = 0 // else each read would move the deadline (clientRd)
	end := time.Now().Add(lingerTime)
	for {
		c.cr.Discard(c.cr.Buffered())
		wait := time.Now().Add(lingerTimeout)
		if wait.After(end) {
			wait = end
		}
		c.client.SetReadDeadline(wait)
		if _, err := c.cr.Peek(1); err != nil {
			return
		}
	}
}

// closeConns closes both sockets, from any goroutine (a shutdown): the
// connection's goroutine then ends and cleans up.
func (c *conn) closeConns() {
	c.mu.Lock()
	client, up := c.client, c.up
	c.mu.Unlock()
	client.Close()
	if up != nil {
		up.Close()
	}
}

// releaseUpstream gives the upstream connection to its backend's idle
// connections when it can serve another client, else closes it (run's
// goroutine only).
func (c *conn) releaseUpstream() {
	keep := *c.p.conf().UpstreamKeepalive
	if c.up == nil || !c.upReusable || c.everSpliced || c.ur != nil || keep == 0 {
		// c.ur is kept between exchanges only when the backend sent
		// more than its response.
		c.closeUpstream()
		return
	}
	up, b := c.up, c.upTo
	// Kept, its deadline would pass while it is idle, and the check
	// before it is used (quiet) would take it for closed.
	up.SetDeadline(time.Time{})
	c.upDeadline = time.Time{}
	b.active.Add(-1)
	c.mu.Lock()
	c.up = nil
	c.mu.Unlock()
	c.upTo = nil
	if !b.idle.put(up, time.Now(), keep) {
		up.Close()
	}
}

// closeUpstream closes the upstream connection (run's goroutine only).
func (c *conn) closeUpstream() {
	if c.up != nil {
		c.up.Close()
		if c.upTo != nil {
			c.upTo.active.Add(-1)
		}
		c.mu.Lock()
		c.up = nil
		c.mu.Unlock()
		c.upTo = nil
		if c.ur != nil {
			c.ur.Reset(nil)
			c.p.upReaders.Put(c.ur)
			c.ur = nil
		}
	}
}

// upReader makes c.ur a reader of the upstream connection, from the
// pool unless it has one.
func (c *conn) upReader() {
	if c.ur != nil {
		return
	}
	r, _ := c.p.upReaders.Get().(*bufio.Reader)
	if r == nil {
		r = bufio.NewReaderSize(nil, upReadSize)
	}
	r.Reset(&c.upRd)
	c.ur = r
}

// releaseUpReader gives c.ur back to the pool between exchanges, unless
// it holds bytes the backend sent beyond its response.
func (c *conn) releaseUpReader() {
	if c.ur != nil && c.ur.Buffered() == 0 {
		c.ur.Reset(nil)
		c.p.upReaders.Put(c.ur)
		c.ur = nil
	}
}

// deadlineSlack is how much earlier than the idle timeout a connection
// may time out waiting for a request: the read deadline is moved when it
// is that far behind, not for every request (each move is a timer
// operation in the runtime, and every request made two).
const deadlineSlack = time.Second

// moveDeadline reports the deadline now+d to set in place of cur, the
// one set (zero: none), and whether it is worth setting: not when cur is
// behind it by less than deadlineSlack (less when d is short).
func moveDeadline(cur, now time.Time, d time.Duration) (time.Time, bool) {
	want := now.Add(d)
	return want, cur.IsZero() || want.Sub(cur) >= min(deadlineSlack, d/16)
}

// idleDeadline makes the client's read deadline now+idle, give or take
// deadlineSlack (moveDeadline).
func (c *conn) idleDeadline(now time.Time, idle time.Duration) {
	if want, ok := moveDeadline(c.readDeadline, now, idle); ok {
		c.client.SetReadDeadline(want)
		c.readDeadline = want
	}
}

// writeIdle makes the client's write deadline now plus the idle timeout,
// give or take deadlineSlack, as idleDeadline does for reads: every write
// to the client comes after it, so a client that takes nothing for that
// long ends the connection.
func (c *conn) writeIdle(now time.Time) {
	if want, ok := moveDeadline(c.writeDeadline, now, c.p.Service.IdleTimeout.D()); ok {
		c.client.SetWriteDeadline(want)
		c.writeDeadline = want
	}
}

// upstreamDeadline makes up's deadline now plus http.upstream_timeout,
// give or take deadlineSlack, as idleDeadline does for the client: every
// read of and write to the backend comes after it, so a backend that
// sends or takes nothing for that long ends the exchange.
func (c *conn) upstreamDeadline(now time.Time) {
	timeout := c.p.conf().UpstreamTimeout.D()
	if timeout <= 0 {
		if !c.upDeadline.IsZero() { // a reload turned it off
			c.up.SetDeadline(time.Time{})
			c.upDeadline = time.Time{}
		}
		return
	}
	if want, ok := moveDeadline(c.upDeadline, now, timeout); ok {
		c.up.SetDeadline(want)
		c.upDeadline = want
	}
}

// serve is the request loop. It returns why the connection ended, or
// spliced when the gateway took it.
func (c *conn) serve() (reason string, spliced bool) {
	svc := c.p.Service
	for {
		// The rest of a response an unsplice interrupted (a client that
		// pipelines), before the next request.
		rest := c.respEnd - c.flow.S2C.Load()
		c.endSpliced(rest)
		if c.spliceOut {
			c.spliceOut = false
			if rest < 0 {
				// The backend sent more than its response while it was
				// spliced, and the client got it unseen: it answers the
				// client's next request, and every response relayed from
				// now on would answer the request after its own.
				return c.overran(-rest), false
			}
		}
		if rest > 0 && c.ur != nil {
			c.log.Debug("http: relaying the rest of a response after an unsplice", "bytes", rest)
			if _, err := io.CopyN(&countingWriter{w: c.client, n: &c.flow.S2C, idle: c}, c.ur, rest); err != nil {
				return "relay the rest of a response: " + err.Error(), false
			}
		}
		now := time.Now()
		c.bodyIdle = 0
		c.idleDeadline(now, svc.IdleTimeout.D())
		c.clientStalled = false
		rq, err := readRequest(c.cr)
		c.bodyUnread = err == nil && rq.body != nil
		if err == nil && rq.body != nil {
			// A body may take longer than the idle timeout to come, but
			// not stall for longer: each read of it moves the deadline.
			// An upgrade request's too: it is no tunnel before its 101
			// (spliceUpgrade lifts the deadline then; lifted here, a
			// client that sent part of the body held the connection
			// for ever).
			c.bodyIdle = svc.IdleTimeout.D()
		}
		if err == nil {
			c.endRelayed(time.Now())
		} else {
			c.relayedSample = bodySample{}
		}
		var pl *pool
		if err == nil {
			pl, err = c.p.routeRequest(rq)
		}
		if err != nil {
			var re *requestError
			var ne net.Error
			switch {
			case errors.As(err, &re):
				return c.malformed(re), false
			case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
				return reasonClientClosed, false
			case errors.As(err, &ne) && ne.Timeout():
				return "idle", false
			}
			return "read a request: " + err.Error(), false
		}
		switch {
		case pl == nil:
			c.reply(http.StatusNotFound, "no route for this host and path")
			c.p.LogLimitedTo(c.log, "http no route", slog.LevelInfo, "http: no route", "host", rq.host, "path", rq.path)
			return reasonNoRoute, false
		case pl.route.Action == config.Deny:
			pl.requests.Add(1)
			c.reply(http.StatusForbidden, "denied by the gateway")
			c.p.LogLimitedTo(c.log, "http denied", slog.LevelInfo, "http: denied", "host", rq.host, "path", rq.path)
			return reasonDenied, false
		}
		pl.requests.Add(1)
		if err := c.connect(pl); err != nil {
			c.reply(http.StatusBadGateway, "no backend of this route answers")
			c.p.LogLimitedTo(c.log, "http no backend "+pl.route.Host+pl.route.Path, slog.LevelWarn, "http: no backend reachable", "path", pl.route.Path, logging.Err(err))
			return "bad gateway", false
		}
		c.upTo.requests.Add(1)
		done, spliced, err := c.exchange(rq)
		if err != nil {
			var re *requestError
			if errors.As(err, &re) {
				return c.malformed(re), false
			}
			return err.Error(), false
		}
		if spliced || done {
			return "finished", spliced
		}
	}
}

// overran counts a backend that sent extra bytes beyond a spliced
// response (the client got them) and returns why the connection ends.
func (c *conn) overran(extra int64) string {
	if c.upTo != nil {
		c.upTo.failures.Add(1)
	}
	c.p.LogLimitedTo(c.log, "http overrun", slog.LevelWarn, "http: the backend sent more than its spliced response; closing the connection", "bytes", extra)
	return "the backend sent more than its spliced response"
}

// Reasons a connection ends for a request the proxy refused. Their log
// lines are rate-limited (a client sends as many as it likes), so the
// "connection closed" line of such a connection is a debug line.
const (
	reasonMalformed = "malformed request"
	reasonNoRoute   = "no route"
	reasonDenied    = "denied"
)

// reasonClientClosed: the client ended the connection between requests
// (nothing of it is left unread).
const reasonClientClosed = "client closed"

// malformed answers a refused request and logs it, rate-limited.
func (c *conn) malformed(re *requestError) string {
	c.reply(re.status, re.reason)
	c.p.LogLimitedTo(c.log, "http malformed", slog.LevelWarn, "http: malformed request, closing the connection",
		"status", re.status, logging.KeyReason, re.reason)
	return reasonMalformed
}

// connect makes c.up a connection to a backend of pl, keeping the current
// one when it is in the pool.
func (c *conn) connect(pl *pool) error {
	now := time.Now()
	if c.up != nil && (c.ur != nil && c.ur.Buffered() > 0 || now.Sub(c.upHeadAt) >= heldUpstreamCheck && !c.upQuiet()) {
		// The backend sent more than its last response (c.ur holds
		// it), or something unasked since (a 408 before it closes),
		// or closed: what it sent would answer this request. The
		// idle pool checks the same before it hands a connection out
		// (take).
		c.closeUpstream()
	}
	if c.up != nil {
		for _, b := range pl.backends {
			if b == c.upTo && b.downUntil.Load() <= monotime.Of(now) {
				return nil
			}
		}
		c.releaseUpstream()
	}
	conf := c.p.conf()
	var errs []error
	for _, b := range pl.pick(now) {
		if *conf.UpstreamKeepalive > 0 {
			if up := b.idle.take(now, conf.UpstreamIdleTimeout.D()); up != nil {
				b.reused.Add(1)
				c.useUpstream(b, up, true)
				return nil
			}
		}
		up, err := c.dial(b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c.useUpstream(b, up, false)
		return nil
	}
	return errors.Join(errs...)
}

// upQuiet is quiet(c.up) after a pause: the upstream deadline of the
// last exchange may have passed meanwhile (upstream_timeout is shorter
// than a client's idle_timeout), and a read past it fails whatever the
// socket holds; the next exchange sets its own.
func (c *conn) upQuiet() bool {
	if !c.upDeadline.IsZero() {
		c.up.SetDeadline(time.Time{})
		c.upDeadline = time.Time{}
	}
	return quiet(c.up)
}

// dial connects to b, marking it down for a while if that fails.
func (c *conn) dial(b *backend) (*net.TCPConn, error) {
	svc := c.p.Service
	ctx, cancel := context.WithTimeout(c.p.FlowContext(), svc.ConnectTimeout.D())
	up, err := proxy.DialUpstream(ctx, false, c.flow.Client, b.addr, svc.ConnectTimeout.D(), c.p.AvoidPort)
	cancel()
	if err != nil {
		b.failures.Add(1)
		downFor := c.p.conf().BackendDownFor.D()
		b.downUntil.Store(monotime.Now() + int64(downFor))
		c.p.LogLimitedTo(c.log, "http backend failed "+b.addr.String(), slog.LevelWarn, "http: backend failed, skipping it for a while", "backend", b.addr, "for", downFor, logging.Err(err))
		return nil, err
	}
	b.dialed.Add(1)
	return up, nil
}

// useUpstream makes up, a connection to b, the connection's upstream;
// used: it carried exchanges before (an idle connection).
func (c *conn) useUpstream(b *backend, up *net.TCPConn, used bool) {
	b.active.Add(1)
	c.mu.Lock()
	c.up = up
	c.mu.Unlock()
	c.upIO.reset(up)
	c.upRd = flushReader{r: &c.upIO, out: &c.out, up: c}
	c.upDeadline = time.Time{}
	c.upTo = b
	c.upUsed, c.upReusable = used, false
	c.flow.SetServerLeg(proxy.AddrPort(up.LocalAddr()), b.addr)
}

// redial replaces a used upstream connection its backend closed by a
// new one to the same backend, for roundTrip's retry.
func (c *conn) redial() error {
	b := c.upTo
	b.retries.Add(1)
	c.closeUpstream()
	up, err := c.dial(b)
	if err != nil {
		return err
	}
	c.useUpstream(b, up, false)
	c.upReader()
	return nil
}

// exchange forwards one request and its response. done: the connection
// ends after it; spliced: the gateway took the flow. A *requestError
// means the client's body was malformed (the client was answered).
func (c *conn) exchange(rq *request) (done, spliced bool, err error) {
	out := c.sendBuf()
	c.upReader()
	done, spliced, err = c.relay(rq, out)
	if !spliced {
		// Spliced, the connection is no longer this goroutine's: the
		// send buffer went back before the splice, and the upstream
		// reader stays with the flow.
		c.releaseSendBuf()
		c.releaseUpReader()
	}
	return done, spliced, err
}

// forwardedFor is a client's address as X-Forwarded-For names it: without
// the zone a link-local client's address has here (fe80::1%eth0). The
// zone is the gateway's interface, which means nothing to a backend, and
// address parsers such as nginx's (its realip module) refuse it.
func forwardedFor(a netip.Addr) string {
	return a.WithZone("").String()
}

// relay is exchange with the send buffer, out.
func (c *conn) relay(rq *request, out *sendBuf) (done, spliced bool, err error) {
	c.exchanges++
	conf := c.p.conf()
	req := rq.Request
	switch conf.Forwarded {
	case "x-forwarded-for":
		if c.clientIP == "" {
			c.clientIP = forwardedFor(c.flow.Client.Addr())
		}
		ip := c.clientIP
		if prior := req.Header.Get("X-Forwarded-For"); prior != "" {
			ip = prior + ", " + ip
		}
		// req.Header.Set without a new slice: the request does not
		// outlive the exchange.
		c.xff[0] = ip
		req.Header["X-Forwarded-For"] = c.xff[:]
	case "via":
		req.Header.Add("Via", fmt.Sprintf("%d.%d spliced", req.ProtoMajor, req.ProtoMinor))
	}
	if conf.Forwarded != "x-forwarded-for" {
		// The proxy sets no X-Forwarded-For: a client's would reach a
		// backend that trusts the gateway as its proxy (nginx's
		// real_ip_header X-Forwarded-For, Rails' remote_ip) as the
		// client's address, whatever the client likes (as X-Real-IP).
		delete(req.Header, "X-Forwarded-For")
	}
	if req.Host == "" {
		// HTTP/1.0 without Host: the request goes out as HTTP/1.1,
		// which needs one.
		req.Host = c.upTo.addr.String()
	}
	reqClose := req.Close
	if *conf.UpstreamKeepalive > 0 {
		// The client's "Connection: close" (or HTTP/1.0) ends its own
		// connection, not the upstream one, which other clients reuse.
		req.Close = false
	}
	continued := false // the proxy sent the client a 100 Continue
	if rq.body != nil && req.ProtoAtLeast(1, 1) && headerHas(req.Header, "Expect", "100-continue") {
		// The proxy reads the body as it sends the request, and reads
		// the backend only after: a client that waits for the 100
		// before it sends its body waited for its own timeout (curl: a
		// second) on every upload. The proxy says 100 itself, as nginx
		// does, and the backend gets no Expect (TestExpectContinue).
		delete(req.Header, "Expect")
		w := countingWriter{w: &c.clientIO, n: &c.flow.S2C, idle: c}
		if _, err := io.WriteString(&w, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return true, false, fmt.Errorf("write 100 Continue to the client: %w", err)
		}
		continued = true
	}
	resp, head, early, err := c.send(rq, out)
	if err != nil {
		return true, false, err
	}
	for interim := 0; ; interim++ {
		// resp.Close was read from the backend's version (its
		// connection's persistence); what the client gets says the
		// proxy's.
		ownVersion(resp)
		if resp.StatusCode == http.StatusSwitchingProtocols {
			// Only now, with the backend's consent, is the connection
			// a tunnel: an upgrade request answered otherwise is an
			// ordinary exchange, and the next request is read and
			// routed like any (else a client would ask for an upgrade
			// it knows fails and send anything after it, unrouted).
			if early {
				// Not found early (earlyStatus): a write failed after it.
				c.reply(http.StatusBadGateway, "the backend switched protocols before it took the request's body")
				c.upTo.failures.Add(1)
				return true, false, fmt.Errorf("the response of %s: 101 before the request's body was sent", c.upTo.addr)
			}
			if !rq.upgrade {
				c.reply(http.StatusBadGateway, "the backend switched protocols unasked")
				c.upTo.failures.Add(1)
				return true, false, fmt.Errorf("the response of %s: 101 to a request that asked no upgrade", c.upTo.addr)
			}
			if !upgradeAgreed(req.Header, resp.Header) {
				// RFC 9110 7.8: a 101 names in Upgrade the protocols the
				// server switches to, among those the client offered.
				// One that does not is not the backend's consent to this
				// upgrade (a status echo answers 101 to anything), and
				// the tunnel would take every later request past the
				// deny routes; the WebSocket proof below would be
				// skipped by naming any other protocol.
				c.reply(http.StatusBadGateway, "the backend switched protocols without naming one the client offered")
				c.upTo.failures.Add(1)
				return true, false, fmt.Errorf("the response of %s: 101 with Upgrade %q to a request offering %q", c.upTo.addr,
					resp.Header.Values("Upgrade"), req.Header.Values("Upgrade"))
			}
			if (headerHasProtocol(req.Header, "websocket") || headerHasProtocol(resp.Header, "websocket")) &&
				resp.Header.Get("Sec-WebSocket-Accept") != websocketAccept(req.Header.Get("Sec-WebSocket-Key")) {
				// A WebSocket server proves that it read the handshake
				// (RFC 6455 4.2.2). A 101 without the proof is not a
				// WebSocket server's: one that makes its status what a
				// client asks for (a status echo, a redirect checker)
				// would open a tunnel to the backend for any request
				// the client then sends, past the deny routes.
				c.reply(http.StatusBadGateway, "the backend switched to WebSocket without the handshake's Sec-WebSocket-Accept")
				c.upTo.failures.Add(1)
				return true, false, fmt.Errorf("the response of %s: 101 to a WebSocket upgrade without a valid Sec-WebSocket-Accept", c.upTo.addr)
			}
			upgradeTo := resp.Header.Values("Upgrade")
			removeHopByHop(resp.Header)
			// A 101 has no body (RFC 9110 8.6, 15.2): a client that took
			// its Content-Length would read the new protocol's first
			// bytes as the body.
			delete(resp.Header, "Content-Length")
			resp.Header["Connection"] = []string{"Upgrade"}
			resp.Header["Upgrade"] = upgradeTo
			writeHead(out, resp, &c.scratch)
			if err := out.Flush(); err != nil {
				return true, false, fmt.Errorf("relay the response header: %w", err)
			}
			return c.spliceUpgrade()
		}
		if resp.StatusCode >= 200 {
			break
		}
		if interim == maxInterimResponses {
			// A backend that answers with interim responses only
			// would keep the client waiting, and the proxy relaying,
			// for as long as it likes.
			return true, false, c.unreadable(errTooManyInterim)
		}
		// 1xx (100 Continue, 103 Early Hints): relayed to a client
		// that understands them, and the final response follows. Taken
		// as the response, it would leave the real one to answer the
		// client's next request.
		if req.ProtoAtLeast(1, 1) && !(continued && resp.StatusCode == http.StatusContinue) {
			// (A backend's own 100, unasked once the proxy answered the
			// Expect, would be the client's second.)
			removeHopByHop(resp.Header)
			// Nor has any 1xx a body, nor may it say Content-Length
			// (RFC 9110 8.6): a client that took it would read the
			// final response's head as the interim one's body.
			delete(resp.Header, "Content-Length")
			// Written when the proxy next reads the backend (or with
			// the final response, if that came with it).
			writeHead(out, resp, &c.scratch)
		}
		resp, err = readResponse(c.ur, req, &c.respBody)
		head = time.Now()
		if err != nil {
			return true, false, c.unreadable(err)
		}
	}
	c.upHeadAt = head
	// The body is resp.Body when the proxy relays it, and the raw stream
	// (c.ur) when it splices: resp.Body is then never read nor closed
	// (closing drains what it believes unread).
	// After an early response the rest of the request's body is still
	// on its way: the client's connection cannot carry another request,
	// nor the backend's.
	closeAfter := reqClose || resp.Close || early
	upClose := resp.Close || early
	if !bodyAllowed(resp.StatusCode) {
		// A 304 may say "Transfer-Encoding: chunked" (RFC 9112 6.1: the
		// coding its body would have had), a 204 should not; neither
		// has a body, but Response.Write would write a last chunk after
		// the head, which the client reads as the start of the next
		// response on the connection.
		resp.TransferEncoding = nil
	}
	if !req.ProtoAtLeast(1, 1) && len(resp.TransferEncoding) > 0 {
		// An HTTP/1.0 client knows no chunked coding (RFC 9112 6.1):
		// it gets the body decoded, ended by the connection's close.
		resp.TransferEncoding = nil
		resp.ContentLength = -1
		closeAfter = true
	}
	removeHopByHop(resp.Header)
	if resp.Trailer != nil {
		// A chunked response that announced trailer fields: net/http
		// relays the announcement and every field of the trailer
		// section, those that must not be trailers too.
		removeTrailerFields(resp.Trailer)
		resp.Body = &trailerFilter{ReadCloser: resp.Body, trailer: resp.Trailer}
	}
	resp.Close = closeAfter // writeResponse says Connection: close
	if !closeAfter && !req.ProtoAtLeast(1, 1) {
		// An HTTP/1.0 client that asked to keep the connection keeps it
		// only when told.
		resp.Header.Set("Connection", "keep-alive")
	}
	sp := c.p.splicing()
	if d := c.decideResponse(sp, req, resp, closeAfter); !d.splice {
		err := writeResponse(out, resp, &c.scratch)
		if err == nil {
			err = out.Flush()
		}
		resp.Body.Close()
		if err != nil {
			// A body without a length (until the backend's close, or
			// chunked decoded for an HTTP/1.0 client) is ended for the
			// client by the close of its connection: cut short, the
			// close would make the part look whole (RFC 9112 8).
			c.cutShort = resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 && req.Method != http.MethodHead
			return true, false, fmt.Errorf("relay the response: %w", err)
		}
		c.upUsed, c.upReusable = true, !upClose
		if sp != nil && req.Method != http.MethodHead && resp.ContentLength >= 0 && c.exchanges > 1 {
			// Not a connection's first response: its time is that of
			// new connections' slow start (many at once when a client
			// starts), not of relaying.
			c.relayedSample = bodySample{length: resp.ContentLength, head: head}
		}
		return closeAfter, false, nil
	}
	// Splice while the body flows: the header and what the proxy already
	// read of the body go first, then the sockets go to the gateway.
	resp.Header.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	writeHead(out, resp, &c.scratch)
	ahead := min(int64(c.ur.Buffered()), resp.ContentLength)
	if _, err := io.CopyN(out, c.ur, ahead); err != nil {
		return true, false, fmt.Errorf("relay the response: %w", err)
	}
	if err := out.Flush(); err != nil {
		return true, false, fmt.Errorf("relay the response header: %w", err)
	}
	c.respEnd = c.flow.S2C.Load() + resp.ContentLength - ahead
	c.flow.UnspliceOnClientData.Store(true)
	c.releaseSendBuf()
	// Set before the splice: once spliced, the flow is the resumed
	// goroutine's, which records it (endSpliced).
	c.splicedSample = bodySample{length: resp.ContentLength}
	c.spliceOut = true
	if !c.everSpliced {
		c.everSpliced = true
		c.p.splice.markDiverted(c.flow.ID)
	}
	serr := sp.Splice(c.p.FlowContext(), c.flow, c.client, c.up)
	if serr == nil {
		// Nothing of c may be touched from here: an unsplice may have
		// handed the flow to a new goroutine already (attach).
		return false, true, nil
	}
	// The gateway's drain sets and clears the sockets' read deadlines:
	// the next request sets its own.
	c.readDeadline, c.writeDeadline, c.upDeadline = time.Time{}, time.Time{}, time.Time{}
	c.splicedSample = bodySample{}
	c.spliceOut = false
	c.flow.SetSpliceError(serr)
	// Common and harmless when the client asks again at once: the
	// response ends proxied.
	c.log.Debug("http: response stays proxied", logging.Err(serr))
	c.p.Event(proxy.EventSpliceFailed, c.flow, serr.Error())
	if rest := c.respEnd - c.flow.S2C.Load(); rest > 0 {
		if _, err := io.CopyN(&countingWriter{w: c.client, n: &c.flow.S2C, idle: c}, c.ur, rest); err != nil {
			return true, false, fmt.Errorf("relay the response: %w", err)
		}
	} else if rest < 0 {
		return true, false, errors.New(c.overran(-rest))
	}
	return false, false, nil
}

// send writes the request to the backend and reads the head of its
// first response. A connection that served earlier requests may have been
// closed by its backend while idle, and the request then meets a closed
// connection before any byte of a response: an idempotent request
// without a body (nothing of it is lost: the proxy holds all of it) is
// sent again, once, on a new connection to the same backend, as browsers
// do (RFC 9110, section 9.2.2). Any other fails with a 502.
//
// A backend may answer before it has read the whole body (a 413 or a
// 401 for an upload it will not take) and then stop reading or close:
// the response is relayed all the same (early; nginx does so too), not
// a 504 after http.upstream_timeout or nothing at all.
func (c *conn) send(rq *request, out *sendBuf) (resp *http.Response, head time.Time, early bool, err error) {
	req := rq.Request
	for attempt := 0; ; attempt++ {
		retry := attempt == 0 && c.upUsed && rq.body == nil && idempotent(req.Method)
		c.upReusable = false
		c.toUp = countingWriter{w: &c.upIO, n: &c.flow.C2S, up: c}
		out.reset(&c.toUp)
		c.watchEarly = rq.body != nil
		err := writeRequest(out, req, &c.scratch)
		if err == nil {
			err = out.Flush()
		}
		c.watchEarly = false
		if err == nil {
			c.bodyUnread = false
		}
		// The backend refused the body (errEarlyResponse), or its side
		// failed (out.err: not the client's body) after a response
		// began: the backend wants no more of it.
		early := err != nil && rq.body != nil && out.err != nil &&
			(errors.Is(err, errEarlyResponse) || c.earlyStatus() != 0)
		if err == nil || early {
			c.toClient = countingWriter{w: &c.clientIO, n: &c.flow.S2C, idle: c}
			out.reset(&c.toClient)
			read := c.upRd.n
			resp, rerr := readResponse(c.ur, req, &c.respBody)
			if rerr == nil {
				if early {
					c.upTo.earlyResponses.Add(1)
					c.log.Debug("http: the backend answered before it took the whole request body", "backend", c.upTo.addr, "status", resp.StatusCode, logging.Err(err))
				}
				return resp, time.Now(), early, nil
			}
			err = rerr
			var ne net.Error
			if !retry || c.upRd.n != read || errors.As(err, &ne) && ne.Timeout() {
				return nil, time.Time{}, false, c.unreadable(err)
			}
		} else if !retry {
			// A failed write to the backend (out.err) is the backend's
			// fault even when it surfaced in the body's reader, which
			// flushes what it read so far before it reads more.
			if be := rq.bodyFailed(); be != nil && out.err == nil {
				// The backend got a request cut short; both connections
				// close, so nothing after it is read as a request.
				if be.framing {
					return nil, time.Time{}, false, &requestError{status: http.StatusBadRequest, reason: be.Error()}
				}
				return nil, time.Time{}, false, fmt.Errorf("client: %w", be)
			}
			if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
				// Nothing of a response came: the client may be told.
				c.reply(http.StatusGatewayTimeout, "the backend took no more of the request within http.upstream_timeout")
				c.upTo.failures.Add(1)
			}
			return nil, time.Time{}, false, fmt.Errorf("write the request to %s: %w", c.upTo.addr, err)
		}
		c.log.Debug("http: the backend closed a used connection; sending the request again on a new one", "backend", c.upTo.addr, logging.Err(err))
		if err := c.redial(); err != nil {
			c.reply(http.StatusBadGateway, "no backend of this route answers")
			return nil, time.Time{}, false, fmt.Errorf("connect again to send a request: %w", err)
		}
	}
}

// ownVersion makes resp go out as HTTP/1.1, the proxy's version: an
// intermediary sends its own HTTP-version in the messages it forwards
// (RFC 9110 6.2), and the client's connection is the proxy's. Relayed
// as the backend's "HTTP/1.0", a response without "Connection:
// keep-alive" (hop-by-hop, removed) told an HTTP/1.1 client to close
// after it (RFC 9112 9.3) while the proxy kept the connection for the
// next request. Where the proxy does close after a response, its head
// says "Connection: close" (resp.Close).
func ownVersion(resp *http.Response) {
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/1.1", 1, 1
}

// unreadable answers the client 502 for a response the backend did not
// send whole (504 when it sent nothing for http.upstream_timeout), and
// returns the error.
func (c *conn) unreadable(err error) error {
	if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		c.reply(http.StatusGatewayTimeout, "the backend did not answer within http.upstream_timeout")
	} else {
		c.reply(http.StatusBadGateway, "the backend's response was unreadable")
	}
	c.upTo.failures.Add(1)
	return fmt.Errorf("read the response of %s: %w", c.upTo.addr, err)
}

// idempotent reports whether a request with this method may be sent
// again after a connection failed under it (RFC 9110, section 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// spliceUpgrade passes an upgraded connection (WebSocket and the like)
// through spliced for the rest of its life, or relays it.
func (c *conn) spliceUpgrade() (done, spliced bool, err error) {
	if n := c.cr.Buffered(); n > 0 { // the client spoke first
		b, _ := c.cr.Peek(n)
		c.up.Write(b)
		c.cr.Discard(n)
		c.flow.C2S.Add(int64(n))
	}
	if n := c.ur.Buffered(); n > 0 {
		b, _ := c.ur.Peek(n)
		c.client.Write(b)
		c.ur.Discard(n)
		c.flow.S2C.Add(int64(n))
	}
	// The tunnel's relay or splice has its own idle timeout.
	c.client.SetDeadline(time.Time{})
	c.up.SetDeadline(time.Time{})
	c.readDeadline, c.writeDeadline, c.upDeadline = time.Time{}, time.Time{}, time.Time{}
	c.bodyIdle = 0
	c.flow.UnspliceOnClientData.Store(false)
	c.flow.SetResume(nil)
	c.releaseSendBuf()
	c.splicedSample = bodySample{}
	if sp := c.p.splicing(); sp != nil {
		if err := sp.Splice(c.p.FlowContext(), c.flow, c.client, c.up); err == nil {
			return false, true, nil
		}
	}
	relay := &proxy.Relay{Client: c.client, Upstream: c.up, Flow: c.flow, IdleTimeout: c.p.Service.IdleTimeout.D()}
	outcome, err := relay.Run()
	if err != nil {
		return true, false, fmt.Errorf("upgraded connection: %s: %w", outcome, err)
	}
	return true, false, nil
}

// sendBuf gives the connection a send buffer for an exchange.
func (c *conn) sendBuf() *sendBuf {
	b, _ := c.p.sendBufs.Get().(*sendBuf)
	if b == nil {
		b = newSendBuf()
	}
	c.out = b
	return b
}

// releaseSendBuf returns the exchange's send buffer, if it still has
// one, to the pool. It must be flushed.
func (c *conn) releaseSendBuf() {
	b := c.out
	if b == nil {
		return
	}
	c.out = nil
	b.reset(nil)
	c.p.sendBufs.Put(b)
}

// bodyFailed returns how the client's request body failed, if it did.
func (rq *request) bodyFailed() *bodyError {
	if rq.body == nil {
		return nil
	}
	return rq.body.failed()
}

// reply sends the client an error response that closes the connection.
func (c *conn) reply(code int, msg string) {
	body := fmt.Sprintf("%d %s: %s\n", code, http.StatusText(code), msg)
	c.writeIdle(time.Now())
	fmt.Fprintf(c.client, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		code, http.StatusText(code), len(body), body)
}

// countingWriter adds what it writes to a flow counter; idle: it writes
// to that connection's client, whose write deadline it moves first
// (writeIdle); up: to that connection's backend, whose deadline it moves
// first (upstreamDeadline).
type countingWriter struct {
	w        io.Writer
	n        *atomic.Int64
	idle, up *conn
}

func (w *countingWriter) Write(p []byte) (int, error) {
	if c := w.idle; c != nil {
		c.writeIdle(time.Now())
	}
	if c := w.up; c != nil {
		if c.watchEarly {
			n, err := c.writeUpstream(p)
			w.n.Add(int64(n))
			return n, err
		}
		c.upstreamDeadline(time.Now())
	}
	n, err := w.w.Write(p)
	w.n.Add(int64(n))
	return n, err
}

// earlyPoll is how long a write of a request body may take nothing
// before the proxy looks for an early response (writeUpstream).
const earlyPoll = 200 * time.Millisecond

// errEarlyResponse ends the writing of a request whose backend refused
// it before it took the whole body.
var errEarlyResponse = errors.New("the backend refused the request before it took the whole body")

// writeUpstream writes p, part of a request with a body, to the backend.
// When the backend takes nothing for earlyPoll and has sent a response
// that refuses the request (status 400 or more: a 413 or 401 for an
// upload it will not read), it ends with errEarlyResponse, and the proxy
// relays that response instead of waiting http.upstream_timeout for a
// backend that waits for it to be read. A backend that answered and goes
// on reading (a streaming upload's 200) gets the whole body. Each write
// that moves bytes moves the backend's deadline, as countingWriter does.
func (c *conn) writeUpstream(p []byte) (int, error) {
	c.upstreamDeadline(time.Now())
	n, err := c.upIO.WriteNow(p)
	if err != nil || n == len(p) {
		return n, err
	}
	defer func() { c.up.SetWriteDeadline(c.upDeadline) }() // what upstreamDeadline set last, or none
	for n < len(p) {
		wait := time.Now().Add(earlyPoll)
		if !c.upDeadline.IsZero() && c.upDeadline.Before(wait) {
			wait = c.upDeadline
		}
		c.up.SetWriteDeadline(wait)
		m, err := c.upIO.Write(p[n:])
		n += m
		if m > 0 {
			c.upstreamDeadline(time.Now())
		}
		switch {
		case err == nil:
		case !errors.Is(err, os.ErrDeadlineExceeded),
			!c.upDeadline.IsZero() && !time.Now().Before(c.upDeadline):
			return n, err
		case m == 0 && c.earlyStatus() >= 400:
			return n, errEarlyResponse
		}
	}
	return n, nil
}
