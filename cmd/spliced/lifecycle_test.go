package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	old.Kill()
	// What the unit runs after a failure, then RestartSec.
	if out, err := old.Run("-config", old.Config, "-cleanup", "-keep-flows"); err != nil {
		t.Fatalf("spliced -cleanup -keep-flows: %v\n%s", err, out)
	}
	if k := storedFlows(t, lab, root); k != n {
		t.Fatalf("%d flows in the record after the clean-up, want %d", k, n)
	}
	checkKeptTable(t, lab)
	time.Sleep(time.Second)
	d := testnet.StartDaemon(t, lab, cfg)
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
	t.Logf("kill -9, spliced -cleanup -keep-flows, restart: %d of %d flows intact", n-broken, n)
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
