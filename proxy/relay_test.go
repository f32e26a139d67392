package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		b, _ = ln.AcceptTCP()
	}()
	a, err = net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	<-done
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// relayed builds client <-> [relay] <-> server over loopback and returns
// the two outer ends and the relay.
func relayed(t *testing.T) (client, server *net.TCPConn, r *Relay) {
	client, proxyClient := tcpPair(t)
	proxyUp, server := tcpPair(t)
	flow := NewFlow("test", "forward", netip.AddrPort{}, netip.AddrPort{})
	return client, server, &Relay{Client: proxyClient, Upstream: proxyUp, Flow: flow}
}

func TestRelayHalfClose(t *testing.T) {
	for _, first := range []string{"client", "server"} {
		t.Run(first+" closes first", func(t *testing.T) {
			client, server, r := relayed(t)
			res := make(chan Outcome, 1)
			go func() { o, _ := r.Run(); res <- o }()
			a, b := client, server
			if first == "server" {
				a, b = server, client
			}
			if _, err := a.Write([]byte("request")); err != nil {
				t.Fatal(err)
			}
			a.CloseWrite()
			got, err := io.ReadAll(b) // ends at the relayed FIN
			if err != nil || string(got) != "request" {
				t.Fatalf("half-closed side read %q, %v", got, err)
			}
			// The other direction still works after the half-close.
			if _, err := b.Write([]byte("response")); err != nil {
				t.Fatal(err)
			}
			b.CloseWrite()
			got, err = io.ReadAll(a)
			if err != nil || string(got) != "response" {
				t.Fatalf("reverse direction read %q, %v", got, err)
			}
			if o := <-res; o != Finished {
				t.Fatalf("outcome %v, want finished", o)
			}
			if r.Flow.C2S.Load()+r.Flow.S2C.Load() != int64(len("request")+len("response")) {
				t.Fatalf("counters %d/%d", r.Flow.C2S.Load(), r.Flow.S2C.Load())
			}
		})
	}
}

// TestRelayPauseResume pauses a busy relay many times and resumes it: no
// byte is lost, duplicated or reordered, and nothing is left in flight in
// user space when Run returns Paused.
func TestRelayPauseResume(t *testing.T) {
	client, server, r := relayed(t)
	data := make([]byte, 8<<20)
	rand.Read(data)
	go func() {
		client.Write(data)
		client.CloseWrite()
	}()
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(server)
		got <- b
	}()
	pauses := 0
	for !r.HalfClosed() {
		done := make(chan Outcome, 1)
		go func() { o, _ := r.Run(); done <- o }()
		time.Sleep(time.Millisecond)
		r.Pause()
		if o := <-done; o != Paused {
			t.Fatalf("pause %d: outcome %v", pauses, o)
		}
		pauses++
	}
	// client->server has ended; end server->client too and finish.
	server.CloseWrite()
	if o, err := r.Run(); o != Finished {
		t.Fatalf("final run: %v %v", o, err)
	}
	t.Logf("paused and resumed %d times", pauses)
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, sent %d; equal=%v", len(b), len(data), bytes.Equal(b, data))
	}
}

func TestRelayPauseAfterBytes(t *testing.T) {
	client, server, r := relayed(t)
	r.PauseAfter = 3 << 20
	go client.Write(make([]byte, 5<<20))
	go io.Copy(io.Discard, server)
	o, err := r.Run()
	if o != Paused || err != nil {
		t.Fatalf("outcome %v %v, want paused", o, err)
	}
	if n := r.Flow.C2S.Load(); n != 3<<20 {
		t.Fatalf("paused after %d bytes, want exactly %d", n, 3<<20)
	}
}

func TestRelayIdle(t *testing.T) {
	client, _, r := relayed(t)
	r.IdleTimeout = 100 * time.Millisecond
	o, _ := r.Run()
	if o != Idle {
		t.Fatalf("outcome %v, want idle", o)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("client read after idle close: %v, want EOF", err)
	}
}

func TestRelayResetPropagates(t *testing.T) {
	client, server, r := relayed(t)
	res := make(chan Outcome, 1)
	go func() { o, _ := r.Run(); res <- o }()
	client.Write([]byte("x"))
	buf := make([]byte, 1)
	io.ReadFull(server, buf)
	client.SetLinger(0)
	client.Close() // RST
	if o := <-res; o != Failed {
		t.Fatalf("outcome %v, want failed", o)
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read: %v, want reset", err)
	}
}

// TestRelaySlowReaderNotIdle: a direction's bytes count as moved only
// when its splice(2) call returns, after up to a chunk (1 MiB); a client
// that reads slowly keeps one call going for longer than the idle
// timeout. The other direction, waiting for the client's data, then
// found the flow idle and closed it in the middle of the download,
// with a FIN, as if it were complete.
func TestRelaySlowReaderNotIdle(t *testing.T) {
	client, server, r := relayed(t)
	// Small buffers, so that the relay's writes wait for the reader.
	client.SetReadBuffer(64 << 10)
	r.Client.SetWriteBuffer(64 << 10)
	r.IdleTimeout = 300 * time.Millisecond
	res := make(chan Outcome, 1)
	go func() { o, _ := r.Run(); res <- o }()
	const size = 1 << 20
	go func() {
		server.Write(make([]byte, size))
		server.CloseWrite()
	}()
	// About 800 KB/s: the download takes over a second, several idle
	// timeouts, while bytes move all the time.
	buf := make([]byte, 8<<10)
	got := 0
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err := client.Read(buf)
		got += n
		if err != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got != size {
		t.Errorf("client read %d bytes of %d", got, size)
	}
	client.CloseWrite()
	if o := <-res; o != Finished {
		t.Errorf("outcome %v, want finished", o)
	}
}

// TestRelayIdleStuckWriter: a client that sent its request, half-closed
// and never reads what the server sends. The relay's only running
// direction blocks writing to the client's full window; it has no read
// deadline to wake it, and the other direction, which would have looked
// at the idle timeout, had ended. The flow stayed for good, holding its
// sockets and its place in the flow table.
func TestRelayIdleStuckWriter(t *testing.T) {
	client, server, r := relayed(t)
	client.SetReadBuffer(4 << 10)
	r.IdleTimeout = 300 * time.Millisecond
	res := make(chan Outcome, 1)
	go func() { o, _ := r.Run(); res <- o }()
	client.CloseWrite()
	go func() {
		server.SetWriteDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 1<<20)
		for {
			if _, err := server.Write(buf); err != nil {
				return
			}
		}
	}()
	select {
	case o := <-res:
		if o != Idle {
			t.Errorf("outcome %v, want idle", o)
		}
	case <-time.After(3 * time.Second):
		t.Errorf("relay still running 3s after the client stopped reading (idle timeout %v)", r.IdleTimeout)
		r.Close()
		<-res
	}
}
