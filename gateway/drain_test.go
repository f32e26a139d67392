package gateway

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"spliced/nfq"
	"spliced/splice"
	"spliced/tcprepair"
)

// TestWriteQueuedLosesNothing: a drain that reads bytes and cannot write
// them by its deadline (the receiver is not reading) gives up the splice
// only after it wrote them all, so the proxy that takes the flow back
// loses no byte (before: the bytes read were dropped and the receiver
// waited for them for ever).
func TestWriteQueuedLosesNothing(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	recv, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer recv.Close()
	dst.SetWriteBuffer(64 << 10)
	recv.SetReadBuffer(64 << 10)
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<20) // 16 MiB: more than both buffers hold
	deadline := time.Now().Add(50 * time.Millisecond)
	got := make(chan []byte, 1)
	go func() {
		// Start reading only after the drain's deadline passed.
		time.Sleep(time.Until(deadline) + 100*time.Millisecond)
		b, _ := io.ReadAll(io.LimitReader(recv, int64(len(payload))))
		got <- b
	}()
	w, err := writeQueued(dst, payload, deadline, time.Minute)
	if !errors.Is(err, errSlowReceiver) {
		t.Fatalf("writeQueued: %v, want errSlowReceiver", err)
	}
	if w != len(payload) {
		t.Fatalf("wrote %d of %d bytes", w, len(payload))
	}
	if b := <-got; !bytes.Equal(b, payload) {
		t.Fatalf("the receiver got %d bytes, not the %d written", len(b), len(payload))
	}
}

// TestDrainLeavesRSTsToTheSocket: a RST that arrives while a splice
// drains goes to the socket, which resets only for one at exactly its
// rcv_nxt (RFC 5961), and does not end the splice by itself: when any
// RST did, a blind attacker who sprays RSTs kept every flow relayed.
func TestDrainLeavesRSTsToTheSocket(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	keys := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, netip.MustParseAddrPort("10.1.0.2:40001"))}
	tr := newTransition(keys, 0, phaseDraining, nil)
	b := splice.AppendBareSegment(nil, keys[0], splice.Seq(123456789), splice.FlagRST, 64)
	var p splice.Packet
	if p.Parse(b) != splice.OK {
		t.Fatal("parse")
	}
	tr.mu.Lock()
	d := tr.drain(&Gateway{}, &p, &nfq.Packet{Data: b}, keys[0])
	tr.mu.Unlock()
	if d != nfq.Accept {
		t.Errorf("a RST while draining: %v, want it accepted to the socket", d)
	}
	if err := tr.interrupted(); err != nil {
		t.Errorf("a RST the socket may well refuse ended the splice: %v", err)
	}
}

// TestDrainEndsOnReset: after a RST went to a socket while the sockets
// drained, the drain looks at the sockets' state and gives up the splice
// at once when one was reset. Its SIOCOUTQ still counts the data it had
// not had acknowledged, so waiting for the queues to empty would wait
// for the drain's timeout (a client that aborts a download as its
// response is spliced); an in-window RST the socket refused ends
// nothing.
func TestDrainEndsOnReset(t *testing.T) {
	pair := func() (*net.TCPConn, *net.TCPConn) {
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		a, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		b, err := ln.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close(); b.Close() })
		return a, b
	}
	a, b := pair()
	c, _ := pair()
	tr := newTransition([2]splice.Key{}, 0, phaseDraining, nil)
	tr.rstSeen = true
	if err := tr.interrupted(a, c); err != nil {
		t.Fatalf("a RST no socket took ended the splice: %v", err)
	}
	// a sends more than b takes, then b resets: a is reset with data
	// unacknowledged.
	b.SetReadBuffer(4 << 10)
	a.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	a.Write(make([]byte, 8<<20))
	b.SetLinger(0)
	b.Close()
	if err := pollFor(func() bool { ok, _ := tcprepair.Established(a); return !ok }); err != nil {
		t.Fatal("the reset did not reach the socket")
	}
	if _, outq, err := tcprepair.Queues(a); err != nil || outq == 0 {
		t.Logf("the reset socket's send queue reads %d (%v); the case the check is for has some", outq, err)
	}
	err := tr.interrupted(a, c)
	var se *SpliceError
	if !errors.As(err, &se) || se.Reason != "the flow was reset" {
		t.Errorf("a socket the RST reset: %v, want the splice given up (the flow was reset)", err)
	}
}

// pollFor waits up to 5 s for cond.
func pollFor(cond func() bool) error {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return nil
		}
	}
	return errors.New("timed out")
}
