package gateway

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// The metrics and pprof listeners may be reachable by others than their
// scrapers (metrics.listen is often a LAN address). Without limits a
// client kept a connection for ever by sending one request and then
// nothing (no idle timeout), and could keep as many as it liked: each
// costs the daemon a descriptor, which the proxies' sockets share.
var (
	// httpIdleTimeout closes a connection idle between requests; above
	// the usual scrape intervals (15-60 s), so a scraper keeps its
	// connection.
	httpIdleTimeout = 2 * time.Minute
	// httpMaxConns caps the connections open at once; one more is
	// closed as soon as it is accepted.
	httpMaxConns = 32
	// httpReadTimeout bounds the reading of a request, its body
	// included (see serveHTTP).
	httpReadTimeout = 10 * time.Second
)

// serveHTTP serves h on ln with the limits above, and a write timeout
// (0: none; pprof's profiles take as long as asked). It returns the
// function that stops it.
func serveHTTP(ln net.Listener, h http.Handler, writeTimeout time.Duration) func() {
	// ReadTimeout covers a request's body: the handlers read none, and
	// the server reads what is left of it (up to 256 KiB) before it
	// answers; with no bound a client that stopped sending held its
	// slot for ever.
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: httpReadTimeout,
		IdleTimeout: httpIdleTimeout, WriteTimeout: writeTimeout}
	go srv.Serve(&cappedListener{Listener: ln, slots: make(chan struct{}, httpMaxConns)})
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}
}

// cappedListener accepts at most cap(slots) connections open at once and
// closes the others at once: a client over the cap gets its answer (the
// connection closed) instead of waiting in the backlog, and blocking
// Accept would let one client that holds the slots stall every scraper.
type cappedListener struct {
	net.Listener
	slots chan struct{}
}

func (l *cappedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &cappedConn{Conn: c, slots: l.slots}, nil
		default:
			c.Close()
		}
	}
}

// cappedConn gives its slot back when closed (http.Server closes every
// connection it served); before the close, so that a client who saw its
// connection end finds the slot free.
type cappedConn struct {
	net.Conn
	slots chan struct{}
	once  sync.Once
}

func (c *cappedConn) Close() error {
	c.once.Do(func() { <-c.slots })
	return c.Conn.Close()
}

// CloseWrite passes http.Server's half-close through: it sends the FIN
// of a connection it ends after a response and waits before closing
// (closeWriteAndWait), so that request bytes it did not read do not turn
// the close into a reset that loses the response at the client. Without
// it the wrapper hid the TCP connection's CloseWrite, and the server
// closed at once.
func (c *cappedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
