package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// maxChunkLine bounds a chunk-size line with its extensions.
const maxChunkLine = 4096

// bodyError is a fault of the client's request body: bad chunked framing,
// or the client ending or stalling before the body's end. The request
// head already went to the backend; the proxy then answers 400 (for
// framing) and closes both connections, so the backend never sees the
// bytes that follow as a request.
type bodyError struct {
	err     error
	framing bool // the body is malformed (not just cut short)
}

func (e *bodyError) Error() string { return "request body: " + e.err.Error() }
func (e *bodyError) Unwrap() error { return e.err }

// bodyReader is a request body reader that remembers how it failed.
type bodyReader interface {
	io.Reader
	failed() *bodyError
}

// lengthReader reads a body of a Content-Length.
type lengthReader struct {
	r    *bufio.Reader
	left int64
	err  *bodyError
}

func (l *lengthReader) failed() *bodyError { return l.err }

func (l *lengthReader) Read(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	if l.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		l.err = &bodyError{err: err}
		return n, l.err
	}
	return n, nil
}

// chunkedReader decodes a chunked body (RFC 9112 section 7.1) strictly:
// chunk sizes are 1 to 16 hex digits, nothing else (no sign, no 0x, no
// spaces unless extensions follow); every line ends in CRLF; each chunk's
// data is followed by CRLF; the trailer section is read, checked like
// field lines and dropped.
type chunkedReader struct {
	r       *bufio.Reader
	left    int64 // data left in the current chunk
	started bool  // a chunk was read: its data ends with CRLF
	done    bool
	err     *bodyError
}

func (c *chunkedReader) failed() *bodyError { return c.err }

func (c *chunkedReader) fail(framing bool, err error) error {
	if !framing && errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	c.err = &bodyError{err: err, framing: framing}
	return c.err
}

var (
	errChunkLine    = errors.New("chunked: line not ending in CRLF, or too long")
	errChunkSize    = errors.New("chunked: invalid chunk size")
	errChunkData    = errors.New("chunked: chunk data not followed by CRLF")
	errChunkTrailer = errors.New("chunked: invalid trailer field")
)

func (c *chunkedReader) Read(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	if c.done {
		return 0, io.EOF
	}
	for c.left == 0 {
		if c.started {
			crlf, err := c.r.Peek(2)
			if err != nil {
				return 0, c.fail(false, err)
			}
			if string(crlf) != "\r\n" {
				return 0, c.fail(true, errChunkData)
			}
			c.r.Discard(2)
		}
		line, err := c.line()
		if err != nil {
			return 0, err
		}
		size, ok := parseChunkSize(line)
		if !ok {
			return 0, c.fail(true, errChunkSize)
		}
		if size == 0 {
			if err := c.trailers(); err != nil {
				return 0, err
			}
			c.done = true
			return 0, io.EOF
		}
		c.left, c.started = size, true
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	if err != nil {
		return n, c.fail(false, err)
	}
	return n, nil
}

// line reads a line ending in CRLF and returns it without the CRLF.
func (c *chunkedReader) line() ([]byte, error) {
	line, err := c.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxChunkLine {
		return nil, c.fail(true, errChunkLine)
	}
	if err != nil {
		return nil, c.fail(false, err)
	}
	if len(line) < 2 || line[len(line)-2] != '\r' || bytes.IndexByte(line[:len(line)-2], '\r') >= 0 {
		return nil, c.fail(true, errChunkLine)
	}
	return line[:len(line)-2], nil
}

// trailers reads the trailer section after the last chunk, up to its
// empty line, and drops it.
func (c *chunkedReader) trailers() error {
	total := 0
	for {
		line, err := c.line()
		if err != nil {
			return err
		}
		if len(line) == 0 {
			return nil
		}
		total += len(line)
		if total > maxHeadBytes || !validFieldLine(line) {
			return c.fail(true, errChunkTrailer)
		}
	}
}

// parseChunkSize parses chunk-size [ BWS ";" chunk-ext ].
func parseChunkSize(line []byte) (int64, bool) {
	var size int64
	i := 0
	for ; i < len(line) && isHex(line[i]); i++ {
		if i == 16 {
			return 0, false
		}
		size = size<<4 | int64(unhex(line[i]))
	}
	if i == 0 || size < 0 {
		return 0, false
	}
	ext := line[i:]
	if len(ext) == 0 {
		return size, true
	}
	ext = bytes.TrimLeft(ext, " \t")
	if len(ext) == 0 || ext[0] != ';' {
		return 0, false
	}
	for _, c := range ext {
		if c < ' ' && c != '\t' || c == 0x7f {
			return 0, false
		}
	}
	return size, true
}

// validFieldLine: name ":" value, the name a token, no control bytes in
// the value, no obs-fold.
func validFieldLine(line []byte) bool {
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return false
	}
	for _, c := range line[:colon] {
		if !isTchar(c) {
			return false
		}
	}
	for _, c := range line[colon+1:] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}
