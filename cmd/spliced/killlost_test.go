package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// TestLabKillLostFlowsReset: spliced flows of which the daemon keeps no
// state outside its memory (here: no bpffs for the nfqueue datapath's
// record; also a flow in a splice or unsplice, or one the bpf datapath
// handed back to the Go engine) are lost at a kill -9. The next daemon
// must end them at both ends with a reset, busy ones and idle ones,
// whose ends send nothing. Before, transparent flows' ends answered each
// other's unrewritten packets with duplicate ACKs and waited for their
// own timeouts (the test's: 58 s after the restart); idle ones waited
// for ever. Under the systemd unit, whose clean-up after a failure
// (spliced -cleanup -keep-flows) runs between, the same: that clean-up
// removed the whole table when no pin or record held a flow, and the
// next daemon found nothing to reset.
func TestLabKillLostFlowsReset(t *testing.T) {
	t.Parallel()
	for _, systemd := range []bool{false, true} {
		name := "restart"
		if systemd {
			name = "cleanup_keep_flows"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			killLostFlows(t, systemd)
		})
	}
}

// killLostFlows is TestLabKillLostFlowsReset, with the unit's clean-up
// after a failure between the kill and the start if systemd is set.
func killLostFlows(t *testing.T, systemd bool) {
	lab := testnet.NewT(t, testnet.Options{})
	// A directory with a file in it: spliced mounts no bpffs there, so
	// it keeps no record of its spliced flows.
	noFS := t.TempDir()
	if err := os.WriteFile(filepath.Join(noFS, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := faultConfig("splice", "  bpffs: "+noFS+"\n")
	old := testnet.StartDaemon(t, lab, cfg)
	mux, dst := serverMux(t, lab)
	const n = 4
	res := make([]*testnet.Transfer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 64 << 20, S2C: 64 << 20, Seed: 9100 + uint64(2*i), Rate: 1 << 20, Timeout: 60 * time.Second})
		}()
	}
	// Idle flows (IPv6), whose ends send nothing after the restart: a
	// client waiting for a response, a server waiting for a request.
	dst6 := netip.AddrPortFrom(lab.Server().IPv6, 5001)
	ln6, err := lab.Server().Listen(dst6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln6.Close() })
	const idle = 2
	var idleEnds [][2]*net.TCPConn
	for range idle {
		c, s := labPair(t, lab, ln6, dst6)
		idleEnds = append(idleEnds, [2]*net.TCPConn{c, s})
	}
	if err := testnet.Poll(20*time.Second, func() error {
		fs, err := old.Client().Flows(t.Context(), api.FlowFilter{State: "spliced"})
		if err != nil {
			return err
		}
		if len(fs) < n+idle {
			return fmt.Errorf("%d of %d flows spliced", len(fs), n+idle)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	old.Kill()
	if systemd {
		if out, err := old.Run("-config", old.Config, "-cleanup", "-keep-flows"); err != nil {
			t.Fatalf("spliced -cleanup -keep-flows: %v\n%s", err, out)
		}
		checkKeptTable(t, lab)
	}
	time.Sleep(time.Second)
	d := testnet.StartDaemon(t, lab, cfg)
	started := time.Now()
	wg.Wait()
	t.Logf("%d busy and %d idle flows spliced, no record kept; kill -9, restart: transfers ended %v after the restart", n, idle, time.Since(started).Round(time.Millisecond))
	for i, r := range res {
		if r.Client.Err == nil || r.Server.Err == nil || !strings.Contains(r.Client.Err.Error(), "reset") || !strings.Contains(r.Server.Err.Error(), "reset") {
			t.Errorf("flow %d after the restart: client %v, server %v; want a reset at both ends", i, r.Client.Err, r.Server.Err)
		}
		if err := r.CheckPrefix(); err != nil {
			t.Errorf("flow %d: %v", i, err)
		}
	}
	for i, ends := range idleEnds {
		for j, c := range ends {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err := c.Read(make([]byte, 1))
			if err == nil || !strings.Contains(err.Error(), "reset") {
				t.Errorf("idle flow %d, %s: read %v, want a reset", i, [2]string{"client", "server"}[j], err)
			}
		}
	}
	if l := d.FindLog(func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "flows an earlier spliced diverted and nobody can continue")
	}); l == nil || l["tuples"] != float64(2*(n+idle)) {
		t.Errorf("the new daemon's log line on the lost flows: %v, want one with %d tuples", l, 2*(n+idle))
	}
}
