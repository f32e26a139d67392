package tcprepair

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"spliced/splice"
	"spliced/testnet"
)

func pair(t testing.TB, network, addr string) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err == nil {
			b = c.(*net.TCPConn)
		}
	}()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	<-done
	t.Cleanup(func() { c.Close(); b.Close() })
	return c.(*net.TCPConn), b
}

// TestCaptureMatchesPeer: after traffic each way, one end's captured
// sequence numbers equal what its peer expects, the negotiated options are
// seen, and closing the captured socket sends nothing (the peer reads
// neither EOF nor a reset).
func TestCaptureMatchesPeer(t *testing.T) {
	testnet.Privileged(t)
	for _, c := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		t.Run(c.network, func(t *testing.T) {
			a, b := pair(t, c.network, c.addr)
			a.Write(make([]byte, 1000))
			io.ReadFull(b, make([]byte, 1000))
			b.Write(make([]byte, 300))
			io.ReadFull(a, make([]byte, 300))
			// Let the acks land so both send queues are empty.
			testnet.Eventually(t, 5*time.Second, func() error {
				for _, x := range []*net.TCPConn{a, b} {
					if in, out, err := Queues(x); err != nil || in != 0 || out != 0 {
						return errors.New("queues not empty")
					}
				}
				return nil
			})
			sa, err := Capture(a)
			if err != nil {
				t.Fatal(err)
			}
			sb, err := Capture(b)
			if err != nil {
				t.Fatal(err)
			}
			if sa.SndNxt != sb.RcvNxt || sb.SndNxt != sa.RcvNxt {
				t.Fatalf("a snd %d rcv %d; b snd %d rcv %d", sa.SndNxt, sa.RcvNxt, sb.SndNxt, sb.RcvNxt)
			}
			if !sa.SACK || !sa.Timestamps || sa.MSS == 0 || sa.TSval == 0 || sa.RcvWnd == 0 || sa.SndWnd == 0 {
				t.Fatalf("capture incomplete: %+v", sa)
			}
			// b's segments fit what a announced (both net of the
			// timestamp option); a's peer offered windows, the largest
			// at least the last.
			if sa.AdvMSS == 0 || sb.MSS > sa.AdvMSS {
				t.Fatalf("a announced MSS %d, b sends segments of %d", sa.AdvMSS, sb.MSS)
			}
			if sa.MaxWnd == 0 || sa.MaxWnd < sa.SndWnd {
				t.Fatalf("a's peer's largest window %d, its last %d", sa.MaxWnd, sa.SndWnd)
			}
			if sa.SndWscale != sb.RcvWscale || sa.RcvWscale != sb.SndWscale {
				t.Fatalf("window scales disagree: a %d/%d b %d/%d", sa.SndWscale, sa.RcvWscale, sb.SndWscale, sb.RcvWscale)
			}
			if sa.Local != sb.Remote || sa.Remote != sb.Local {
				t.Fatalf("addresses: %v<->%v vs %v<->%v", sa.Local, sa.Remote, sb.Local, sb.Remote)
			}
			if err := Leave(b); err != nil {
				t.Fatal(err)
			}
			// Close a in repair mode: b must hear nothing.
			a.Close()
			b.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			_, err = b.Read(make([]byte, 1))
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("peer of a silently closed socket read %v, want a timeout", err)
			}
		})
	}
}

// TestCaptureRefusesHalfClosed: a connection that received a FIN is not
// captured, and stays usable.
func TestCaptureRefusesHalfClosed(t *testing.T) {
	testnet.Privileged(t)
	a, b := pair(t, "tcp4", "127.0.0.1:0")
	b.CloseWrite()
	testnet.Eventually(t, 5*time.Second, func() error {
		if _, err := Capture(a); !errors.Is(err, ErrNotEstablished) {
			return fmt.Errorf("capture of a half-closed connection: %v", err)
		}
		return nil
	})
	if _, err := a.Write([]byte("still usable")); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreContinuesConnection: a socket captured and closed silently is
// rebuilt from its captured state (the unsplice path), and the connection
// goes on both ways, byte for byte, without its peer noticing; an off-by-one
// in the rebuilt receive sequence makes the peer's data go nowhere (the
// negative control).
func TestRestoreContinuesConnection(t *testing.T) {
	ns := testnet.Scratch(t)
	for _, c := range []struct {
		network, addr  string
		rcvOff, sndOff int32
		works          bool
	}{
		{"tcp4", "127.0.0.1:0", 0, 0, true}, {"tcp6", "[::1]:0", 0, 0, true},
		// Negative controls: one byte off either way, in either queue.
		{"tcp4", "127.0.0.1:0", 1, 0, false}, {"tcp4", "127.0.0.1:0", -1, 0, false},
		{"tcp4", "127.0.0.1:0", 0, 1, false}, {"tcp4", "127.0.0.1:0", 0, -1, false},
	} {
		t.Run(fmt.Sprintf("%s rcv%+d snd%+d", c.network, c.rcvOff, c.sndOff), func(t *testing.T) {
			err := ns.Do(func() error {
				a, b := pair(t, c.network, c.addr)
				a.Write([]byte("before"))
				io.ReadFull(b, make([]byte, 6))
				testnet.Eventually(t, 5*time.Second, func() error {
					if _, out, err := Queues(a); err != nil || out != 0 {
						return errors.New("send queue not empty")
					}
					return nil
				})
				st, err := Capture(a)
				if err != nil {
					return err
				}
				a.Close()
				st.RcvNxt += splice.Seq(c.rcvOff)
				st.SndNxt += splice.Seq(c.sndOff)
				st.TSval += 10
				// A largest window no peer here offers, to find again.
				st.MaxWnd = st.SndWnd + 12345
				r, err := Restore(&st)
				if err != nil {
					return err
				}
				defer r.Close()
				if err := Resume(r); err != nil {
					return err
				}
				msg := []byte("after the restore, from the rebuilt socket")
				if _, err := r.Write(msg); err != nil {
					return err
				}
				got := make([]byte, len(msg))
				b.SetReadDeadline(time.Now().Add(time.Second))
				_, err = io.ReadFull(b, got)
				forth := err == nil && string(got) == string(msg)
				reply := []byte("and back to it")
				b.Write(reply)
				back := make([]byte, len(reply))
				r.SetReadDeadline(time.Now().Add(time.Second))
				_, err = io.ReadFull(r, back)
				if works := forth && err == nil && string(back) == string(reply); works != c.works {
					return fmt.Errorf("peer read %q, rebuilt socket read %q (%v); want the connection to work: %v", got, back, err, c.works)
				}
				if !c.works {
					return nil
				}
				// The rebuilt socket keeps the peer's largest window, as
				// a splice of it reads it again.
				testnet.Eventually(t, 5*time.Second, func() error {
					if _, out, err := Queues(r); err != nil || out != 0 {
						return errors.New("send queue not empty")
					}
					return nil
				})
				again, err := Capture(r)
				if err != nil {
					return err
				}
				if again.MaxWnd != st.MaxWnd {
					return fmt.Errorf("rebuilt socket's peer's largest window %d, restored %d", again.MaxWnd, st.MaxWnd)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestUnreadAfterCapture: bytes that reach a socket after its capture are
// queued and acknowledged as usual (repair mode stops what the socket
// sends, not what it receives), and Unread sees them: what the splice's
// check after a capture relies on (gateway.lateBytes). Left in the socket,
// they would be lost with it while their sender counts them delivered.
func TestUnreadAfterCapture(t *testing.T) {
	testnet.Privileged(t)
	a, b := pair(t, "tcp4", "127.0.0.1:0")
	if n, err := Unread(a); err != nil || n != 0 {
		t.Fatalf("before: %d unread, %v", n, err)
	}
	if _, err := Capture(a); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	testnet.Eventually(t, 5*time.Second, func() error {
		if n, err := Unread(a); err != nil || n != 4 {
			return fmt.Errorf("captured socket: %d bytes unread (%v), want 4", n, err)
		}
		return nil
	})
	testnet.Eventually(t, 5*time.Second, func() error {
		if _, out, err := Queues(b); err != nil || out != 0 {
			return fmt.Errorf("the sender has %d bytes unacknowledged (%v)", out, err)
		}
		return nil
	})
	// Out of repair mode the bytes are read as any others.
	if err := Leave(a); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(a, got); err != nil || string(got) != "late" {
		t.Fatalf("read %q after leaving repair mode: %v", got, err)
	}
}

// BenchmarkRestore: what an unsplice's rebuild costs per socket (Restore
// and Resume; the rebuilt socket is closed in repair mode, silently, and
// rebuilt again from the same state).
func BenchmarkRestore(b *testing.B) {
	ns := testnet.Scratch(b)
	err := ns.Do(func() error {
		a, _ := pair(b, "tcp4", "127.0.0.1:0")
		st, err := Capture(a)
		if err != nil {
			return err
		}
		a.Close()
		b.ReportAllocs()
		for b.Loop() {
			r, err := Restore(&st)
			if err != nil {
				return err
			}
			r.Close()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
