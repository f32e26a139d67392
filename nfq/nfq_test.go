package nfq

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

	"spliced/testnet"
)

func TestParseKernelStats(t *testing.T) {
	in := "  100  12345     3 2 65535     7    9 4242  1\n  101      0     0 2 65535     0    0    0  1\n"
	got, err := parseKernelStats(bufio.NewScanner(strings.NewReader(in)))
	if err != nil {
		t.Fatal(err)
	}
	want := KernelStats{PortID: 12345, Waiting: 3, QueueDropped: 7, UserDropped: 9, IDSequence: 4242}
	if got[100] != want || len(got) != 2 {
		t.Fatalf("got %+v", got)
	}
}

// queueRule makes the gateway queue forwarded TCP packets to port to
// queue num, with the xtables NFQUEUE target (no bypass).
func queueRule(t *testing.T, gw *testnet.NS, num uint16, port uint16) {
	t.Helper()
	queueRuleAt(t, gw, nftables.ChainHookForward, num, port)
}

// queueRuleAt is queueRule in a base chain of hook.
func queueRuleAt(t *testing.T, gw *testnet.NS, hook *nftables.ChainHook, num uint16, port uint16) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(gw.OpenT(t)))
	if err != nil {
		t.Fatal(err)
	}
	tab := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "nfqtest"})
	ch := c.AddChain(&nftables.Chain{Name: "fwd", Table: tab, Type: nftables.ChainTypeFilter,
		Hooknum: hook, Priority: nftables.ChainPriorityFilter})
	info := make([]byte, 8)
	binary.NativeEndian.PutUint16(info, num)
	binary.NativeEndian.PutUint16(info[2:], 1)
	c.AddRule(&nftables.Rule{Table: tab, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
		&expr.Target{Name: "NFQUEUE", Rev: 3, Info: &[]xt.Unknown{info}[0]},
	}})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestQueueAcceptHoldDrop runs a real queue in a lab gateway, with each
// backend: packets are seen with GSO info, a held SYN is released later,
// kernel counters are read back, and a drop handler stops the flow.
func TestQueueAcceptHoldDrop(t *testing.T) {
	for _, library := range []bool{false, true} {
		t.Run(map[bool]string{false: "lean", true: "library"}[library], func(t *testing.T) { queueAcceptHoldDrop(t, library) })
	}
}

func queueAcceptHoldDrop(t *testing.T, library bool) {
	lab := testnet.NewT(t, testnet.Options{})
	queueRule(t, &lab.Gateway.NS, 77, 7000)
	var seen, gso atomic.Int64
	var mode atomic.Int32 // 0 accept, 1 hold the next packet, 2 drop
	var mu sync.Mutex
	var held []*Packet
	var woken atomic.Int64
	h := func(p *Packet) Decision {
		if seen.Add(1)%64 == 0 {
			// A handler that starts a goroutine says so; the reader
			// yields after the batch and goes on.
			p.Readied()
			go woken.Add(1)
		}
		if p.GSO {
			gso.Add(1)
		}
		switch mode.Load() {
		case 1:
			mode.Store(0)
			mu.Lock()
			held = append(held, p.Detach())
			mu.Unlock()
			return Hold
		case 2:
			return Drop
		}
		return Accept
	}
	var set *Set
	fd := lab.Gateway.OpenT(t)
	set, err := Open(t.Context(), Config{First: 77, Count: 1, NetNS: fd, Library: library}, func(uint16) Handler { return h }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()

	srv := netip.AddrPortFrom(lab.Server().IPv4, 7000)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	accepted := make(chan net.Conn, 16)
	defer func() {
		ln.Close()
		for {
			select {
			case c := <-accepted:
				c.Close() // its reader may still wait for a FIN the drop handler dropped
				continue
			default:
			}
			break
		}
		conns.Wait()
	}()
	conns.Add(1)
	go func() {
		defer conns.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
			conns.Add(1)
			go func() { defer conns.Done(); io.Copy(io.Discard, c); c.Close() }()
		}
	}()

	// Hold the SYN, release it after 100 ms: the connect still succeeds.
	mode.Store(1)
	go func() {
		testnet.Poll(5*time.Second, func() error {
			mu.Lock()
			defer mu.Unlock()
			if len(held) == 0 {
				return io.EOF
			}
			return nil
		})
		time.Sleep(100 * time.Millisecond)
		mu.Lock()
		for _, p := range held {
			p.Verdict(Accept)
		}
		mu.Unlock()
	}()
	c, err := lab.Client().Dial(srv, 5*time.Second)
	if err != nil {
		t.Fatalf("connect with a held SYN: %v", err)
	}
	// Barriers while the reader works: each returns (the reader wakes
	// the ones that wait for its batch).
	barriers := make(chan int)
	writing := make(chan struct{})
	go func() {
		n := 0
		for {
			select {
			case <-writing:
				barriers <- n
				return
			default:
			}
			set.Barrier(0)
			n++
		}
	}()
	_, err = c.Write(make([]byte, 8<<20))
	close(writing)
	if n := <-barriers; n == 0 {
		t.Error("no barrier returned during the transfer")
	}
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if seen.Load() < 10 {
		t.Fatalf("handler saw %d packets", seen.Load())
	}
	// The connection's last packets may still be arriving: a backend
	// counts a packet just before its handler sees it, so the counter lies
	// between what the handler saw before the read and one more than it
	// saw after.
	var st Stats
	before := uint64(seen.Load())
	lab.Gateway.Do(func() error { st = set.Stats()[0]; return nil })
	after := uint64(seen.Load())
	if st.Received < before || st.Received > after+1 || st.Held != 0 || st.Kernel.PortID == 0 {
		t.Fatalf("stats %+v (handler saw %d before reading them, %d after)", st, before, after)
	}
	t.Logf("packets %d, of which GSO %d; stats %+v", seen.Load(), gso.Load(), st)
	if err := testnet.Poll(5*time.Second, func() error {
		if woken.Load() < seen.Load()/64 {
			return fmt.Errorf("%d of the %d goroutines the handler started ran", woken.Load(), seen.Load()/64)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	mode.Store(2)
	if _, err := lab.Client().Dial(srv, 500*time.Millisecond); err == nil {
		t.Fatal("connect succeeded although the handler drops every packet")
	}
	if set.Stats()[0].Dropped == 0 {
		t.Fatal("no drop counted")
	}
}

// TestQueueReopensAfterReceiveFailure: the lean reader's receive fails
// mid-transfer (the test hook); the reader reopens its socket, counts it,
// and the flow through the queue (no bypass) completes intact. A packet
// held before the failure was dropped with the old socket: its verdict is
// refused rather than sent for whatever packet has its ID now.
func TestQueueReopensAfterReceiveFailure(t *testing.T) {
	for _, library := range []bool{false, true} {
		t.Run(map[bool]string{false: "lean", true: "library"}[library], func(t *testing.T) { queueReopens(t, library) })
	}
}

func queueReopens(t *testing.T, library bool) {
	lab := testnet.NewT(t, testnet.Options{})
	queueRule(t, &lab.Gateway.NS, 78, 7001)
	var seen atomic.Int64
	var held *Packet
	h := func(p *Packet) Decision {
		if seen.Add(1) == 100 {
			held = p.Detach() // read after the transfer only
			return Hold
		}
		return Accept
	}
	fd := lab.Gateway.OpenT(t)
	const faultAfter = 300
	set, err := Open(t.Context(), Config{First: 78, Count: 1, NetNS: fd, Library: library, faultAfter: faultAfter}, func(uint16) Handler { return h }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	srv := netip.AddrPortFrom(lab.Server().IPv4, 7001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 64 << 20, S2C: 1 << 20, Seed: 11, Timeout: time.Minute})
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	st := set.Stats()[0]
	t.Logf("64 MiB intact through a queue whose reader failed after %d packets; stats %+v", faultAfter, st)
	if st.Reopens != 1 || (!library && st.Errors == 0) {
		t.Fatalf("reopens %d, errors %d; want 1 reopen after 1 error", st.Reopens, st.Errors)
	}
	if st.Received <= faultAfter {
		t.Fatalf("received %d packets: nothing after the reopen", st.Received)
	}
	if err := held.Verdict(Accept); err != errStale {
		t.Fatalf("verdict for a packet of the old socket: %v, want errStale", err)
	}
}

// TestQueueChecksumFlags: each backend reports what the kernel says of a
// packet's TCP checksum: not ready (CHECKSUM_PARTIAL: the sender left it
// to an offload) or not verified (a complete checksum nothing checked).
// A veth never verifies one (a NIC's CHECKSUM_UNNECESSARY, neither flag,
// cannot be made here).
func TestQueueChecksumFlags(t *testing.T) {
	for _, library := range []bool{false, true} {
		t.Run(map[bool]string{false: "lean", true: "library"}[library], func(t *testing.T) { queueChecksumFlags(t, library) })
	}
}

func queueChecksumFlags(t *testing.T, library bool) {
	lab := testnet.NewT(t, testnet.Options{})
	queueRule(t, &lab.Gateway.NS, 78, 7001)
	var notReady, notVerified, neither atomic.Int64
	h := func(p *Packet) Decision {
		if len(p.Data) > 100 { // data, not the handshake's or pure ACKs
			switch {
			case p.CsumNotReady && !p.CsumNotVerified:
				notReady.Add(1)
			case p.CsumNotVerified && !p.CsumNotReady:
				notVerified.Add(1)
			case !p.CsumNotReady && !p.CsumNotVerified:
				neither.Add(1)
			}
		}
		return Accept
	}
	set, err := Open(t.Context(), Config{First: 78, Count: 1, NetNS: lab.Gateway.OpenT(t), Library: library}, func(uint16) Handler { return h }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	srv := netip.AddrPortFrom(lab.Server().IPv4, 7001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, c := range []struct {
		name     string
		clientTx string // ethtool -K: the client's checksum offload
		want     *atomic.Int64
	}{
		{"offloaded", "on", &notReady},
		{"complete", "off", &notVerified},
	} {
		lab.Client().MustRun("ethtool", "-K", lab.Client().Dev, "tx", c.clientTx)
		notReady.Store(0)
		notVerified.Store(0)
		neither.Store(0)
		conn, err := lab.Client().Dial(srv, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		ln.SetDeadline(time.Now().Add(5 * time.Second))
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		go func() { conn.Write(make([]byte, 256<<10)); conn.Close() }()
		if _, err := io.Copy(io.Discard, s); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if c.want.Load() == 0 || notReady.Load()+notVerified.Load()+neither.Load() != c.want.Load() {
			t.Errorf("%s: data packets not ready %d, not verified %d, neither %d; want all in one", c.name, notReady.Load(), notVerified.Load(), neither.Load())
		}
	}
}

// TestQueueSegmentsBigGSO: with BIG TCP on the client's link (gso_max_size
// above 64 KiB), the client's GSO packets reach the queue longer than it
// carries, and arrive cut. They are dropped, and the queue asks the
// kernel for segments from then on: a second transfer brings no cut
// packet. Before, every big packet arrived cut and was dropped, its
// retransmissions merged again, and a flow through the queue crawled.
func TestQueueSegmentsBigGSO(t *testing.T) {
	for _, library := range []bool{false, true} {
		t.Run(map[bool]string{false: "lean", true: "library"}[library], func(t *testing.T) { queueSegmentsBigGSO(t, library) })
	}
}

func queueSegmentsBigGSO(t *testing.T, library bool) {
	lab := testnet.NewT(t, testnet.Options{})
	cl := lab.Client()
	cl.MustRun("ip", "link", "set", "dev", cl.Dev, "gso_max_size", "185000")
	if out := cl.MustRun("ip", "-d", "link", "show", "dev", cl.Dev); !strings.Contains(out, "gso_max_size 185000") {
		t.Fatalf("BIG TCP not on:\n%s", out)
	}
	// At prerouting, as spliced's divert rules: the forwarding path
	// refuses the client's GSO packets above 64 KiB before the forward
	// hook (Ip6InTooBigErrors), but spliced's queues see them.
	queueRuleAt(t, &lab.Gateway.NS, nftables.ChainHookPrerouting, 79, 7002)
	var longest atomic.Int64
	h := func(p *Packet) Decision {
		if n := int64(len(p.Data)); n > longest.Load() {
			longest.Store(n)
		}
		return Accept
	}
	var logs strings.Builder
	var logMu sync.Mutex
	log := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &logMu}, nil))
	set, err := Open(t.Context(), Config{First: 79, Count: 1, NetNS: lab.Gateway.OpenT(t), Library: library}, func(uint16) Handler { return h }, log)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	srv := netip.AddrPortFrom(lab.Server().IPv6, 7002)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const size = 16 << 20
	transfer := func() {
		t.Helper()
		c, err := cl.Dial(srv, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		ln.SetDeadline(time.Now().Add(5 * time.Second))
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.SetDeadline(time.Now().Add(2 * time.Minute))
		go func() { c.Write(make([]byte, size)); c.Close() }()
		n, err := io.Copy(io.Discard, s)
		if err != nil || n != size {
			t.Fatalf("the server read %d of %d bytes: %v", n, size, err)
		}
	}
	stats := func() (st Stats) {
		lab.Gateway.Do(func() error { st = set.Stats()[0]; return nil })
		return st
	}
	transfer()
	first := stats()
	if first.Truncated == 0 {
		t.Fatalf("no packet arrived cut (the longest was %d bytes): the test proves nothing; stats %+v", longest.Load(), first)
	}
	transfer()
	second := stats()
	if n := second.Truncated - first.Truncated; n != 0 {
		t.Errorf("%d packets arrived cut in the second transfer (%d in the first); want none", n, first.Truncated)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if !strings.Contains(logs.String(), "gso_max_size") {
		t.Errorf("no warning naming the cause and the fix in the log:\n%s", logs.String())
	}
	t.Logf("cut packets %d; longest queued %d bytes; stats %+v", first.Truncated, longest.Load(), second)
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}
