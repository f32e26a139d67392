//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"spliced/internal/monotime"
	. "spliced/splice"
	"spliced/testnet"
)

// randomState is a state with every field set.
func randomState(r *rand.Rand, now int64) State {
	var st State
	for d := range st.Dirs {
		st.Dirs[d] = DirState{
			SeqOff: r.Uint32(), TSOff: r.Uint32(), TSJump: r.Uint32(), SndNxt: Seq(r.Uint32()), AckSeen: Seq(r.Uint32()),
			MaxWin: r.Uint32(), LastWin: r.Uint32(), TSval: r.Uint32(), TSecr: r.Uint32(), FINSeq: Seq(r.Uint32()),
			FINAt: now - r.Int64N(int64(time.Hour)), SrcPort: uint16(r.Uint32()), DstPort: uint16(r.Uint32()),
			WSIn: uint8(r.IntN(15)), WSOut: uint8(r.IntN(15)), Flags: uint8(r.Uint32()),
		}
	}
	st.LastSeen = now
	st.RST = r.IntN(2) == 0
	st.StripECN = [2]bool{r.IntN(2) == 0, r.IntN(2) == 0}
	return st
}

// TestStateRoundTrip: a flow's state goes into the map and comes back
// unchanged (promotion then demotion), through the real clock's
// conversion; the engine's own conversion is lossless too.
func TestStateRoundTrip(t *testing.T) {
	requireRoot(t)
	dp, err := Load(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	r := rand.New(rand.NewPCG(1, 2))
	now := time.Now().UnixNano()
	keys := [2]Key{KeyFrom(cAddr4, sAddr4), KeyFrom(sAddr4, gAddr4)}
	for i := range 100 {
		st := randomState(r, now)
		if i == 0 {
			st.Dirs[0].FINAt, st.Dirs[1].FINAt = 0, 0 // never
		}
		if f := FlowFromState(st); f.State() != st {
			t.Fatalf("splice's conversion is lossy: %+v", st)
		}
		id := uint64(1000 + i)
		if err := dp.PutFlow(id, keys, st); err != nil {
			t.Fatal(err)
		}
		got, err := dp.Flow(id)
		if err != nil {
			t.Fatal(err)
		}
		if got != st {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, st)
		}
		// Promoting again replaces the state (under the lock).
		st2 := randomState(r, now)
		if err := dp.PutFlow(id, keys, st2); err != nil {
			t.Fatal(err)
		}
		if got, _ := dp.Flow(id); got != st2 {
			t.Fatal("second PutFlow did not replace the state")
		}
		if err := dp.DeleteFlow(id, keys); err != nil {
			t.Fatal(err)
		}
		if _, err := dp.Flow(id); err == nil {
			t.Fatal("flow still there after DeleteFlow")
		}
	}
	bad := randomState(r, now)
	bad.Dirs[1].WSOut = 15
	if err := dp.PutFlow(1, keys, bad); err == nil {
		t.Fatal("PutFlow took a window scale of 15")
	}
}

// TestEachFlow: EachFlow reads every flow in the map, across several
// batches, with the state Flow reads one at a time.
func TestEachFlow(t *testing.T) {
	requireRoot(t)
	dp, err := Load(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	r := rand.New(rand.NewPCG(3, 4))
	now := time.Now().UnixNano()
	const n = 3*FlowBatch + 17
	want := map[uint64]State{}
	for i := range n {
		c := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 40000)
		keys := [2]Key{KeyFrom(c, sAddr4), KeyFrom(sAddr4, netip.AddrPortFrom(gAddr4.Addr(), uint16(20000+i)))}
		id := uint64(5000 + i)
		want[id] = randomState(r, now)
		if err := dp.PutFlow(id, keys, want[id]); err != nil {
			t.Fatal(err)
		}
	}
	got := map[uint64]State{}
	batches := 0
	err = dp.EachFlow(func(ids []uint64, states []State) {
		batches++
		for i, id := range ids {
			if _, dup := got[id]; dup {
				t.Errorf("flow %d read twice", id)
			}
			got[id] = states[i]
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n || batches < 4 {
		t.Fatalf("read %d flows in %d batches, want %d in at least 4", len(got), batches, n)
	}
	for id, st := range want {
		if got[id] != st {
			t.Fatalf("flow %d:\n got %+v\nwant %+v", id, got[id], st)
		}
		if one, err := dp.Flow(id); err != nil || one != st {
			t.Fatalf("Flow(%d) = %+v, %v", id, one, err)
		}
	}
}

// TestWatch: while the flow is watched, the client's packets with
// payload go to the queue untouched; everything else is rewritten.
func TestWatch(t *testing.T) {
	f := newFixture(t, false, false)
	data := f.c2s(1000, 0xfffffff0, FlagACK)
	data.payload = []byte("GET / HTTP/1.1\r\n")
	if err := f.dp.SetWatch(f.id, f.keys, true); err != nil {
		t.Fatal(err)
	}
	f.allowPass = true
	f.want(f.at(data, C2S, 1), Forward, "watched request (through the engine)")
	if f.passes != 1 {
		t.Fatalf("passes %d, want 1", f.passes)
	}
	f.allowPass = false
	f.want(f.at(f.c2s(1000+16, 0xfffffff0, FlagACK), C2S, 2), Forward, "pure ACK")
	resp := f.s2c(0xffffff00, 0x7ffffff0+16, FlagACK)
	resp.payload = []byte("HTTP/1.1 200 OK\r\n")
	f.want(f.at(resp, S2C, 3), Forward, "response")
	if err := f.dp.SetWatch(f.id, f.keys, false); err != nil {
		t.Fatal(err)
	}
	data.seq += 16
	f.want(f.at(data, C2S, 4), Forward, "unwatched data")
}

// TestConcurrentCPUs: both CPUs rewrite packets of one flow at once, each
// from its own thread, with the program's own clock: every packet is
// forwarded, the highest sequence is the end of the last segment, and the
// last-seen time converts back into the run. (It does not prove the spin
// lock: without it the test still passes, the syscall around each run
// being long against the few instructions of the critical section. The
// lock's case rests on the design: decide() reads and writes all of a
// flow's state inside one critical section.)
func TestConcurrentCPUs(t *testing.T) {
	requireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU")
	}
	dp, err := Load(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	fx := newFixture(t, false, false) // for its parameters and packets
	const id = 7
	f, err := NewFlow(&fx.p, time.Now().UnixNano())
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.PutFlow(id, fx.keys, f.State()); err != nil {
		t.Fatal(err)
	}
	const perCPU, size = 2000, 10
	start := monotime.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for cpu := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				errs <- err
				return
			}
			out := make([]byte, 1500)
			for i := range perCPU {
				// Interleaved segments: CPU 0 sends the even ones.
				s := fx.c2s(1000+uint32((2*i+cpu)*size), 0xfffffff0, FlagACK)
				s.payload = bytes.Repeat([]byte{byte(i)}, size)
				ret, err := dp.Program().Run(&ebpf.RunOptions{Data: frame(s.bytes()), DataOut: out})
				if err != nil {
					errs <- err
					return
				}
				if ret != RetNext {
					errs <- fmt.Errorf("cpu %d packet %d: return code %#x", cpu, i, ret)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	end := monotime.Now()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c[Forward] != 2*perCPU {
		t.Fatalf("counters %v, want %d forwarded", c, 2*perCPU)
	}
	st, err := dp.Flow(id)
	if err != nil {
		t.Fatal(err)
	}
	if want := Seq(1000 + 2*perCPU*size); st.Dirs[C2S].SndNxt != want {
		t.Fatalf("highest sequence %d, want %d", st.Dirs[C2S].SndNxt, want)
	}
	// The program's clock is the daemon's (package monotime): within the run.
	if st.LastSeen < start-int64(time.Millisecond) || st.LastSeen > end+int64(time.Millisecond) {
		t.Fatalf("last seen %d outside the run [%d, %d]", st.LastSeen, start, end)
	}
}

// benchFlow splices a connection onto one with the same tuple, offsets
// and scales: the program's output is then a packet of the same flow, so
// that a repeated run (the kernel reruns the program on the same skb)
// takes the full rewrite path every time.
func benchFlow(b *testing.B, dp *Datapath, v6 bool) []byte {
	c, s := cAddr4, sAddr4
	if v6 {
		c, s = cAddr6, sAddr6
	}
	conn := func(local, remote netip.AddrPort) Conn {
		return Conn{Local: local, Remote: remote, SndNxt: 5000, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 7}
	}
	p := Params{Client: conn(s, c), Server: conn(c, s)}
	p.Server.SndNxt, p.Server.RcvNxt = 1000, 5000
	f, err := NewFlow(&p, 1)
	if err != nil {
		b.Fatal(err)
	}
	if err := dp.PutFlow(99, p.Keys(), f.State()); err != nil {
		b.Fatal(err)
	}
	sg := seg{src: c, dst: s, seq: 1000, ack: 5000, flags: FlagACK, win: 500, opts: tsOpt(1, 2), payload: make([]byte, 100)}
	return frame(sg.bytes())
}

// BenchmarkProgram is the program's cost per packet on the full rewrite
// path (lookups, lock, checks, timestamps, stores, checksum updates), as
// BPF_PROG_TEST_RUN measures it in the kernel.
func BenchmarkProgram(b *testing.B) {
	requireRoot(b)
	for _, v6 := range []bool{false, true} {
		name := "IPv4"
		if v6 {
			name = "IPv6"
		}
		b.Run(name, func(b *testing.B) {
			dp, err := Load(Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer dp.Close()
			data := benchFlow(b, dp, v6)
			ret, per, err := dp.Program().Benchmark(data, b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			c, _ := dp.Counters()
			if ret != RetNext || c[Forward] < uint64(b.N) {
				b.Fatalf("return %#x, counters %v: not the rewrite path", ret, c)
			}
			b.ReportMetric(float64(per.Nanoseconds()), "ns/packet")
		})
	}
}

// TestDemote: the state Demote returns is the engine's after the same
// packets, and the flow's packets pass to the queue afterwards.
func TestDemote(t *testing.T) {
	f := newFixture(t, true, true)
	data := f.c2s(1000, 0xfffffff0, FlagACK)
	data.payload = []byte("abc")
	data.opts = tsOpt(10, 20)
	f.want(f.at(data, C2S, 1), Forward, "data")
	f.want(f.at(f.s2c(0xffffff00, 0x7ffffff0+3, FlagACK|FlagFIN), S2C, 2), Forward, "FIN")
	st, err := f.dp.Demote(f.id, f.keys)
	if err != nil {
		t.Fatal(err)
	}
	if st != f.flow.State() {
		t.Fatalf("demoted state differs:\n got %+v\nwant %+v", st, f.flow.State())
	}
	b := data.bytes()
	out, ret, mark, counter := f.run(b, f.start()+3)
	if counter != CounterPass || ret != RetNext || mark != 0 || !bytes.Equal(out, b) {
		t.Fatalf("after demotion: counter %d ret %#x mark %#x", counter, ret, mark)
	}
	if _, err := f.dp.Flow(f.id); err == nil {
		t.Fatal("the flow's entry survived its demotion")
	}
}

// TestMark: the mark bits are configurable and ORed into the skb's mark,
// keeping the bits already there.
func TestMark(t *testing.T) {
	requireRoot(t)
	dp, err := Load(Options{Mark: 0x4, fakeClock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	fx := newFixture(t, false, false) // for its parameters and packets
	f, err := NewFlow(&fx.p, fx.start())
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.PutFlow(1, fx.keys, f.State()); err != nil {
		t.Fatal(err)
	}
	if err := dp.setNow(fx.start() + 1); err != nil {
		t.Fatal(err)
	}
	in := frame(fx.c2s(1000, 0xfffffff0, FlagACK).bytes())
	ctxIn := binary.NativeEndian.AppendUint32(make([]byte, 8), 0x100) // len, pkt_type, mark
	ctxOut := make([]byte, 512)
	ret, err := dp.Program().Run(&ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256), Context: ctxIn, ContextOut: ctxOut})
	if err != nil {
		t.Fatal(err)
	}
	if mark := binary.NativeEndian.Uint32(ctxOut[8:]); ret != RetNext || mark != 0x104 {
		t.Fatalf("return %#x, mark %#x, want %#x and 0x104", ret, mark, uint32(RetNext))
	}

	// A packet that carries the mark was rewritten already, at another
	// interface (a bridge's port, before the bridge): it passes
	// untouched and uncounted, though its tuple is the flow's.
	before, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	ctxIn = binary.NativeEndian.AppendUint32(make([]byte, 8), 0x104)
	out := make([]byte, len(in)+256)
	ret, err = dp.Program().Run(&ebpf.RunOptions{Data: in, DataOut: out, Context: ctxIn, ContextOut: ctxOut})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out[:len(in)], in) || ret != RetNext {
		t.Errorf("a packet marked rewritten: return %#x, changed %v; want %#x, unchanged", ret, !bytes.Equal(out[:len(in)], in), uint32(RetNext))
	}
	if after, err := dp.Counters(); err != nil || after != before {
		t.Errorf("counters %v -> %v (%v), want them unmoved", before, after, err)
	}
}

// TestRedirect: with Options.Redirect a rewritten packet is sent to the
// device the FIB gives its destination (TC_ACT_REDIRECT, counted as
// redirected) with its TTL (hop limit) one less, as the stack's
// forwarding would, and everything else goes on through the stack
// rewritten as before (TCX_NEXT), its TTL untouched: with forwarding off
// on the device it came in on, towards a destination with no route, a
// TTL that would run out here (the stack answers it), IPv4 options, and
// a source the FIB routes through another device than the one the packet
// came in on (spoofed from the wrong side, or an asymmetric route: the
// stack's rp_filter decides, which a redirect would skip).
func TestRedirect(t *testing.T) {
	requireRoot(t)
	ns := testnet.Scratch(t)
	for _, args := range [][]string{
		{"link", "add", "in0", "type", "veth", "peer", "in1"}, {"link", "add", "out0", "type", "veth", "peer", "out1"},
		{"link", "set", "in0", "up"}, {"link", "set", "in1", "up"}, {"link", "set", "out0", "up"}, {"link", "set", "out1", "up"},
		{"addr", "add", "10.1.0.1/24", "dev", "in0"}, {"addr", "add", "10.2.0.1/24", "dev", "out0"},
		{"addr", "add", "fd00:1::1/64", "dev", "in0", "nodad"}, {"addr", "add", "fd00:2::1/64", "dev", "out0", "nodad"},
	} {
		ns.MustRun("ip", args...)
	}
	in0, err := strconv.Atoi(strings.TrimSpace(ns.MustRun("cat", "/sys/class/net/in0/ifindex")))
	if err != nil {
		t.Fatal(err)
	}
	const tcActRedirect = 7
	for _, c := range []struct {
		name       string
		v6         bool
		forwarding string
		route      bool // whether the server's subnet is routed
		ttl        uint8
		ipOpts     []byte
		want       uint32
		wantTTL    uint8
		clientOut  bool     // the client's address routed through out0
		stack      []string // SetStackInterfaces
	}{
		{"routed", false, "1", true, 64, nil, tcActRedirect, 63, false, nil},
		{"routed, TTL 2", false, "1", true, 2, nil, tcActRedirect, 1, false, nil},
		{"TTL 1", false, "1", true, 1, nil, RetNext, 1, false, nil},
		{"IPv4 options", false, "1", true, 64, []byte{1, 1, 1, 0}, RetNext, 64, false, nil},
		{"forwarding off", false, "0", true, 64, nil, RetNext, 64, false, nil},
		{"no route", false, "1", false, 64, nil, RetNext, 64, false, nil},
		{"IPv6 routed", true, "1", true, 64, nil, tcActRedirect, 63, false, nil},
		{"IPv6 hop limit 1", true, "1", true, 1, nil, RetNext, 1, false, nil},
		{"IPv6 forwarding off", true, "0", true, 64, nil, RetNext, 64, false, nil},
		{"IPv6 no route", true, "1", false, 64, nil, RetNext, 64, false, nil},
		{"source routed elsewhere", false, "1", true, 64, nil, RetNext, 64, true, nil},
		{"IPv6 source routed elsewhere", true, "1", true, 64, nil, RetNext, 64, true, nil},
		// in0 has a classic tc ingress qdisc, whose filters run after
		// the program: what it rewrote goes on to them.
		{"stack interface", false, "1", true, 64, nil, RetNext, 64, false, []string{"in0"}},
		{"IPv6 stack interface", true, "1", true, 64, nil, RetNext, 64, false, []string{"in0"}},
		{"another stack interface", false, "1", true, 64, nil, tcActRedirect, 63, false, []string{"out0"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			family, subnet, dev := "4", "10.2.0.0/24", "out0"
			if c.v6 {
				family, subnet = "6", "fd00:2::/64"
			}
			if err := ns.Sysctl("net.ipv"+family+".conf.all.forwarding", c.forwarding); err != nil {
				t.Fatal(err)
			}
			ns.Run("ip", "-"+family, "route", "del", subnet) // connected route, present or not
			if c.route {
				ns.MustRun("ip", "-"+family, "route", "add", subnet, "dev", dev)
			}
			client := cAddr4.Addr().String()
			if c.v6 {
				client = cAddr6.Addr().String()
			}
			if c.clientOut {
				ns.MustRun("ip", "-"+family, "route", "add", client, "dev", "out0")
				defer ns.Run("ip", "-"+family, "route", "del", client)
			}
			err := ns.Do(func() error {
				dp, err := Load(Options{Redirect: true, fakeClock: true})
				if err != nil {
					return err
				}
				defer dp.Close()
				var stack []int
				for _, name := range c.stack {
					ifi, err := net.InterfaceByName(name)
					if err != nil {
						return err
					}
					stack = append(stack, ifi.Index)
				}
				if changed, err := dp.SetStackInterfaces(stack); err != nil || changed != (len(stack) > 0) {
					return fmt.Errorf("SetStackInterfaces(%v): changed %v, %v", stack, changed, err)
				}
				fx := newFixture(t, c.v6, false)
				f, err := NewFlow(&fx.p, fx.start())
				if err != nil {
					return err
				}
				if err := dp.PutFlow(1, fx.keys, f.State()); err != nil {
					return err
				}
				if err := dp.setNow(fx.start() + 1); err != nil {
					return err
				}
				pkt := fx.c2s(1000, 0xfffffff0, FlagACK)
				pkt.ttl, pkt.ipOpts = c.ttl, c.ipOpts
				in := frame(pkt.bytes())
				// struct __sk_buff up to ifindex: the packet came in on in0
				// (ingress_ifindex) and is at its ingress (ifindex: the
				// device of the skb, loopback if unset).
				ctx := make([]byte, 44)
				binary.NativeEndian.PutUint32(ctx[36:], uint32(in0))
				binary.NativeEndian.PutUint32(ctx[40:], uint32(in0))
				out := make([]byte, len(in)+256)
				ret, err := dp.Program().Run(&ebpf.RunOptions{Data: in, DataOut: out, Context: ctx})
				if err != nil {
					return err
				}
				n, err := dp.Counters()
				if err != nil {
					return err
				}
				wantRedirected := map[bool]uint64{true: 1, false: 0}[c.want == tcActRedirect]
				if ret != c.want || n[Forward] != 1 || n[CounterRedirect] != wantRedirected {
					return fmt.Errorf("return %#x, forwarded %d, redirected %d; want %#x, 1, %d", ret, n[Forward], n[CounterRedirect], c.want, wantRedirected)
				}
				ip := out[14:len(in)]
				if c.v6 {
					if ip[7] != c.wantTTL {
						return fmt.Errorf("hop limit %d, want %d", ip[7], c.wantTTL)
					}
					return nil
				}
				if ip[8] != c.wantTTL {
					return fmt.Errorf("TTL %d, want %d", ip[8], c.wantTTL)
				}
				hl := int(ip[0]&0x0f) * 4
				fixed := append([]byte(nil), ip[:hl]...)
				IPv4(fixed).UpdateChecksum()
				if !bytes.Equal(fixed[10:12], ip[10:12]) {
					return fmt.Errorf("header checksum %x, want %x", ip[10:12], fixed[10:12])
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// BenchmarkProgramPass is the program's cost for a packet of no spliced
// flow (the lookup misses): what every other packet through the gateway
// pays while the program is attached (bench's routing-bpf-attached).
func BenchmarkProgramPass(b *testing.B) {
	requireRoot(b)
	for _, v6 := range []bool{false, true} {
		name := "IPv4"
		c, s := cAddr4, sAddr4
		if v6 {
			name = "IPv6"
			c, s = cAddr6, sAddr6
		}
		b.Run(name, func(b *testing.B) {
			dp, err := Load(Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer dp.Close()
			sg := seg{src: c, dst: s, seq: 1000, ack: 5000, flags: FlagACK, win: 500, opts: tsOpt(1, 2), payload: make([]byte, 100)}
			ret, per, err := dp.Program().Benchmark(frame(sg.bytes()), b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			c, _ := dp.Counters()
			if ret != RetNext || c[CounterPass] < uint64(b.N) {
				b.Fatalf("return %#x, counters %v: not the pass path", ret, c)
			}
			b.ReportMetric(float64(per.Nanoseconds()), "ns/packet")
		})
	}
}
