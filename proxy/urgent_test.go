package proxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sendOOB sends b with MSG_OOB: its last byte is TCP urgent data.
func sendOOB(c *net.TCPConn, b []byte) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, unix.MSG_OOB, nil)
		return serr != unix.EAGAIN
	}); err != nil {
		return err
	}
	return serr
}

// TestRelayUrgentData: bytes a peer sends as TCP urgent data (telnet's
// interrupt, an FTP client's abort through the forwarder) are relayed
// inline with the rest of the stream, which goes on after them, each
// way. splice(2) stopped at the urgent byte and returned 0, which the
// relay took for the end: it closed the direction there, and the urgent
// byte and everything after it were lost.
func TestRelayUrgentData(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	type part struct {
		b      []byte
		urgent bool
	}
	for _, c := range []struct {
		name  string
		parts []part
	}{
		{"first byte", []part{{[]byte("!"), true}, {[]byte("after"), false}}},
		{"after data", []part{{[]byte("before "), false}, {[]byte("!"), true}, {[]byte(" after"), false}}},
		{"two in a row", []part{{[]byte("a"), false}, {[]byte("!"), true}, {[]byte("?"), true}, {[]byte("b"), false}}},
		{"inside a long transfer", []part{{big, false}, {[]byte("!"), true}, {big, false}}},
	} {
		for _, s2c := range []bool{false, true} {
			name := c.name + " c2s"
			if s2c {
				name = c.name + " s2c"
			}
			t.Run(name, func(t *testing.T) {
				client, server, r := relayed(t)
				go r.Run()
				from, to := client, server
				if s2c {
					from, to = server, client
				}
				var want []byte
				go func() {
					for _, p := range c.parts {
						var err error
						if p.urgent {
							err = sendOOB(from, p.b)
						} else {
							_, err = from.Write(p.b)
						}
						if err != nil {
							t.Error(err)
						}
						// Apart, so that the urgent byte meets the
						// relay where it waits or splices.
						time.Sleep(20 * time.Millisecond)
					}
					from.CloseWrite()
				}()
				for _, p := range c.parts {
					want = append(want, p.b...)
				}
				to.SetReadDeadline(time.Now().Add(20 * time.Second))
				got, err := io.ReadAll(to)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("read %d bytes (%v), want %d; first difference at %d", len(got), err, len(want), firstDiff(got, want))
				}
			})
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
