package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// faultConfig is the daemon's configuration for the fault tests: one
// transparent service on port 5001, spliced at once or never.
func faultConfig(mode, extra string) string {
	splice := "never"
	if mode == "splice" {
		splice = "immediate"
	}
	return fmt.Sprintf(`
log:
  level: debug
kernel:
  queues: 2
%sservices:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: %s
`, extra, splice)
}

// busyFlows runs n transfers at once through port 5001, each paced to
// last about dur, and calls fault once every flow moves data (and, in
// splice mode, was spliced). It returns the transfers' failures.
func busyFlows(t *testing.T, lab *testnet.Lab, d *testnet.Daemon, mode string, n int, dur time.Duration, fault func()) []string {
	t.Helper()
	mux, dst := serverMux(t, lab)
	return busyFlowsVia(t, lab, d, mux, dst, mode, n, dur, fault)
}

// busyFlowsVia is busyFlows to the server's mux at dst (serverMux), for a
// test that runs it more than once.
func busyFlowsVia(t *testing.T, lab *testnet.Lab, d *testnet.Daemon, mux *testnet.Mux, dst netip.AddrPort, mode string, n int, dur time.Duration, fault func()) []string {
	t.Helper()
	const rate = 1 << 20
	size := int64(dur.Seconds() * rate)
	seed := rand.Uint64()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	var started sync.WaitGroup
	started.Add(n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var once sync.Once
			tr := mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: size, S2C: size, Seed: seed + uint64(2*i), Rate: rate, WriteSize: 16 << 10, Timeout: dur + 20*time.Second,
				Progress: func(int64) { once.Do(started.Done) }})
			once.Do(started.Done)
			if err := tr.Check(); err != nil {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("flow %d (%v): %v", i, tr.Client.Local, err))
				mu.Unlock()
			}
		}()
	}
	started.Wait()
	if mode == "splice" {
		testnet.Eventually(t, 15*time.Second, func() error {
			st, err := d.Client().Status(context.Background())
			if err != nil {
				return err
			}
			if st.Flows[api.StateSpliced] < n {
				return fmt.Errorf("%d of %d flows spliced", st.Flows[api.StateSpliced], n)
			}
			return nil
		})
	}
	fault()
	wg.Wait()
	return failures
}

// serverMux listens on port 5001 of the lab's server and returns the mux
// that accepts its connections (closed with the test), and the address.
func serverMux(t *testing.T, lab *testnet.Lab) (*testnet.Mux, netip.AddrPort) {
	t.Helper()
	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	mux := testnet.NewMux(ln)
	t.Cleanup(func() { mux.Close() })
	return mux, dst
}

// labPair opens a connection from the lab's client to dst, where ln
// listens on the server, and returns both ends (closed with the test).
func labPair(t *testing.T, lab *testnet.Lab, ln *net.TCPListener, dst netip.AddrPort) (client, server *net.TCPConn) {
	t.Helper()
	c, err := lab.Client().Dial(dst, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return c, s
}

// noFlowsLeft waits until the daemon holds no flow.
func noFlowsLeft(t *testing.T, d *testnet.Daemon, within time.Duration) {
	t.Helper()
	testnet.Eventually(t, within, func() error {
		flows, err := d.Client().Flows(context.Background(), api.FlowFilter{})
		if err != nil {
			return err
		}
		if len(flows) > 0 {
			return fmt.Errorf("%d flows left, e.g. %+v", len(flows), flows[0])
		}
		return nil
	})
}

// TestLabRulesetGone: spliced's table against `nft flush ruleset` (what
// Debian's nftables service and most firewall scripts run first) and
// `nft delete table inet spliced` in the gateway, while 24 flows move
// data both ways, spliced or proxied.
//
// Owned (the default): the flush leaves the table as it is, and the
// delete is refused, so nothing is repaired; the flows are NAT ones,
// whose packets the gateway's stack answered with resets while the
// table was gone (8 of 8 reset, before tables were owned).
//
// Unowned (kernel.own_table: off): the delete removes it; the daemon
// notices and restores the table (the time to repair is measured from
// the deletion until the table is back), and the transparent flows
// survive the gap.
//
// Every transfer completes intact.
func TestLabRulesetGone(t *testing.T) {
	t.Parallel()
	for _, owned := range []bool{true, false} {
		for _, mode := range modes {
			name := "owned/flush_ruleset/" + mode
			if !owned {
				name = "unowned/delete_table/" + mode
			}
			t.Run(name, func(t *testing.T) {
				testnet.Privileged(t, "nft")
				lab := testnet.NewT(t, testnet.Options{})
				cfg := faultConfig(mode, "  own_table: off\n")
				if owned {
					cfg = strings.Replace(faultConfig(mode, ""), "    listen: 15001\n", "    listen: 15001\n    upstream: nat\n", 1)
				}
				d := testnet.StartDaemon(t, lab, cfg)
				const flows = 24
				var repair time.Duration
				var start time.Time
				var before string
				// The repair takes about 150 ms: 3 s of flows span it.
				failures := busyFlows(t, lab, d, mode, flows, 3*time.Second, func() {
					var err error
					if before, err = lab.Gateway.Run("nft", "list", "table", "inet", "spliced"); err != nil {
						t.Fatal(err)
					}
					start = time.Now()
					if owned {
						if out, err := lab.Gateway.Run("nft", "flush", "ruleset"); err != nil {
							t.Fatalf("nft flush ruleset: %v: %s", err, out)
						}
						if out, err := lab.Gateway.Run("nft", "delete", "table", "inet", "spliced"); err == nil || !strings.Contains(err.Error(), "Operation not permitted") {
							t.Errorf("nft delete table of an owned table: %v %s; want it refused", err, out)
						}
						return
					}
					if out, err := lab.Gateway.Run("nft", "delete", "table", "inet", "spliced"); err != nil {
						t.Fatalf("nft delete table: %v: %s", err, out)
					}
					testnet.Eventually(t, 5*time.Second, func() error {
						out, err := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
						if err != nil || !strings.Contains(out, "tproxy") {
							return fmt.Errorf("table not restored: %v", err)
						}
						return nil
					})
					repair = time.Since(start)
				})
				if len(failures) > 0 {
					t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
				}
				rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "ruleset restored" })
				if owned {
					if rec != nil {
						t.Errorf("an owned table was restored: %v", rec)
					}
					if !strings.Contains(before, "flags owner") {
						t.Errorf("the table is not owned:\n%s", before)
					}
					t.Logf("nft flush ruleset during %d NAT %s flows: the table stayed, delete refused; all flows intact", flows, mode)
					return
				}
				if rec == nil {
					t.Fatal("no \"ruleset restored\" in the daemon's log")
				}
				logged, err := time.Parse(time.RFC3339Nano, fmt.Sprint(rec["time"]))
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("nft delete table during %d %s flows: restored %v after the command started (daemon's log), seen by nft after %v; all flows intact",
					flows, mode, logged.Sub(start).Round(time.Millisecond), repair.Round(time.Millisecond))
			})
		}
	}
}

// TestLabDivertSetFlushed: someone flushes spliced's divert sets (`nft
// flush set`, possible on an unowned table: kernel.own_table: off, or a
// kernel before 6.9) while transparent spliced flows move data. The
// drift check leaves divert elements out, and the refresh that would put
// them back runs every third of divert_timeout (8 h by default): the
// flows' packets passed unrewritten until then, and 8 of 8 flows stalled
// for good, the daemon saying nothing. Now the daemon notices the
// deletion, says so, and puts the entries of its live flows back: every
// transfer completes intact. (NAT flows are reset by the gateway's stack
// in the gap, as when the whole table is deleted: see the README.)
func TestLabDivertSetFlushed(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "nft")
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "  own_table: off\n"))
	const flows = 8
	failures := busyFlows(t, lab, d, "splice", flows, 3*time.Second, func() {
		for _, set := range []string{"divert4_any", "divert4_0", "divert4_1"} {
			if out, err := lab.Gateway.Run("nft", "flush", "set", "inet", "spliced", set); err != nil {
				t.Fatalf("nft flush set %s: %v: %s", set, err, out)
			}
		}
	})
	if len(failures) > 0 {
		t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
	restored := 0.0 // the flushes may be noticed in more than one check
	for _, l := range d.Lines() {
		if strings.HasPrefix(fmt.Sprint(l["msg"]), "divert entries deleted by another process") {
			n, _ := l["tuples"].(float64)
			restored += n
		}
	}
	if restored < 2*flows {
		t.Fatalf("the daemon said it restored %v tuples, want at least %d (both of each flow):\n%s", restored, 2*flows, tail(d.Log(), 20))
	}
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Repairs < 1 {
		t.Errorf("status: %d repairs after the restore, want at least 1", st.Repairs)
	}
	t.Logf("divert sets flushed under %d spliced flows: %v tuples restored; all intact", flows, restored)
}

// TestLabConntrackFlush: `conntrack -F` in the gateway, whose operator
// ruleset drops ct state invalid, while 24 flows move data both ways,
// spliced or proxied: every transfer completes intact.
func TestLabConntrackFlush(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			testnet.Privileged(t, "nft", "conntrack")
			lab := testnet.NewT(t, testnet.Options{})
			nft(t, &lab.Gateway.NS, "add table inet operator",
				"add chain inet operator forward { type filter hook forward priority 0; }",
				"add rule inet operator forward ct state invalid counter drop",
				"add chain inet operator input { type filter hook input priority 0; }",
				"add rule inet operator input ct state invalid counter drop")
			d := testnet.StartDaemon(t, lab, faultConfig(mode, ""))
			const flows = 24
			entries := 0
			failures := busyFlows(t, lab, d, mode, flows, 3*time.Second, func() {
				out, _ := lab.Gateway.Run("conntrack", "-L")
				entries = strings.Count(out, "\n")
				time.Sleep(time.Second)
				if out, err := lab.Gateway.Run("conntrack", "-F"); err != nil {
					t.Errorf("conntrack -F: %v: %s", err, out)
				}
			})
			if len(failures) > 0 {
				t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
			}
			t.Logf("conntrack -F (%d entries) during %d %s flows: all intact; invalid dropped: %d", entries, flows, mode, counted(t, &lab.Gateway.NS, "operator"))
		})
	}
}

// TestLabQueueOverflow: spliced flows whose queue holds only 64 packets
// (kernel.queue_len) while the daemon stops reading for 300 ms (SIGSTOP):
// the kernel drops what does not fit, the status counts it
// (kernel_queue_dropped), TCP retransmits, and every transfer completes
// intact.
func TestLabQueueOverflow(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "  queue_len: 64\n"))
	const flows = 16
	failures := busyFlows(t, lab, d, "splice", flows, 5*time.Second, func() {
		for range 3 {
			d.Signal(syscall.SIGSTOP)
			time.Sleep(300 * time.Millisecond)
			d.Signal(syscall.SIGCONT)
			time.Sleep(500 * time.Millisecond)
		}
	})
	if len(failures) > 0 {
		t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var dropped uint64
	for _, e := range st.Engines {
		for _, q := range e.Queues {
			dropped += uint64(q.KernelQueueDropped)
		}
	}
	if dropped == 0 {
		t.Fatal("kernel_queue_dropped is 0: the queues never overflowed, the test proves nothing")
	}
	t.Logf("%d spliced flows intact; the kernel dropped %d packets at full queues (queue_len 64, reader stopped 3x300 ms)", flows, dropped)
}

// TestLabReloadStorm: 20 SIGHUPs, each with a changed configuration (a
// service added or removed), while 24 flows move data both ways, spliced
// or proxied: every reload succeeds and every transfer completes intact.
func TestLabReloadStorm(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			cfg := faultConfig(mode, "")
			d := testnet.StartDaemon(t, lab, cfg)
			const flows, reloads = 24, 20
			failures := busyFlows(t, lab, d, mode, flows, 6*time.Second, func() {
				for i := range reloads {
					next := cfg
					if i%2 == 0 {
						next += "  - name: extra\n    listen: 15002\n    ports: [\"5002\"]\n"
					}
					if err := os.WriteFile(d.Config, []byte(next), 0o600); err != nil {
						t.Fatal(err)
					}
					d.Signal(syscall.SIGHUP)
					testnet.Eventually(t, 10*time.Second, func() error {
						st, err := d.Client().Status(context.Background())
						if err != nil {
							return err
						}
						if st.Reloads != i+1 {
							return fmt.Errorf("%d reloads", st.Reloads)
						}
						return nil
					})
				}
			})
			if len(failures) > 0 {
				t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
			}
			if l := d.FindLog(func(l map[string]any) bool { return strings.HasPrefix(fmt.Sprint(l["msg"]), "reload refused") }); l != nil {
				t.Errorf("a reload was refused: %v", l)
			}
			t.Logf("%d reloads during %d %s flows: all succeeded, every flow intact", reloads, flows, mode)
		})
	}
}

// TestLabServerRestart: the server process restarts in the middle of 8
// flows (it closes its connections with unread data, so its kernel
// resets them, and listens again): the clients see their connections
// end, what they received before is intact, the daemon frees every
// flow, and a new connection to the restarted server works.
func TestLabServerRestart(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			d := testnet.StartDaemon(t, lab, faultConfig(mode, ""))
			dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
			ln, err := lab.Server().Listen(dst)
			if err != nil {
				t.Fatal(err)
			}
			const flows = 8
			var conns []*net.TCPConn
			for range flows {
				c, err := lab.Client().Dial(dst, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				ln.SetDeadline(time.Now().Add(5 * time.Second))
				s, err := ln.AcceptTCP()
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c)
				// The client sends all the time; the server reads a
				// little of it and writes back, then stops reading.
				go func() {
					buf := make([]byte, 32<<10)
					for {
						if _, err := c.Write(buf); err != nil {
							return
						}
					}
				}()
				go func() {
					io.CopyN(io.Discard, s, 1<<20)
					s.Write(make([]byte, 64<<10))
					time.Sleep(2 * time.Second)
					s.Close() // the restart: unread data, so a reset
				}()
			}
			if mode == "splice" {
				testnet.Eventually(t, 10*time.Second, func() error {
					st, err := d.Client().Status(context.Background())
					if err != nil {
						return err
					}
					if st.Flows[api.StateSpliced] < flows {
						return fmt.Errorf("%d spliced", st.Flows[api.StateSpliced])
					}
					return nil
				})
			}
			ln.Close()
			ln, err = lab.Server().Listen(dst) // restarted
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			for i, c := range conns {
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				n, err := io.Copy(io.Discard, c)
				if err != nil && !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("flow %d: after %d bytes: %v, want a reset or a close", i, n, err)
				}
			}
			noFlowsLeft(t, d, 15*time.Second)
			p := testnet.RunTransfer(lab.Client(), ln, dst, testnet.TransferOptions{C2S: 1 << 20, S2C: 1 << 20, Seed: 1})
			if err := p.Check(); err != nil {
				t.Fatalf("a connection to the restarted server: %v", err)
			}
			t.Logf("%s: %d flows ended by the server's restart, all freed; a new connection works", mode, flows)
		})
	}
}

// TestLabClientVanishes: the client disappears without a FIN or a RST
// (its host drops every packet) while its flows are open: the daemon ends
// them at the service's idle_timeout (2 s here), resets the server's end,
// and frees their state (splicectl flows lists none).
func TestLabClientVanishes(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			testnet.Privileged(t, "nft")
			lab := testnet.NewT(t, testnet.Options{})
			d := testnet.StartDaemon(t, lab, strings.Replace(faultConfig(mode, ""), "    splice:", "    idle_timeout: 2s\n    splice:", 1))
			dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
			ln, err := lab.Server().Listen(dst)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			const flows = 8
			var servers []*net.TCPConn
			for range flows {
				c, s := labPair(t, lab, ln, dst)
				s.SetKeepAlive(false)
				c.SetKeepAlive(false)
				servers = append(servers, s)
				if _, err := c.Write([]byte("hello")); err != nil {
					t.Fatal(err)
				}
				s.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(s, make([]byte, 5)); err != nil {
					t.Fatal(err)
				}
			}
			if mode == "splice" {
				testnet.Eventually(t, 10*time.Second, func() error {
					st, err := d.Client().Status(context.Background())
					if err != nil {
						return err
					}
					if st.Flows[api.StateSpliced] < flows {
						return fmt.Errorf("%d spliced", st.Flows[api.StateSpliced])
					}
					return nil
				})
			}
			vanished := time.Now()
			nft(t, &lab.Client().NS, "add table inet gone",
				"add chain inet gone in { type filter hook input priority -400; policy drop; }",
				"add chain inet gone out { type filter hook output priority -400; policy drop; }")
			noFlowsLeft(t, d, 15*time.Second)
			freed := time.Since(vanished)
			for i, s := range servers {
				s.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, err := s.Read(make([]byte, 1))
				if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("server end of flow %d: %v, want the connection ended", i, err)
				}
			}
			idle := 0
			for _, l := range d.Lines() {
				if l["msg"] == "flow closed" && l["reason"] == "idle" {
					idle++
				}
			}
			if mode == "splice" && idle != flows {
				t.Errorf("%d flows closed as idle, want %d", idle, flows)
			}
			t.Logf("%s: %d flows of a vanished client freed %v after it vanished (idle_timeout 2s)", mode, flows, freed.Round(time.Millisecond))
		})
	}
}

// TestLabDivertCommandsBlocked: another table's output chain, earlier
// than spliced's, drops every packet with spliced's divert command marks.
// The start's check sees that commands do not add their elements, says
// so, and splices add divert entries through netlink: the flow splices
// and arrives intact. Without the blocking chain, the same splice uses
// commands (the data-path tests check that).
func TestLabDivertCommandsBlocked(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	nft(t, &lab.Gateway.NS, "add table inet block",
		"add chain inet block out { type filter hook output priority -400; }",
		"add rule inet block out meta mark & 0xffff0000 == 0x5c1d0000 counter drop")
	sc := &scenario{size: 8 << 20, spliceAt: 1 << 20}
	d := sc.runIn(t, lab, "splice")
	rec := d.FindLog(func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "divert commands do not work here")
	})
	if rec == nil || !strings.Contains(fmt.Sprint(rec["err"]), "not in the set") {
		t.Errorf("no warning that divert commands do not work: %v\n%s", rec, tail(d.Log(), 20))
	}
	e := spliceEngine(t, d)
	if e.DivertByCommand != 0 || e.DivertByNetlink != 1 {
		t.Errorf("divert entries added by command %d times, by netlink %d times; want once by netlink", e.DivertByCommand, e.DivertByNetlink)
	}
	if n := counted(t, &lab.Gateway.NS, "block"); n == 0 {
		t.Error("the blocking chain saw no command: the check did not run")
	}
}
