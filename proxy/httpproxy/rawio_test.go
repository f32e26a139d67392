package httpproxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err = net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestRawSock checks that rawSock reads and writes what net.TCPConn
// would, and fails the same ways: the proxy tells a closed client, an
// idle timeout and a reset apart by those errors.
func TestRawSock(t *testing.T) {
	t.Run("bytes both ways, larger than the socket buffers", func(t *testing.T) {
		a, b := tcpPair(t)
		var ra, rb rawSock
		ra.reset(a)
		rb.reset(b)
		want := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB: the write waits for the reader
		done := make(chan error, 1)
		go func() {
			n, err := ra.Write(want)
			if err == nil && n != len(want) {
				err = errors.New("short write")
			}
			done <- err
		}()
		got := make([]byte, 0, len(want))
		buf := make([]byte, 32<<10)
		for len(got) < len(want) {
			n, err := rb.Read(buf)
			if err != nil {
				t.Fatalf("read after %d bytes: %v", len(got), err)
			}
			got = append(got, buf[:n]...)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("the bytes read are not the bytes written")
		}
		a.CloseWrite()
		if n, err := rb.Read(buf); n != 0 || err != io.EOF {
			t.Fatalf("read at the end: %d, %v; want 0, io.EOF", n, err)
		}
	})
	t.Run("read deadline", func(t *testing.T) {
		_, b := tcpPair(t)
		var rb rawSock
		rb.reset(b)
		b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		_, err := rb.Read(make([]byte, 10))
		var ne net.Error
		if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("got %v, want a timeout", err)
		}
		if oe, ok := err.(*net.OpError); !ok || oe.Op != "read" {
			t.Fatalf("got %#v, want a *net.OpError of op read", err)
		}
	})
	t.Run("write deadline on a full socket", func(t *testing.T) {
		a, _ := tcpPair(t)
		var ra rawSock
		ra.reset(a)
		big := make([]byte, 64<<20) // nobody reads: the write fills the buffers, then waits
		a.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := ra.Write(big)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("got %v, want a timeout", err)
		}
		if n <= 0 || n >= 64<<20 {
			t.Fatalf("wrote %d bytes before the deadline, want some but not all", n)
		}
	})
	t.Run("closed while reading", func(t *testing.T) {
		_, b := tcpPair(t)
		var rb rawSock
		rb.reset(b)
		time.AfterFunc(20*time.Millisecond, func() { b.Close() })
		if _, err := rb.Read(make([]byte, 10)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("got %v, want net.ErrClosed", err)
		}
	})
	t.Run("reset by the peer", func(t *testing.T) {
		a, b := tcpPair(t)
		var rb rawSock
		rb.reset(b)
		a.SetLinger(0)
		a.Close()
		time.Sleep(20 * time.Millisecond)
		_, err := rb.Read(make([]byte, 10))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("got %v, want ECONNRESET", err)
		}
		if oe, ok := err.(*net.OpError); !ok || oe.Op != "read" {
			t.Fatalf("got %#v, want a *net.OpError of op read", err)
		}
	})
	t.Run("write after a reset", func(t *testing.T) {
		// The peer's reset makes the next writes fail (ECONNRESET, then
		// EPIPE, whose SIGPIPE the runtime ignores for a socket): an
		// error, not the end of the daemon.
		a, b := tcpPair(t)
		var rb rawSock
		rb.reset(b)
		a.SetLinger(0)
		a.Close()
		time.Sleep(20 * time.Millisecond)
		var err error
		for range 3 {
			if _, err = rb.Write([]byte("late")); err != nil {
				break
			}
		}
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("got %v, want ECONNRESET or EPIPE", err)
		}
	})
	t.Run("no allocation per call", func(t *testing.T) {
		a, b := tcpPair(t)
		var ra, rb rawSock
		ra.reset(a)
		rb.reset(b)
		msg, buf := []byte("ping"), make([]byte, 16)
		if n := testing.AllocsPerRun(1000, func() {
			if _, err := ra.Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(&rb, buf[:len(msg)]); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Fatalf("%.1f allocations per write and read, want 0", n)
		}
	})
}
