package testnet

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// RandomStream is an endless, seeded pseudo-random byte stream (ChaCha8:
// fast enough to feed a 20 Gbit/s link from one core).
type RandomStream struct{ rng *rand.ChaCha8 }

// NewRandomStream returns the stream for seed.
func NewRandomStream(seed uint64) *RandomStream {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return &RandomStream{rng: rand.NewChaCha8(s)}
}

func (r *RandomStream) Read(p []byte) (int, error) { return r.rng.Read(p) }

// Listen opens a TCP listener inside the host's namespace.
func (h *Host) Listen(addr netip.AddrPort) (*net.TCPListener, error) {
	var ln net.Listener
	network := "tcp4"
	if addr.Addr().Is6() {
		network = "tcp6"
	}
	err := h.Do(func() (err error) {
		ln, err = net.Listen(network, addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// Dial connects from inside the host's namespace.
func (h *Host) Dial(addr netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	network := "tcp4"
	if addr.Addr().Is6() {
		network = "tcp6"
	}
	err := h.Do(func() (err error) {
		c, err = net.DialTimeout(network, addr.String(), timeout)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// Side is what one end of a transfer sent and received.
type Side struct {
	Sent, Received         int64
	SentHash, ReceivedHash [sha256.Size]byte
	Local                  netip.AddrPort // this end's own address
	Peer                   netip.AddrPort // the address the other end appeared to have
	Err                    error
}

// Transfer is a bidirectional transfer between a client and a server.
type Transfer struct {
	Client, Server Side
	Elapsed        time.Duration
	Seed           uint64 // the options' seed
}

// CheckPrefix returns an error unless what each end received is an
// unaltered prefix of what the other sent: for transfers that may end in
// a reset but must never deliver a wrong byte.
func (t *Transfer) CheckPrefix() error {
	var errs []error
	for _, c := range []struct {
		name string
		seed uint64
		side *Side
	}{{"client->server", t.Seed, &t.Server}, {"server->client", t.Seed + 1, &t.Client}} {
		h := sha256.New()
		if _, err := io.CopyN(h, NewRandomStream(c.seed), c.side.Received); err != nil {
			return err
		}
		if [sha256.Size]byte(h.Sum(nil)) != c.side.ReceivedHash {
			errs = append(errs, fmt.Errorf("%s: the %d bytes received are not what was sent", c.name, c.side.Received))
		}
	}
	return errors.Join(errs...)
}

// Check returns an error unless every byte sent each way arrived intact.
func (t *Transfer) Check() error {
	var errs []error
	if t.Client.Err != nil {
		errs = append(errs, fmt.Errorf("client: %w", t.Client.Err))
	}
	if t.Server.Err != nil {
		errs = append(errs, fmt.Errorf("server: %w", t.Server.Err))
	}
	if t.Client.Sent != t.Server.Received || t.Client.SentHash != t.Server.ReceivedHash {
		errs = append(errs, fmt.Errorf("client->server: sent %d bytes sha256 %x, server received %d bytes sha256 %x",
			t.Client.Sent, t.Client.SentHash[:8], t.Server.Received, t.Server.ReceivedHash[:8]))
	}
	if t.Server.Sent != t.Client.Received || t.Server.SentHash != t.Client.ReceivedHash {
		errs = append(errs, fmt.Errorf("server->client: sent %d bytes sha256 %x, client received %d bytes sha256 %x",
			t.Server.Sent, t.Server.SentHash[:8], t.Client.Received, t.Client.ReceivedHash[:8]))
	}
	return errors.Join(errs...)
}

// TransferOptions shape a transfer.
type TransferOptions struct {
	C2S, S2C int64  // bytes each way
	Seed     uint64 // data seed; the two directions use Seed and Seed+1
	// Progress, if set, is called from the client's sending side after
	// each write with the number of bytes sent so far.
	Progress func(sent int64)
	// WriteSize is the size of each write (default 64 KiB); small writes
	// make small segments.
	WriteSize int
	Timeout   time.Duration // whole transfer; default 2 minutes
	// Rate paces each direction to this many bytes per second (0: as
	// fast as it goes), to keep a flow busy for a known time.
	Rate int64
}

// RunTransfer sends opt.C2S bytes from client to server and opt.S2C bytes
// back at the same time, over a connection the client opens to dst; the
// server listens on ln (which it accepts one connection from). Both ends
// hash what they send and receive.
func RunTransfer(client *Host, ln *net.TCPListener, dst netip.AddrPort, opt TransferOptions) *Transfer {
	if opt.Timeout == 0 {
		opt.Timeout = 2 * time.Minute
	}
	accepted := make(chan *net.TCPConn, 1)
	var acceptErr error
	go func() {
		ln.SetDeadline(time.Now().Add(opt.Timeout))
		c, err := ln.AcceptTCP()
		acceptErr = err
		accepted <- c
	}()
	c, err := client.Dial(dst, 10*time.Second)
	if err != nil {
		ln.Close() // unblock the accept
		<-accepted
		return &Transfer{Client: Side{Err: fmt.Errorf("dial %s: %w", dst, err)}}
	}
	s := <-accepted
	if s == nil {
		c.Close()
		return &Transfer{Server: Side{Err: fmt.Errorf("accept: %w", acceptErr)}}
	}
	return Exchange(c, s, opt)
}

// Exchange runs a transfer over an established connection: c is the
// client's end, s the server's. Both are closed at the end.
func Exchange(c, s *net.TCPConn, opt TransferOptions) *Transfer {
	if opt.Timeout == 0 {
		opt.Timeout = 2 * time.Minute
	}
	t := &Transfer{Seed: opt.Seed}
	start := time.Now()
	deadline := start.Add(opt.Timeout)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer s.Close()
		s.SetDeadline(deadline)
		t.Server.Peer = s.RemoteAddr().(*net.TCPAddr).AddrPort()
		t.Server.Local = s.LocalAddr().(*net.TCPAddr).AddrPort()
		exchange(s, &t.Server, opt.S2C, opt.Seed+1, opt.WriteSize, opt.Rate, nil)
	}()
	go func() {
		defer wg.Done()
		defer c.Close()
		c.SetDeadline(deadline)
		t.Client.Peer = c.RemoteAddr().(*net.TCPAddr).AddrPort()
		t.Client.Local = c.LocalAddr().(*net.TCPAddr).AddrPort()
		exchange(c, &t.Client, opt.C2S, opt.Seed, opt.WriteSize, opt.Rate, opt.Progress)
	}()
	wg.Wait()
	t.Elapsed = time.Since(start)
	return t
}

// Mux accepts every connection of a listener and hands each to the
// transfer that opened it, so many transfers can share one server port. A
// transfer's client first sends an 8-byte token (not part of the hashed
// data) that names it.
type Mux struct {
	ln     *net.TCPListener
	mu     sync.Mutex
	wait   map[uint64]chan *net.TCPConn
	tokens atomic.Uint64
}

// NewMux starts accepting on ln.
func NewMux(ln *net.TCPListener) *Mux {
	m := &Mux{ln: ln, wait: map[uint64]chan *net.TCPConn{}}
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				var tok [8]byte
				c.SetReadDeadline(time.Now().Add(30 * time.Second))
				if _, err := io.ReadFull(c, tok[:]); err != nil {
					c.Close()
					return
				}
				c.SetReadDeadline(time.Time{})
				m.slot(binary.BigEndian.Uint64(tok[:])) <- c
			}()
		}
	}()
	return m
}

func (m *Mux) slot(tok uint64) chan *net.TCPConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch, ok := m.wait[tok]
	if !ok {
		ch = make(chan *net.TCPConn, 1)
		m.wait[tok] = ch
	}
	return ch
}

// Transfer dials dst from client and runs a transfer with the server side
// the mux accepted for it.
func (m *Mux) Transfer(client *Host, dst netip.AddrPort, opt TransferOptions) *Transfer {
	c, err := client.Dial(dst, 10*time.Second)
	if err != nil {
		return &Transfer{Client: Side{Err: fmt.Errorf("dial %s: %w", dst, err)}}
	}
	tok := m.tokens.Add(1)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], tok)
	if _, err := c.Write(b[:]); err != nil {
		c.Close()
		return &Transfer{Client: Side{Err: fmt.Errorf("send token: %w", err)}}
	}
	// A connection the gateway accepted and then reset (a daemon that
	// stops) never reaches the server: waited for 30 s whatever the
	// transfer's own Timeout, it made a test 20 s longer.
	wait := 30 * time.Second
	if opt.Timeout > 0 {
		wait = min(wait, opt.Timeout)
	}
	select {
	case s := <-m.slot(tok):
		m.mu.Lock()
		delete(m.wait, tok)
		m.mu.Unlock()
		return Exchange(c, s, opt)
	case <-time.After(wait):
		c.Close()
		return &Transfer{Server: Side{Err: fmt.Errorf("connection %v (token %d) never reached the server", c.LocalAddr(), tok)}}
	}
}

// Close stops accepting.
func (m *Mux) Close() error { return m.ln.Close() }

// exchange sends n bytes of the seed's stream and half-closes, while
// reading everything the peer sends until EOF. A rate above 0 paces the
// sending to that many bytes per second.
func exchange(c *net.TCPConn, side *Side, n int64, seed uint64, writeSize int, rate int64, progress func(int64)) {
	if writeSize == 0 {
		writeSize = 64 << 10
	}
	var wg sync.WaitGroup
	var werr, rerr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		h := sha256.New()
		src := io.LimitReader(NewRandomStream(seed), n)
		buf := make([]byte, writeSize)
		start := time.Now()
		for {
			k, err := io.ReadFull(src, buf)
			if k > 0 {
				h.Write(buf[:k])
				if _, err := c.Write(buf[:k]); err != nil {
					werr = fmt.Errorf("write after %d bytes: %w", side.Sent, err)
					return
				}
				side.Sent += int64(k)
				if progress != nil {
					progress(side.Sent)
				}
				if rate > 0 {
					time.Sleep(time.Until(start.Add(time.Duration(side.Sent * int64(time.Second) / rate))))
				}
			}
			if err != nil {
				break
			}
		}
		copy(side.SentHash[:], h.Sum(nil))
		if err := c.CloseWrite(); err != nil {
			werr = fmt.Errorf("close write: %w", err)
		}
	}()
	h := sha256.New()
	cw := &countingWriter{h: h}
	_, rerr = io.CopyBuffer(cw, c, make([]byte, 256<<10))
	side.Received = cw.n
	copy(side.ReceivedHash[:], h.Sum(nil))
	if rerr != nil {
		rerr = fmt.Errorf("read after %d bytes: %w", cw.n, rerr)
	}
	wg.Wait()
	side.Err = errors.Join(werr, rerr)
}

type countingWriter struct {
	h hash.Hash
	n int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return w.h.Write(p)
}

// Streams serves transfers whose client starts sending at once: it writes
// a 24-byte header (seed, bytes client to server, bytes server to client)
// and its data right behind it, without waiting for the server, so data
// is in flight from the first round trip on (a splice right after connect
// meets a busy flow). Seeds name the transfers and must be unique.
type Streams struct {
	ln      *net.TCPListener
	timeout time.Duration
	mu      sync.Mutex
	done    map[uint64]chan Side
}

// ServeStreams starts accepting on ln; each connection runs until its
// transfer ends or timeout passes.
func ServeStreams(ln *net.TCPListener, timeout time.Duration) *Streams {
	s := &Streams{ln: ln, timeout: timeout, done: map[uint64]chan Side{}}
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go s.serve(c)
		}
	}()
	return s
}

func (s *Streams) slot(seed uint64) chan Side {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch, ok := s.done[seed]
	if !ok {
		ch = make(chan Side, 1)
		s.done[seed] = ch
	}
	return ch
}

func (s *Streams) serve(c *net.TCPConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(s.timeout))
	var hdr [24]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	seed := binary.BigEndian.Uint64(hdr[:])
	var side Side
	side.Peer = c.RemoteAddr().(*net.TCPAddr).AddrPort()
	side.Local = c.LocalAddr().(*net.TCPAddr).AddrPort()
	exchange(c, &side, int64(binary.BigEndian.Uint64(hdr[16:])), seed+1, 0, 0, nil)
	s.slot(seed) <- side
}

// Transfer runs one transfer from client to dst (which must reach this
// server): opt.C2S and opt.S2C bytes, data seeds opt.Seed and opt.Seed+1.
func (s *Streams) Transfer(client *Host, dst netip.AddrPort, opt TransferOptions) *Transfer {
	t := &Transfer{Seed: opt.Seed}
	start := time.Now()
	c, err := client.Dial(dst, 10*time.Second)
	if err != nil {
		t.Client.Err = fmt.Errorf("dial %s: %w", dst, err)
		return t
	}
	c.SetDeadline(start.Add(s.timeout))
	var hdr [24]byte
	binary.BigEndian.PutUint64(hdr[:], opt.Seed)
	binary.BigEndian.PutUint64(hdr[8:], uint64(opt.C2S))
	binary.BigEndian.PutUint64(hdr[16:], uint64(opt.S2C))
	t.Client.Local = c.LocalAddr().(*net.TCPAddr).AddrPort()
	t.Client.Peer = c.RemoteAddr().(*net.TCPAddr).AddrPort()
	if _, err := c.Write(hdr[:]); err != nil {
		c.Close()
		t.Client.Err = fmt.Errorf("send header: %w", err)
		return t
	}
	exchange(c, &t.Client, opt.C2S, opt.Seed, opt.WriteSize, opt.Rate, opt.Progress)
	c.Close()
	select {
	case t.Server = <-s.slot(opt.Seed):
	case <-time.After(time.Until(start.Add(s.timeout)) + time.Second):
		t.Server.Err = fmt.Errorf("the server side of %v never finished", t.Client.Local)
	}
	s.mu.Lock()
	delete(s.done, opt.Seed)
	s.mu.Unlock()
	t.Elapsed = time.Since(start)
	return t
}

// Close stops accepting.
func (s *Streams) Close() error { return s.ln.Close() }
