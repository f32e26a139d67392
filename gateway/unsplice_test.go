package gateway

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"spliced/nfq"
	"spliced/splice"
	"spliced/testnet"
)

// TestRebuiltConnsRoundTrip: unsplicing a flow the engine never forwarded
// anything for rebuilds exactly the sockets the splice captured, their
// timestamp clocks advanced by the time spliced.
func TestRebuiltConnsRoundTrip(t *testing.T) {
	client, server, gw := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"), netip.MustParseAddrPort("10.2.0.1:50000")
	p := splice.Params{
		Client: splice.Conn{Local: server, Remote: client, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000,
			SndWscale: 7, RcvWscale: 8, MSS: 1448, SACK: true, Timestamps: true, TSval: 5000},
		Server: splice.Conn{Local: gw, Remote: server, SndNxt: 0x7ffffff0, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000,
			SndWscale: 9, RcvWscale: 6, MSS: 1448, SACK: true, Timestamps: true, TSval: 900000},
	}
	f, err := splice.NewFlow(&p, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, s := rebuiltConns(&p, f, 2500*time.Millisecond)
	if c.SndNxt != p.Client.SndNxt || c.RcvNxt != p.Client.RcvNxt || s.SndNxt != p.Server.SndNxt || s.RcvNxt != p.Server.RcvNxt {
		t.Errorf("sequence numbers: client %d/%d want %d/%d; server %d/%d want %d/%d",
			c.SndNxt, c.RcvNxt, p.Client.SndNxt, p.Client.RcvNxt, s.SndNxt, s.RcvNxt, p.Server.SndNxt, p.Server.RcvNxt)
	}
	if c.Local != p.Client.Local || c.Remote != p.Client.Remote || s.Local != p.Server.Local || s.Remote != p.Server.Remote {
		t.Errorf("addresses changed: %v %v", c, s)
	}
	if c.SndWscale != 7 || c.RcvWscale != 8 || s.SndWscale != 9 || s.RcvWscale != 6 || !c.SACK || !s.Timestamps {
		t.Errorf("options changed: %+v %+v", c, s)
	}
	if c.TSval != 5000+2500 || s.TSval != 900000+2500 {
		t.Errorf("timestamp clocks %d, %d; want the captured ones 2500 ms later", c.TSval, s.TSval)
	}
	if c.SndWnd != p.Client.SndWnd || s.SndWnd != p.Server.SndWnd {
		t.Errorf("peer windows %d, %d; want the captured %d, %d", c.SndWnd, s.SndWnd, p.Client.SndWnd, p.Server.SndWnd)
	}
}

// TestSplicedFlowParams: the compact record of a spliced flow rebuilds
// the sockets an unsplice needs exactly as the captured connections do.
func TestSplicedFlowParams(t *testing.T) {
	for _, addrs := range [][3]string{
		{"10.1.0.2:40000", "10.2.0.2:80", "10.2.0.1:50000"},
		{"[fd00:1::2]:40000", "[fd00:2::2]:443", "[fd00:1::2]:40000"},
	} {
		client, server, up := netip.MustParseAddrPort(addrs[0]), netip.MustParseAddrPort(addrs[1]), netip.MustParseAddrPort(addrs[2])
		p := splice.Params{
			Client: splice.Conn{Local: server, Remote: client, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000,
				SndWscale: 7, RcvWscale: 8, MSS: 1448, SACK: true, Timestamps: true, TSval: 5000},
			Server: splice.Conn{Local: up, Remote: server, SndNxt: 0x7ffffff0, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000,
				SndWscale: 9, RcvWscale: 6, MSS: 1380, SACK: false, Timestamps: true, TSval: 900000},
		}
		e, err := splice.NewTable().Add(1, &p, 0)
		if err != nil {
			t.Fatal(err)
		}
		sf := &splicedFlow{entry: e, legs: [2]capturedLeg{legOf(&p.Client), legOf(&p.Server)}}
		rp := sf.params()
		f := e.Snapshot()
		wc, ws := rebuiltConns(&p, f, time.Second)
		gc, gs := rebuiltConns(&rp, f, time.Second)
		if wc != gc || ws != gs {
			t.Errorf("%v: rebuilt from the record\n%+v\n%+v\nwant\n%+v\n%+v", addrs, gc, gs, wc, ws)
		}
	}
}

// TestTransitionWakesDrain: every packet the queue's reader hands to a
// flow in transition wakes the goroutine draining it, without ever
// blocking the reader (one wake waits at most).
func TestTransitionWakesDrain(t *testing.T) {
	keys := [2]splice.Key{
		splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")),
		splice.KeyFrom(netip.MustParseAddrPort("10.2.0.2:80"), netip.MustParseAddrPort("10.2.0.1:50000")),
	}
	tr := newTransition(keys, 0, phaseAborted, nil)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	if tr.wait(timer, 0) {
		t.Fatal("woken before any packet")
	}
	for range 3 { // the reader never blocks on a wake nobody took
		if d := tr.handle(nil, nil, nil, keys[1]); d != nfq.Accept {
			t.Fatalf("an aborted transition decided %v, want accept", d)
		}
	}
	if !tr.wait(timer, time.Hour) {
		t.Fatal("a handled packet did not wake the drain")
	}
	if tr.wait(timer, 0) {
		t.Fatal("three packets left more than one wake")
	}
}

// TestTransitionsRemoveKeepsLater: removing an unspliced flow's passthrough
// after the flow's next splice was added (retirePassthrough losing the
// race with the proxy) leaves the splice's transition in place: its
// packets must keep reaching it, not the engine, which has no entry for
// the flow and would drop the ACKs its drain waits for.
func TestTransitionsRemoveKeepsLater(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	keys := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	var ts transitions
	passthrough := newTransition(keys, 0, phaseAborted, nil)
	ts.add(passthrough)
	next := newTransition(keys, 0, phaseDraining, nil)
	ts.add(next)
	ts.remove(passthrough)
	for _, k := range keys {
		if got := ts.get(k); got != next {
			t.Errorf("tuple %v leads to %p after the passthrough left, want the splice's transition %p", k, got, next)
		}
	}
	if n := ts.active.Load(); n != 1 {
		t.Errorf("%d transitions active, want 1", n)
	}
	ts.remove(next)
	if ts.get(keys[0]) != nil || ts.active.Load() != 0 {
		t.Errorf("after both left: %p, %d active", ts.get(keys[0]), ts.active.Load())
	}
}

// TestRestoreBoth: both sockets are rebuilt, the server's on a worker;
// when either cannot be, the error names which and no socket is left
// open (the other, rebuilt, is closed in repair mode).
func TestRestoreBoth(t *testing.T) {
	ns := testnet.Scratch(t)
	conn := func(local, remote string) splice.Conn {
		return splice.Conn{Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote),
			SndNxt: 1000, RcvNxt: 2000, SndWnd: 65535, RcvWnd: 65535, MSS: 1460}
	}
	good := [2]splice.Conn{conn("127.0.0.1:80", "127.0.0.2:40000"), conn("127.0.0.3:50000", "127.0.0.4:80")}
	// A remote address of the other family: the connect fails.
	bad := conn("127.0.0.3:50001", "[fd00::2]:80")
	err := ns.Do(func() error {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		fds := openFDs(t)
		cc, sc, err := restoreBoth(&good[0], &good[1])
		if err != nil {
			return fmt.Errorf("both good: %w", err)
		}
		if addrPort(cc.LocalAddr()) != good[0].Local || addrPort(sc.LocalAddr()) != good[1].Local || addrPort(sc.RemoteAddr()) != good[1].Remote {
			t.Errorf("rebuilt %v-%v and %v-%v, want %v-%v and %v-%v", cc.LocalAddr(), cc.RemoteAddr(), sc.LocalAddr(), sc.RemoteAddr(),
				good[0].Local, good[0].Remote, good[1].Local, good[1].Remote)
		}
		cc.Close()
		sc.Close()
		for _, c := range []struct {
			client, server *splice.Conn
			want           string
		}{{&good[0], &bad, "rebuild the server's connection"}, {&bad, &good[1], "rebuild the client's connection"}} {
			cc, sc, err := restoreBoth(c.client, c.server)
			if err == nil || !strings.Contains(err.Error(), c.want) || cc != nil || sc != nil {
				t.Errorf("restoreBoth: %v, %v, %v; want nil sockets and an error saying %q", cc, sc, err, c.want)
			}
		}
		if n := openFDs(t); n != fds {
			t.Errorf("%d descriptors open after the failed rebuilds, %d before", n, fds)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
