package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabNFQueueCrashUnderSystemd: the restart after a crash as the
// systemd unit runs it on the nfqueue datapath (the default): kill -9,
// then the unit's ExecStopPost for a failed run (spliced -cleanup
// -keep-flows), then, RestartSec later, a new daemon. The spliced flows
// (transparent and NAT) are recorded and adopted by the new daemon, so
// they must survive the clean-up between: their packets may be dropped
// meanwhile, never delivered unrewritten (a NAT flow's server packets
// reach the gateway's own address and its stack answers them with a
// reset), and every transfer completes intact.
func TestLabNFQueueCrashUnderSystemd(t *testing.T) {
	t.Parallel()
	nfqueueRestartUnderSystemd(t, "kill -9", func(old *testnet.Daemon) { old.Kill() }, nil)
}

// TestLabNFQueueHandOver: SIGUSR2 (systemctl kill -s USR2 spliced, the
// restart that keeps flows) on the nfqueue datapath, then what the unit
// runs after it: the daemon exits with status 75, leaving the record of
// its spliced flows and the table's divert entries; the unit's
// ExecStopPost cleans up with -keep-flows, Restart=on-failure starts a
// new daemon, and it adopts every flow. Before, SIGUSR2 on nfqueue was a
// SIGTERM: every spliced flow was reset, and the daemon exited with
// status 0, so the unit did not start it again.
func TestLabNFQueueHandOver(t *testing.T) {
	t.Parallel()
	nfqueueRestartUnderSystemd(t, "SIGUSR2", func(old *testnet.Daemon) {
		old.Signal(syscall.SIGUSR2)
		err := old.Wait(20 * time.Second)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 75 {
			t.Fatalf("exit after SIGUSR2: %v, want status 75 (the unit restarts the daemon only after a failure)\n%s", err, tail(old.Log(), 10))
		}
	}, nil)
}

// TestLabAdoptedNATWithoutNATSplicing: kill -9, and a restart with a file
// whose NAT service no longer splices (splice.mode: never). The new
// daemon adopts the NAT flows spliced before, which need
// net.ipv4.conf.all.accept_local (their packets leave with the
// gateway's own address as source), although its own services do not:
// it sets it. It did not, and the stack dropped every IPv4 packet of
// those flows as a martian: they stalled until they idled out.
func TestLabAdoptedNATWithoutNATSplicing(t *testing.T) {
	t.Parallel()
	nfqueueRestartUnderSystemd(t, "kill -9, NAT splicing off", func(old *testnet.Daemon) { old.Kill() }, func(cfg string) string {
		const nat = "    upstream: nat\n    idle_timeout: 1m\n    splice:\n      mode: immediate\n      drain_timeout: 30s\n"
		if !strings.Contains(cfg, nat) {
			t.Fatalf("no NAT service that splices in:\n%s", cfg)
		}
		return strings.Replace(cfg, nat, "    upstream: nat\n    idle_timeout: 1m\n    splice:\n      mode: never\n", 1)
	})
}

// TestLabHandOverNothingToKeep: SIGUSR2 to a daemon that splices
// nothing (no flow to leave) still exits with status 75, so that
// Restart=on-failure starts it again as the operator asked, and its
// shutdown is the ordinary one: the table is gone. Before, it exited
// with 0, and the unit left the gateway without spliced.
func TestLabHandOverNothingToKeep(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, `
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: never
`)
	d.Signal(syscall.SIGUSR2)
	err := d.Wait(20 * time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 75 {
		t.Fatalf("exit after SIGUSR2: %v, want status 75 (the unit restarts the daemon only after a failure)\n%s", err, tail(d.Log(), 10))
	}
	if out, err := lab.Gateway.Run("nft", "list", "tables"); err != nil || strings.Contains(out, "spliced") {
		t.Fatalf("tables after the shutdown: %q %v", out, err)
	}
}

// nfqueueRestartUnderSystemd runs 8 spliced flows on the nfqueue datapath
// through stop (what ends the daemon, called once all are recorded), the
// unit's clean-up after a failure and a new daemon, and checks that it
// adopts them all and that they complete intact.
//
// restart, unless nil, gives the new daemon's configuration from the old
// one's.
func nfqueueRestartUnderSystemd(t *testing.T, how string, stop func(old *testnet.Daemon), restart func(cfg string) string) {
	lab := testnet.NewT(t, testnet.Options{})
	root := testnet.BPFFS(t)
	cfg := pinnedRestartConfig(t, "nfqueue", root)
	old := testnet.StartDaemon(t, lab, cfg)
	listen := func(port uint16) (netip.AddrPort, *testnet.Mux) {
		addr := netip.AddrPortFrom(lab.Server().IPv4, port)
		ln, err := lab.Server().Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		m := testnet.NewMux(ln)
		t.Cleanup(func() { m.Close() })
		return addr, m
	}
	fwdSrv, fwdMux := listen(5001)
	natSrv, natMux := listen(5002)
	const n = 8
	res := make([]*testnet.Transfer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, dst := fwdMux, fwdSrv
			if i%2 == 1 {
				m, dst = natMux, natSrv
			}
			res[i] = m.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 12 << 20, S2C: 12 << 20, Seed: 8100 + uint64(2*i), Rate: 1 << 20, Timeout: time.Minute})
		}()
	}
	if err := testnet.Poll(20*time.Second, func() error {
		if k := storedFlows(t, lab, root); k < n {
			return fmt.Errorf("%d of %d flows recorded", k, n)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(old.Log(), 20))
	}
	time.Sleep(time.Second)
	stop(old)
	// What the unit runs after a failure, then RestartSec.
	if out, err := old.Run("-config", old.Config, "-cleanup", "-keep-flows"); err != nil {
		t.Fatalf("spliced -cleanup -keep-flows: %v\n%s", err, out)
	}
	if k := storedFlows(t, lab, root); k != n {
		t.Fatalf("%d flows in the record after the clean-up, want %d", k, n)
	}
	checkKeptTable(t, lab)
	time.Sleep(time.Second)
	newCfg := cfg
	if restart != nil {
		newCfg = restart(cfg)
	}
	d := testnet.StartDaemon(t, lab, newCfg)
	rec := d.FindLog(func(l map[string]any) bool {
		return l["msg"] == "adopted spliced flows from the nfqueue datapath's record"
	})
	if rec == nil || rec["flows"] != float64(n) {
		t.Errorf("adoption log: %v\n%s", rec, tail(d.Log(), 30))
	}
	wg.Wait()
	broken := 0
	for i, r := range res {
		if err := r.Check(); err != nil {
			broken++
			kind := "transparent"
			if i%2 == 1 {
				kind = "NAT"
			}
			t.Errorf("flow %d (%s): %v", i, kind, err)
		}
	}
	t.Logf("%s, spliced -cleanup -keep-flows, restart: %d of %d flows intact", how, n-broken, n)
	if out, _ := lab.Gateway.Run("nft", "list", "tables"); !strings.Contains(out, "spliced") {
		t.Errorf("no table after the restart: %s", out)
	}
}

// checkKeptTable checks the table spliced -cleanup -keep-flows leaves
// while flows are kept: it intercepts nothing (no tproxy rule, no policy
// routing), and its divert chain still queues the kept flows' packets.
func checkKeptTable(t *testing.T, lab *testnet.Lab) {
	t.Helper()
	out, err := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
	if err != nil {
		t.Fatalf("no table after the clean-up with kept flows: %v\n%s", err, out)
	}
	if strings.Contains(out, "tproxy") || !strings.Contains(out, "chain divert {") {
		t.Errorf("the table after the clean-up: want the divert chain and no tproxy rule:\n%s", out)
	}
	if out, _ := lab.Gateway.Run("ip", "rule", "list"); strings.Contains(out, "lookup 100") {
		t.Errorf("policy routing after the clean-up:\n%s", out)
	}
}

// TestLabSecondDaemonOtherTable: a second daemon in the same network
// namespace with its own kernel.table, kernel.mark and
// kernel.route_table but the first one's queues (and listen ports) does
// not start, and says that its queue is taken.
func TestLabSecondDaemonOtherTable(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	first := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	out, err := first.Run("-config", writeConfig(t, faultConfig("splice", "  table: other\n  mark: 0x10\n  route_table: 200\n")), "-socket", "off", "-log-format", "text")
	t.Logf("second daemon: %v\n%s", err, out)
	if err == nil {
		t.Fatal("a second daemon on the first one's queues started")
	}
	// The kernel answers EPERM, which alone reads as a missing
	// capability.
	if !strings.Contains(out, "nfqueue 100: bind") || !strings.Contains(out, "another program is bound to this queue") || !strings.Contains(out, "kernel.queue") {
		t.Errorf("the second daemon does not say that its queue is taken:\n%s", out)
	}
	if _, err := first.Client().Status(t.Context()); err != nil {
		t.Errorf("the first daemon after the second one's attempt: %v", err)
	}
}

// writeConfig writes a configuration file for a test and returns its path.
func writeConfig(t *testing.T, cfg string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "spliced.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLabSecondDaemonSharedRouting: a second daemon on its own table and
// queues but the first one's kernel.mark and kernel.route_table (the
// defaults) does not start, and says which setting it shares: its stop
// removed every ip rule with the mark, the first daemon's included, and
// the first one's intercepted flows were routed past its sockets until
// its drift check (every 10 s) put the routing back. Neither does
// spliced -cleanup with that configuration take the routing away.
func TestLabSecondDaemonSharedRouting(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	first := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	cfg2 := strings.NewReplacer("listen: 15001", "listen: 15101", `ports: ["5001"]`, `ports: ["5101"]`).Replace(faultConfig("splice", "  table: other\n  queue: 200\n"))
	file2 := writeConfig(t, cfg2)
	out, err := first.Run("-config", file2, "-socket", "off", "-log-format", "text")
	t.Logf("second daemon: %v\n%s", err, out)
	if err == nil || !strings.Contains(out, "uses kernel.mark 0x5c1") {
		t.Errorf("a second daemon with the first one's kernel.mark: %v, want a refusal naming kernel.mark:\n%s", err, out)
	}
	out, err = first.Run("-config", file2, "-cleanup", "-log-format", "text")
	if err == nil || !strings.Contains(out, "uses kernel.mark 0x5c1") {
		t.Errorf("spliced -cleanup with the first one's kernel.mark: %v, want a refusal naming kernel.mark:\n%s", err, out)
	}
	if out, _ := lab.Gateway.Run("ip", "rule", "list"); !strings.Contains(out, "lookup 100") {
		t.Errorf("the first daemon's ip rule is gone:\n%s", out)
	}
	if _, err := first.Client().Status(t.Context()); err != nil {
		t.Errorf("the first daemon: %v", err)
	}
}

// TestLabStopDuringSplices: SIGTERM while flows are being spliced (new
// ones keep arriving until the signal). Every flow ends at both ends
// soon after the stop, with a reset or a close, none of them at its
// transfer's deadline: a splice that completed after the stop had reset
// the spliced flows had its sockets closed silently (in repair mode) and
// no daemon any more, and both ends waited for ever.
func TestLabStopDuringSplices(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	mux, dst := serverMux(t, lab)
	const deadline = 8 * time.Second
	var wg sync.WaitGroup
	var mu sync.Mutex
	var res []*testnet.Transfer
	stopDial := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stopDial:
				return
			default:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				tr := mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 1 << 30, S2C: 1 << 30, Seed: 9100 + uint64(2*i), Rate: 256 << 10, WriteSize: 16 << 10, Timeout: deadline})
				mu.Lock()
				res = append(res, tr)
				mu.Unlock()
			}()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second)
	close(stopDial)
	// A burst of connections, whose splices run while the daemon stops.
	for i := range 150 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tr := mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 1 << 30, S2C: 1 << 30, Seed: 19100 + uint64(2*i), Rate: 256 << 10, WriteSize: 16 << 10, Timeout: deadline})
			mu.Lock()
			res = append(res, tr)
			mu.Unlock()
		}()
	}
	time.Sleep(30 * time.Millisecond)
	if err := d.Stop(); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	wg.Wait()
	hung, connected, direct := 0, 0, 0
	for i, r := range res {
		if !r.Server.Local.IsValid() {
			continue // it never reached the server (a dial the stop refused)
		}
		connected++
		if r.Client.Received > 0 && r.Server.Received > 0 {
			if err := r.CheckPrefix(); err != nil {
				t.Errorf("flow %d: %v", i, err)
			}
		}
		// A flow whose SYN came after the table was gone went straight
		// to the server and moved data until the deadline (8 s at
		// 256 KiB/s: 2 MiB); a hung one stopped at the stop (at most
		// 1.5 s after the first dial: 384 KiB).
		if r.Elapsed >= deadline-time.Second && r.Client.Received > 1<<20 && r.Server.Received > 1<<20 {
			direct++
			continue
		}
		if r.Elapsed >= deadline-time.Second || r.Client.Err == nil || r.Server.Err == nil {
			hung++
			if hung <= 5 {
				t.Errorf("flow %d (%v) did not end at the stop: after %v, client %v, server %v", i, r.Client.Local, r.Elapsed.Round(time.Millisecond), r.Client.Err, r.Server.Err)
			}
		}
	}
	var slowest *testnet.Transfer
	for _, r := range res {
		if r.Server.Local.IsValid() && r.Client.Received <= 1<<20 && (slowest == nil || r.Elapsed > slowest.Elapsed) {
			slowest = r
		}
	}
	if slowest != nil {
		t.Logf("slowest to end: %v: client %v, server %v", slowest.Elapsed.Round(time.Millisecond), slowest.Client.Err, slowest.Server.Err)
	}
	spliced := countMsg(d, "flow spliced")
	after, resetting := 0, false
	for _, l := range d.Lines() {
		switch l["msg"] {
		case "shutting down":
			resetting = true
		case "flow spliced", "flow stays proxied":
			if resetting {
				after++
			}
		}
	}
	t.Logf("%d splices ended after the stop began", after)
	t.Logf("%d flows dialed, %d connected (%d after the table went), %d spliced; SIGTERM; %d did not end at the stop", len(res), connected, direct, spliced, hung)
	if hung > 0 {
		t.Errorf("%d of %d flows hung after the stop", hung, connected)
	}
	// Nothing the gateway sends may be malformed, even as it stops: a
	// splice that began at the stop sent its divert command after the
	// table was gone, and the command, no longer taken by a rule, reached
	// the server (5 and 46 segments with a bad checksum in 2 of 5 runs).
	for _, end := range []struct {
		name string
		h    *testnet.Host
	}{{"client", lab.Client()}, {"server", lab.Server()}} {
		if n := nstatValue(t, &end.h.NS, "TcpInCsumErrors"); n > 0 {
			t.Errorf("the %s received %d segments with a bad checksum (%s)", end.name, n, tcpRejects(end.h))
		}
	}
	for _, l := range d.Lines() {
		if msg := fmt.Sprint(l["msg"]); strings.HasPrefix(msg, "divert command failed") {
			t.Errorf("the daemon said: %s: %v", msg, l["err"])
		}
	}
}

// TestLabRoutingGone: spliced's ip rule, or its local route, deleted
// under busy flows (as a network manager that removes foreign rules and
// routes does when it restarts): the daemon notices at once, not at its
// next periodic check (10 s later before: every intercepted flow
// stalled meanwhile), and restores it; every transfer completes intact.
func TestLabRoutingGone(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		what, mode string
		del        []string
		present    []string
		want       string
	}{
		{"rule", "copy", []string{"-4", "rule", "del", "fwmark", "0x5c1/0x5c1", "lookup", "100"}, []string{"-4", "rule", "list"}, "lookup 100"},
		{"rule", "splice", []string{"-4", "rule", "del", "fwmark", "0x5c1/0x5c1", "lookup", "100"}, []string{"-4", "rule", "list"}, "lookup 100"},
		{"route", "copy", []string{"-4", "route", "del", "local", "default", "dev", "lo", "table", "100"}, []string{"-4", "route", "list", "table", "100"}, "local default"},
	} {
		t.Run(c.what+"/"+c.mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			d := testnet.StartDaemon(t, lab, faultConfig(c.mode, ""))
			const flows = 8
			var repair time.Duration
			failures := busyFlows(t, lab, d, c.mode, flows, 3*time.Second, func() {
				start := time.Now()
				if out, err := lab.Gateway.Run("ip", c.del...); err != nil {
					t.Fatalf("ip %v: %v: %s", c.del, err, out)
				}
				testnet.Eventually(t, 15*time.Second, func() error {
					out, err := lab.Gateway.Run("ip", c.present...)
					if err != nil || !strings.Contains(out, c.want) {
						return fmt.Errorf("ip %s not restored: %v", c.what, err)
					}
					return nil
				})
				repair = time.Since(start)
			})
			t.Logf("ip %s restored %v after its deletion; %d of %d flows failed", c.what, repair.Round(time.Millisecond), len(failures), flows)
			if len(failures) > 0 {
				t.Errorf("%d of %d flows failed:\n%s", len(failures), flows, strings.Join(failures, "\n"))
			}
			if repair > 2*time.Second {
				t.Errorf("the ip %s came back %v after its deletion", c.what, repair.Round(time.Millisecond))
			}
		})
	}
}

// TestLabIPv6Disabled: on a gateway whose IPv6 is disabled
// (net.ipv6.conf.all.disable_ipv6=1, as on many routers) spliced cannot
// add its IPv6 local route on lo: it says so and how to fix it (the
// error was "permission denied" alone), and starts once lo has IPv6.
func TestLabIPv6Disabled(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	lab.Gateway.MustRun("sysctl", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	d, err := testnet.LaunchDaemon(lab, testnet.Binary(t, "spliced"), t.TempDir(), faultConfig("splice", ""), "-log-format", "text")
	if err == nil {
		d.Stop()
		t.Fatal("spliced started without IPv6 on lo")
	}
	if d != nil {
		d.Stop()
		d.Wait(10 * time.Second)
	}
	if !strings.Contains(err.Error(), "IPv6 local route") || !strings.Contains(err.Error(), "net.ipv6.conf.lo.disable_ipv6=0") {
		t.Errorf("start without IPv6 on lo: %v; want the route, the cause and the fix", err)
	}
	lab.Gateway.MustRun("sysctl", "-w", "net.ipv6.conf.lo.disable_ipv6=0")
	testnet.StartDaemon(t, lab, faultConfig("splice", ""))
}

// TestLabTableEdited: someone edits spliced's table while transparent
// spliced flows move data (a rule added to its prerouting chain, as an
// operator's counter): the drift check restores the table, and every
// transfer completes intact. A restore that re-creates the base chains
// while a queue holds packets of spliced flows lets those packets pass
// the new divert chain again (see rules.Manager.UpdateServices).
func TestLabTableEdited(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "  own_table: off\n")) // nft edits it
	const flows = 24
	failures := busyFlows(t, lab, d, "splice", flows, 8*time.Second, func() {
		for i := range 5 {
			if out, err := lab.Gateway.Run("nft", "add", "rule", "inet", "spliced", "prerouting", "counter"); err != nil {
				t.Fatalf("nft add rule: %v: %s", err, out)
			}
			if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
				return l["msg"] == "ruleset restored" && countMsg(d, "ruleset restored") > i
			}); err != nil {
				t.Fatalf("edit %d not restored: %v", i, err)
			}
			time.Sleep(300 * time.Millisecond)
		}
		// What someone added goes too.
		lab.Gateway.MustRun("nft", "add", "set", "inet", "spliced", "extra_set", "{ type ipv4_addr; }")
		lab.Gateway.MustRun("nft", "add", "chain", "inet", "spliced", "extra_chain")
		testnet.Eventually(t, 15*time.Second, func() error {
			out, err := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
			if err != nil || strings.Contains(out, "extra_") || !strings.Contains(out, "tproxy") {
				return fmt.Errorf("table not restored: %v\n%s", err, out)
			}
			return nil
		})
	})
	t.Logf("5 edits restored; %d of %d flows failed", len(failures), flows)
	if len(failures) > 0 {
		t.Errorf("%d of %d flows failed:\n%s", len(failures), flows, strings.Join(failures, "\n"))
	}
}
