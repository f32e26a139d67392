package gateway

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/nfq"
	"spliced/splice"
	"spliced/testnet"
)

// TestAnswerReset: once the daemon stopping reset a spliced flow, a
// packet that still comes from one of its ends (the challenge ACK of an
// end whose reset missed its rcv_nxt, or more data) is dropped and
// answered with a reset at the sequence number it acknowledges, which
// that end accepts; a reset from an end is dropped unanswered, and a
// flow that was not reset is forwarded as before. Sent into a scratch
// namespace's loopback, read back by a raw socket.
func TestAnswerReset(t *testing.T) {
	testnet.Privileged(t, "ip")
	ns := testnet.Scratch(t)
	g := New(&config.Config{}, nil)
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
		tv := unix.NsecToTimeval(int64(time.Second))
		return unix.SetsockoptTimeval(rx, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}); err != nil {
		t.Fatal(err)
	}
	defer g.inject.Close()
	defer unix.Close(rx)
	flow := func(id uint64, c, s netip.AddrPort) *splice.Entry {
		k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
		p := splice.Params{
			Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
			Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1000, RcvNxt: 5000, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		}
		e, err := g.engine.Add(id, &p, 0)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	c, s := netip.MustParseAddrPort("127.0.0.2:40000"), netip.MustParseAddrPort("127.0.0.3:80")
	reset := flow(1, c, s)
	flow(2, netip.MustParseAddrPort("127.0.0.2:40001"), s)
	h := &packetHandler{g: g}

	g.resetFlows.add([]*splicedFlow{{entry: reset}})
	// The client's challenge ACK: it had received 5,700 of the server's
	// bytes, more than the engine saw it acknowledge.
	if d := h.handle(&nfq.Packet{Data: dataPacket(c, s, 1000, 5700, nil, false)}); d != nfq.Drop {
		t.Errorf("a packet of a reset flow: %v, want drop", d)
	}
	buf := make([]byte, 200)
	for {
		n, _, err := unix.Recvfrom(rx, buf, 0)
		if err != nil {
			t.Fatalf("no reset came back: %v", err)
		}
		var p splice.Packet
		if p.Parse(buf[:n]) != splice.OK || p.KeyOf() != splice.KeyFrom(s, c) {
			continue // not the answer (the raw socket sees all of lo's TCP)
		}
		if f := p.TCP().Flags(); f != splice.FlagRST || p.TCP().Seq() != 5700 {
			t.Errorf("answer: flags %#x seq %d, want a reset at 5700 (the client's rcv_nxt)", f, p.TCP().Seq())
		}
		break
	}
	if n := g.resetFlows.answered.Load(); n != 1 {
		t.Errorf("%d answered, want 1", n)
	}
	// The end's own reset: dropped, not answered.
	rst := splice.AppendBareSegment(nil, splice.KeyFrom(s, c), 5000, splice.FlagRST, 64)
	if d := h.handle(&nfq.Packet{Data: rst}); d != nfq.Drop || g.resetFlows.answered.Load() != 1 {
		t.Errorf("a reset from an end of a reset flow: %v, %d answered; want drop and no answer", d, g.resetFlows.answered.Load())
	}
	// Another flow goes on through the engine.
	if d := h.handle(&nfq.Packet{Data: dataPacket(netip.MustParseAddrPort("127.0.0.2:40001"), s, 1000, 5000, []byte("x"), false)}); d != nfq.AcceptModified {
		t.Errorf("a packet of a flow not reset: %v, want it forwarded", d)
	}
}
