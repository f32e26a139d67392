package gateway

import (
	"net/netip"
	"testing"

	"spliced/config"
	"spliced/nfq"
	"spliced/splice"
)

// forgedFixture is a spliced flow on the Go engine (client 1000, server
// 5000 at the splice, no offsets) whose server sent 1000 bytes the
// client has not acknowledged yet.
func forgedFixture(t *testing.T) (*Gateway, *packetHandler, *splice.Entry, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	g := New(&config.Config{}, nil)
	g.engine = splice.NewTable()
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1000, RcvNxt: 5000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := g.engine.Add(1, &p, 0)
	if err != nil {
		t.Fatal(err)
	}
	h := &packetHandler{g: g}
	if d := h.handle(&nfq.Packet{Data: dataPacket(s, c, 5000, 1000, make([]byte, 1000), false)}); d != nfq.AcceptModified {
		t.Fatalf("the server's data: %v, want it forwarded", d)
	}
	return g, h, e, c, s
}

// TestForgedDataStartsNoUnsplice: the HTTP proxy watches a spliced flow
// for the client's next request, and new data from the client starts
// an unsplice (an adopted flow, which no proxy can take back, ends with
// a reset at both ends). New data was any segment ending after what
// the engine forwarded: a blind attacker who knows the tuple needed no
// sequence number in the window, half of all of them counted, and no
// acknowledgment number either. The segment the engine would drop
// (beyond the server's window) must not count as a request.
func TestForgedDataStartsNoUnsplice(t *testing.T) {
	g, h, e, c, s := forgedFixture(t)
	e.Watch.Store(true)
	forged := dataPacket(c, s, 1000+1<<30, 6000, []byte("GET / HTTP/1.1\r\n\r\n"), false)
	if d := h.handle(&nfq.Packet{Data: forged}); d != nfq.Drop {
		t.Errorf("forged data beyond the window: %v, want drop", d)
	}
	if !e.Watch.Load() {
		t.Error("forged data beyond the window was taken for the client's next request (the flow's watch was taken to unsplice it)")
	}
	if n := g.counters.verdicts[splice.DropSeq].Load(); n != 1 {
		t.Errorf("drop_seq counted %d, want 1", n)
	}
}

// TestForgedHeldPacketEndsNoDrain: while an unsplice drains, packets
// with new data are held and their ACKs count for the drain. A forged
// one beyond the window, acknowledging data still in flight to the
// client, ended the drain: the rebuilt socket would take that data for
// delivered and never resend what of it was lost. It is dropped, as the
// engine drops it, and teaches nothing. The same for client data that
// comes while a watched flow's splice completes (held as the next
// request, which starts an unsplice at once).
func TestForgedHeldPacketEndsNoDrain(t *testing.T) {
	for _, tc := range []struct {
		name  string
		phase phase
		watch bool
	}{{"unsplicing", phaseUnsplicing, false}, {"splice completing, watched", phaseSpliced, true}} {
		t.Run(tc.name, func(t *testing.T) {
			g, _, e, c, s := forgedFixture(t)
			tr := newTransition(e.Keys, 0, tc.phase, e)
			tr.watchClient = tc.watch
			forged := dataPacket(c, s, 1000+1<<30, 6000, []byte("GET / HTTP/1.1\r\n\r\n"), false)
			var p splice.Packet
			if p.Parse(forged) != splice.OK {
				t.Fatal("parse")
			}
			tr.mu.Lock()
			d := tr.decide(g, &p, &nfq.Packet{Data: forged}, p.KeyOf())
			tr.mu.Unlock()
			if d != nfq.Drop {
				t.Errorf("forged data beyond the window: %v, want drop", d)
			}
			if got := e.Snapshot().Info(splice.S2C).HighestAck; got != 5000 {
				t.Errorf("the server's data counts acknowledged up to %d after a forged packet, want 5000 (the client acknowledged none of it)", got)
			}
			if n := len(tr.held) + len(tr.pending); n != 0 {
				t.Errorf("%d forged packets held, want 0", n)
			}
			if n := g.counters.verdicts[splice.DropSeq].Load(); n != 1 {
				t.Errorf("drop_seq counted %d, want 1", n)
			}
		})
	}
}

// TestUnspliceHoldsBounded: while an unsplice drains, the client's new
// data is held for the rebuilt socket, in the kernel's queue and as a
// copy in the daemon. A client that sent a window's worth with its next
// request and withheld its acknowledgments had every packet held, and a
// few such clients filled the queue that every other spliced flow on it
// shares. Past maxHeldUnsplicing the data is dropped (its ACK learned),
// and counted; TCP sends it again to the rebuilt socket.
func TestUnspliceHoldsBounded(t *testing.T) {
	g, _, e, c, s := forgedFixture(t)
	tr := newTransition(e.Keys, 0, phaseUnsplicing, e)
	const n, size = 300, 200 // within the server's window of 64000
	held := 0
	for i := range n {
		b := dataPacket(c, s, uint32(1000+i*size), 6000, make([]byte, size), false)
		var p splice.Packet
		if p.Parse(b) != splice.OK {
			t.Fatal("parse")
		}
		tr.mu.Lock()
		d := tr.decide(g, &p, nfq.Unqueued(b), p.KeyOf())
		tr.mu.Unlock()
		if d == nfq.Hold {
			held++
		}
	}
	if held != maxHeldUnsplicing || len(tr.held) != maxHeldUnsplicing {
		t.Errorf("%d packets held (%d kept), want %d", held, len(tr.held), maxHeldUnsplicing)
	}
	if got := g.counters.heldDropped.Load(); got != n-maxHeldUnsplicing {
		t.Errorf("held_dropped %d, want %d", got, n-maxHeldUnsplicing)
	}
	if got := e.Snapshot().Info(splice.S2C).HighestAck; got != 6000 {
		t.Errorf("the client's acknowledgment learned: %d, want 6000", got)
	}
}

// TestUnspliceHoldsBoundedAfterSplice: a client whose next request
// comes while its splice completes has it kept (pending), and the
// splice turns into the request's unsplice at once. What was kept
// counts against the unsplice's bounds: before, only its packets did,
// and the unsplice held another 1 MiB beyond the bytes a client sent
// while the splice completed (GSO packets of up to 64 KiB each).
func TestUnspliceHoldsBoundedAfterSplice(t *testing.T) {
	g, _, e, c, s := forgedFixture(t)
	tr := newTransition(e.Keys, 0, phaseSpliced, e)
	// GSO packets, each the same 60,000 bytes after what the engine
	// forwarded, within the server's window of 64,000: new data the
	// engine's checks pass, sent again and again.
	const size = 60000
	next := func() ([]byte, *splice.Packet) {
		b := dataPacket(c, s, 1000, 6000, make([]byte, size), false)
		var p splice.Packet
		if p.Parse(b) != splice.OK {
			t.Fatal("parse")
		}
		return b, &p
	}
	pending := 0
	for range 10 {
		b, _ := next()
		tr.pending = append(tr.pending, nfq.Unqueued(b))
		pending += len(b)
	}
	tr.mu.Lock()
	tr.unsplicePending()
	tr.mu.Unlock()
	held := 0
	for range 20 {
		b, p := next()
		tr.mu.Lock()
		if tr.decide(g, p, nfq.Unqueued(b), p.KeyOf()) == nfq.Hold {
			held += len(b)
		}
		tr.mu.Unlock()
	}
	if total := pending + held; total > maxHeldBytesUnsplicing {
		t.Errorf("%d bytes held (%d kept while the splice completed, %d after), want at most %d", total, pending, held, maxHeldBytesUnsplicing)
	}
	if held == 0 && g.counters.heldDropped.Load() == 0 {
		t.Error("nothing held or dropped: the packets did not reach the bound")
	}
}
