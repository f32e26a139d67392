package gateway

import (
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
	"spliced/testnet"
)

// TestAnswerLost: a packet on a tuple an earlier daemon left diverted
// and nobody continues (orphanTuples) is dropped and answered with a reset
// at the sequence number it acknowledges; a probe asks each tuple's
// sender for such a packet; a SYN on such a tuple ends its entry; a
// diverted packet of no flow that is not lost is dropped unanswered, as
// before. Sent into a scratch namespace's loopback, read back by a raw
// socket.
func TestAnswerLost(t *testing.T) {
	testnet.Privileged(t, "ip")
	ns := testnet.Scratch(t)
	g := New(&config.Config{}, slog.New(slog.DiscardHandler))
	g.engine = splice.NewTable()
	var rx int
	if err := ns.Do(func() error {
		var err error
		if g.inject, err = newInjector(false); err != nil {
			return err
		}
		if rx, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP); err != nil {
			return err
		}
		tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
		return unix.SetsockoptTimeval(rx, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}); err != nil {
		t.Fatal(err)
	}
	defer g.inject.Close()
	defer unix.Close(rx)
	// next returns the next packet sent on one of keys, or false.
	next := func(keys ...splice.Key) (splice.Packet, bool) {
		buf := make([]byte, 200)
		for {
			n, _, err := unix.Recvfrom(rx, buf, 0)
			if err != nil {
				return splice.Packet{}, false
			}
			var p splice.Packet
			if p.Parse(append([]byte(nil), buf[:n]...)) == splice.OK && slices.Contains(keys, p.KeyOf()) {
				return p, true
			}
		}
	}
	c, s := netip.MustParseAddrPort("127.0.0.2:40000"), netip.MustParseAddrPort("127.0.0.3:80")
	fromClient, fromServer := splice.KeyFrom(c, s), splice.KeyFrom(s, c)
	g.lost.keys = map[splice.Key]bool{fromClient: false, fromServer: false}
	g.lost.since = time.Now()
	g.lost.on.Store(true)
	h := &packetHandler{g: g}

	// The probes: an ACK to each tuple's sender, from its peer.
	g.probeLost()
	// (Loopback answers each probe with a reset: no socket has the
	// tuple here.)
	probed := map[splice.Key]bool{}
	for {
		p, ok := next(fromClient, fromServer)
		if !ok {
			break
		}
		if p.TCP().Flags() == splice.FlagACK && len(p.Payload()) == 0 {
			probed[p.KeyOf()] = true
		}
	}
	for _, k := range []splice.Key{fromClient, fromServer} {
		if !probed[k.Reverse()] {
			t.Errorf("no probe (a bare ACK) to %v", k.SrcAddrPort())
		}
	}
	// The client's answer: reset at what it acknowledges.
	if d := h.handle(&nfq.Packet{Data: dataPacket(c, s, 1000, 5700, nil, false)}); d != nfq.Drop {
		t.Errorf("a packet on a lost tuple: %v, want drop", d)
	}
	if p, ok := next(fromServer); !ok || p.TCP().Flags() != splice.FlagRST || p.TCP().Seq() != 5700 {
		t.Errorf("answer: %v, flags %#x seq %d; want a reset at 5700 (the client's rcv_nxt)", ok, p.TCP().Flags(), p.TCP().Seq())
	}
	if n := g.lost.answered.Load(); n != 1 {
		t.Errorf("%d answered, want 1", n)
	}
	// A reset from an end: dropped, not answered.
	rst := splice.AppendBareSegment(nil, fromServer, 5000, splice.FlagRST, 64)
	if d := h.handle(&nfq.Packet{Data: rst}); d != nfq.Drop || g.lost.answered.Load() != 1 {
		t.Errorf("a reset on a lost tuple: %v, %d answered; want drop and no answer", d, g.lost.answered.Load())
	}
	// A new connection from the client's port: its entry goes, and the
	// reverse's (see TestLostSYNForgetsServerLeg).
	syn := splice.AppendBareSegment(nil, fromClient, 77, splice.FlagSYN, 64)
	if d := h.handle(&nfq.Packet{Data: syn}); d != nfq.Drop {
		t.Errorf("a SYN on a lost tuple: %v, want drop", d)
	}
	g.lost.mu.Lock()
	_, kept := g.lost.keys[fromClient]
	forget := g.lost.forget
	g.lost.mu.Unlock()
	if kept || len(forget) != 2 || forget[0] != fromClient || forget[1] != fromServer {
		t.Errorf("after a SYN on a lost tuple: still lost %v, to remove %v", kept, forget)
	}
	// Another tuple of no flow: dropped, unanswered.
	other := netip.MustParseAddrPort("127.0.0.2:40001")
	if d := h.handle(&nfq.Packet{Data: dataPacket(other, s, 1000, 5700, nil, false)}); d != nfq.Drop || g.lost.answered.Load() != 1 {
		t.Errorf("a packet of no flow, not lost: %v, %d answered; want drop and no answer", d, g.lost.answered.Load())
	}
	if _, ok := next(splice.KeyFrom(s, other)); ok {
		t.Errorf("a packet of no flow, not lost, was answered")
	}
}

// TestLostSYNForgetsServerLeg: a client that opens a new connection from
// the port of a lost transparent flow to the same server (the old one
// forgotten) has its SYN end that tuple's entry; the new connection's
// upstream socket takes the client's address and port again, so the
// server's SYN-ACK comes on the old server leg's tuple, the reverse.
// Before, that tuple stayed lost for two minutes: the SYN-ACK was
// diverted and answered with a reset to the server, and the upstream
// connection never opened. A NAT flow's server leg, another tuple, stays.
func TestLostSYNForgetsServerLeg(t *testing.T) {
	g := quietGateway(t)
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	transparent := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	nat := [2]splice.Key{
		splice.KeyFrom(netip.MustParseAddrPort("10.1.0.3:40000"), s),
		splice.KeyFrom(s, netip.MustParseAddrPort("10.2.0.1:50000")),
	}
	g.lost.keys = map[splice.Key]bool{transparent[0]: false, transparent[1]: false, nat[0]: false, nat[1]: false}
	g.lost.since = time.Now()
	g.lost.on.Store(true)
	for _, k := range []splice.Key{transparent[0], nat[0]} {
		var p splice.Packet
		if p.Parse(splice.AppendBareSegment(nil, k, 77, splice.FlagSYN, 64)) != splice.OK {
			t.Fatal("unparsable SYN")
		}
		if !g.answerLost(&p, k) {
			t.Fatalf("a SYN on lost tuple %v was not taken", k)
		}
	}
	g.lost.mu.Lock()
	defer g.lost.mu.Unlock()
	forgotten := map[splice.Key]bool{}
	for _, k := range g.lost.forget {
		forgotten[k] = true
	}
	for _, k := range []splice.Key{transparent[0], transparent[1], nat[0]} {
		if _, still := g.lost.keys[k]; still || !forgotten[k] {
			t.Errorf("%v after the new connection's SYN: still lost %v, entry to remove %v; want it gone", k, still, forgotten[k])
		}
	}
	if _, still := g.lost.keys[nat[1]]; !still || forgotten[nat[1]] {
		t.Errorf("the NAT flow's server leg %v: lost %v, to remove %v; want it kept (another tuple)", nat[1], still, forgotten[nat[1]])
	}
}

// TestAvoidLostPort: for two minutes after a restart the tuples of the
// flows a killed daemon left stay diverted, and every packet on them is
// answered with a reset. An upstream connection the new daemon dials
// from such a flow's local port to the same server (NAT mode: the
// kernel's port choice comes round again; the killed daemon's sockets
// are gone, so the port is free) got its SYN-ACK reset at every retry
// and never opened. The dial now takes another port, as for a live
// spliced flow's.
func TestAvoidLostPort(t *testing.T) {
	g := quietGateway(t)
	local, server := netip.MustParseAddrPort("10.2.0.1:50000"), netip.MustParseAddrPort("10.2.0.2:80")
	g.lost.keys = map[splice.Key]bool{splice.KeyFrom(server, local): false}
	g.lost.since = time.Now()
	g.lost.on.Store(true)
	if a := g.avoidPort(local, server); a != proxy.AvoidLive {
		t.Errorf("a lost flow's server leg: avoid %v, want AvoidLive (%v)", a, proxy.AvoidLive)
	}
	if a := g.avoidPort(netip.MustParseAddrPort("10.2.0.1:50001"), server); a != proxy.AvoidNot {
		t.Errorf("another port: avoid %v, want AvoidNot", a)
	}
	g.lost.on.Store(false) // the two minutes are over
	if a := g.avoidPort(local, server); a != proxy.AvoidNot {
		t.Errorf("no tuple lost any more: avoid %v, want AvoidNot", a)
	}
}
