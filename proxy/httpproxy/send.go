package httpproxy

import (
	"errors"
	"io"
	"os"
	"time"
)

// sendBufSize is how much of a message the proxy gathers before it must
// write: a response head and a small body (the common case) go out in
// one write system call.
const sendBufSize = 32 << 10

// sendBuf gathers what the proxy writes to one socket, so that a message
// head written field by field (head.go writes each header field in four
// pieces) and the part of the body already read go out in one write.
//
// Nothing waits in it for more data: the connection's readers
// (flushReader) flush it before they read a socket, that is before the
// connection's goroutine can block, so a response that streams (a
// chunked body, server-sent events) reaches the client as it arrives.
// Write, WriteString and ReadFrom copy into the buffer; only Flush and a
// full buffer write to the socket.
//
// A flush may come while ReadFrom reads into the buffer's free space
// (the reader it reads from is the one that flushes): buf[sent:] is what
// is not written yet, and the buffer is emptied only outside a read, so
// the bytes the read is putting behind sent stay where they are; the
// space before sent is taken back when the buffer is next emptied.
type sendBuf struct {
	w       io.Writer // where the bytes go (a counting socket writer)
	buf     []byte    // buf[sent:] is not written yet
	sent    int
	reading bool  // ReadFrom is reading into buf[len(buf):cap(buf)]
	err     error // a write failed: every later call returns it
}

func newSendBuf() *sendBuf { return &sendBuf{buf: make([]byte, 0, sendBufSize)} }

// reset points b at w, empty (b must have been flushed).
func (b *sendBuf) reset(w io.Writer) {
	b.w, b.buf, b.sent, b.reading, b.err = w, b.buf[:0], 0, false, nil
}

// Buffered is how many bytes wait to be written.
func (b *sendBuf) Buffered() int { return len(b.buf) - b.sent }

// Flush writes what is buffered.
func (b *sendBuf) Flush() error {
	if b.err != nil {
		return b.err
	}
	if b.sent < len(b.buf) {
		if _, err := b.w.Write(b.buf[b.sent:]); err != nil {
			b.err = err
			return err
		}
	}
	b.sent = len(b.buf)
	if !b.reading {
		b.buf, b.sent = b.buf[:0], 0
	}
	return nil
}

func (b *sendBuf) Write(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if len(p) > cap(b.buf)-len(b.buf) {
		if err := b.Flush(); err != nil {
			return 0, err
		}
		if len(p) >= cap(b.buf) {
			n, err := b.w.Write(p)
			if err != nil {
				b.err = err
			}
			return n, err
		}
	}
	b.buf = append(b.buf, p...)
	return len(p), nil
}

func (b *sendBuf) WriteString(s string) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if len(s) > cap(b.buf)-len(b.buf) {
		if err := b.Flush(); err != nil {
			return 0, err
		}
		if len(s) >= cap(b.buf) {
			return b.Write([]byte(s))
		}
	}
	b.buf = append(b.buf, s...)
	return len(s), nil
}

// WriteByte makes b an io.ByteWriter, which Request.Write takes as
// buffered: it would wrap anything else in a bufio.Writer of its own.
func (b *sendBuf) WriteByte(c byte) error {
	if b.err != nil {
		return b.err
	}
	if len(b.buf) == cap(b.buf) {
		if err := b.Flush(); err != nil {
			return err
		}
	}
	b.buf = append(b.buf, c)
	return nil
}

// minRead is the least free space ReadFrom reads into; with less, it
// writes what it has first.
const minRead = 4 << 10

// ReadFrom reads r to its end into the buffer, writing the buffer out
// when it fills (io.Copy uses it: no copy buffer of its own).
func (b *sendBuf) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	for {
		if b.err != nil {
			return n, b.err
		}
		if b.sent == len(b.buf) || cap(b.buf)-len(b.buf) < minRead {
			// All written (a flush during the last read), or little
			// room left: start again at the front.
			if err := b.Flush(); err != nil {
				return n, err
			}
		}
		start := len(b.buf)
		b.reading = true
		m, err := r.Read(b.buf[start:cap(b.buf)])
		b.reading = false
		b.buf = b.buf[:start+m]
		n += int64(m)
		if err == io.EOF {
			return n, b.err
		}
		if err != nil {
			return n, err
		}
	}
}

// flushReader reads a socket for one of the connection's bufio.Readers,
// flushing the connection's pending output first: the proxy never
// blocks on a read with something relayed still in its buffer.
type flushReader struct {
	r   io.Reader
	out **sendBuf // the connection's buffer of the exchange in flight; nil between exchanges
	n   int64     // bytes read
	// body is the connection whose client this reads (nil: the
	// backend's): while a request body comes (body.bodyIdle), each read
	// moves the read deadline, so a body that stalls for idle_timeout
	// ends the connection and a slow one that keeps coming does not.
	body *conn
	// up is the connection whose backend this reads: each read moves
	// the backend's deadline (upstreamDeadline).
	up *conn
}

func (f *flushReader) Read(p []byte) (int, error) {
	// After a failed write (b.err) nothing more is read either: a
	// write of a large piece goes to the socket directly and leaves
	// nothing buffered, and closing net/http's body of a response whose
	// client left (Response.Write does, on the error) would read the
	// rest of it, an endless stream for ever.
	if b := *f.out; b != nil && (b.err != nil || b.Buffered() > 0) {
		if err := b.Flush(); err != nil {
			return 0, err
		}
	}
	if c := f.body; c != nil && c.bodyIdle > 0 {
		c.idleDeadline(time.Now(), c.bodyIdle)
	}
	if c := f.up; c != nil {
		c.upstreamDeadline(time.Now())
	}
	n, err := f.r.Read(p)
	f.n += int64(n)
	if c := f.body; c != nil && err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		c.clientStalled = true
	}
	return n, err
}
