package httpproxy

import (
	"bytes"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// idlePool holds a backend's idle upstream connections (upstream
// keep-alive, as nginx's `keepalive` and HAProxy's `http-reuse`): a
// client connection that ends gives its upstream connection back, and the
// next request to that backend from any client takes it instead of
// connecting. That saves a TCP handshake and teardown at the gateway and
// at the backend for every client connection, which is most of the cost
// of a client that sends one request per connection.
//
// Only connections whose every exchange ended cleanly, whose backend did
// not ask to close, and that were never spliced come back (conn.release).
type idlePool struct {
	mu     sync.Mutex
	conns  []idleConn // oldest first; taken from the end (the freshest)
	closed bool
}

type idleConn struct {
	c     *net.TCPConn
	since time.Time
}

// put keeps c unless the pool holds max already or is closed; it
// reports whether it kept it (if not, the caller closes it).
func (ip *idlePool) put(c *net.TCPConn, now time.Time, max int) bool {
	ip.mu.Lock()
	defer ip.mu.Unlock()
	if ip.closed || len(ip.conns) >= max {
		return false
	}
	ip.conns = append(ip.conns, idleConn{c: c, since: now})
	return true
}

// take returns the freshest idle connection that is still open and
// idle for less than maxIdle, closing those it finds expired or closed
// by the backend; nil when there is none.
func (ip *idlePool) take(now time.Time, maxIdle time.Duration) *net.TCPConn {
	for {
		ip.mu.Lock()
		n := len(ip.conns)
		if n == 0 {
			ip.mu.Unlock()
			return nil
		}
		ic := ip.conns[n-1]
		ip.conns[n-1] = idleConn{}
		ip.conns = ip.conns[:n-1]
		ip.mu.Unlock()
		if now.Sub(ic.since) < maxIdle && quiet(ic.c) {
			return ic.c
		}
		// The freshest is expired or gone: so may be the older ones,
		// which the next turn (or prune) looks at.
		ic.c.Close()
	}
}

// prune closes the connections idle for maxIdle or more.
func (ip *idlePool) prune(now time.Time, maxIdle time.Duration) {
	ip.mu.Lock()
	i := 0
	for i < len(ip.conns) && now.Sub(ip.conns[i].since) >= maxIdle {
		i++
	}
	expired := append([]idleConn(nil), ip.conns[:i]...)
	ip.conns = append(ip.conns[:0], ip.conns[i:]...)
	ip.mu.Unlock()
	for _, ic := range expired {
		ic.c.Close()
	}
}

// close closes every idle connection, and the pool: what is put in it
// later is refused.
func (ip *idlePool) close() {
	ip.mu.Lock()
	conns := ip.conns
	ip.conns, ip.closed = nil, true
	ip.mu.Unlock()
	for _, ic := range conns {
		ic.c.Close()
	}
}

// len is the number of idle connections.
func (ip *idlePool) len() int {
	ip.mu.Lock()
	defer ip.mu.Unlock()
	return len(ip.conns)
}

// quiet reports whether an idle connection can carry a request: the
// backend has neither closed nor reset it, nor sent anything unasked
// (a late 408, say, which would be read as the next request's answer).
// One non-blocking peek; a backend that closes right after it is
// covered by conn.send's retry.
func quiet(c *net.TCPConn) bool {
	var b [1]byte
	_, err := peek(c, b[:])
	return errors.Is(err, unix.EAGAIN)
}

// earlyStatus returns the status of a final response the backend has
// sent and the proxy has not read yet, 0 if none (yet). Interim heads
// are passed over (a backend that said 100 Continue waits for the body),
// but a 101 is not: what follows it is the new protocol's, and the
// request's body goes on. A backend that sent a response and then reset
// the connection still has it read (the kernel keeps what arrived
// before a reset).
func (c *conn) earlyStatus() int {
	var b [512]byte
	n, err := peek(c.up, b[:])
	if err != nil || n <= 0 {
		return 0
	}
	return finalStatus(b[:n])
}

// peek reads what c received into b without taking it and without
// waiting: EAGAIN when nothing came, 0 bytes at the peer's FIN.
func peek(c *net.TCPConn, b []byte) (n int, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return true // never wait
	})
	if err != nil {
		return 0, err
	}
	return n, rerr
}

// finalStatus returns the status code of the first final response in
// data, the start of what a backend sent: 0 when data holds interim
// heads only, too little to tell, or a 101; 999 for what is no response
// (read, it is refused as unreadable).
func finalStatus(data []byte) int {
	for len(data) > 0 {
		if len(data) < len("HTTP/1.1 200") {
			return 0 // too little to tell yet
		}
		code := data[9:12]
		if !bytes.HasPrefix(data, []byte("HTTP/1.")) || data[8] != ' ' || !allDigits(code) {
			return 999
		}
		status := int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
		switch {
		case status == http.StatusSwitchingProtocols:
			return 0
		case status >= 200:
			return status
		}
		end := bytes.Index(data, []byte("\r\n\r\n"))
		if end < 0 {
			return 0 // an interim head, not whole yet
		}
		data = data[end+4:]
	}
	return 0
}
