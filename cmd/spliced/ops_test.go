package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabReloadChangedService: SIGHUP with a service changed in place (a
// new idle_timeout, same listen port) must be applied, as the README says
// ("services added, removed or changed"). The new service's listeners
// were opened while the old ones still held the port: "bind: address
// already in use", and the reload was refused.
func TestLabReloadChangedService(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	cfg := faultConfig("copy", "")
	d := testnet.StartDaemon(t, lab, cfg)
	mux, dst := serverMux(t, lab)
	// A flow that runs across the reload.
	running := make(chan *testnet.Transfer, 1)
	go func() {
		running <- mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 4 << 20, S2C: 4 << 20, Seed: 3, Rate: 2 << 20})
	}()
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "flow opened" }); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.Config, []byte(cfg+"    idle_timeout: 1m\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Signal(syscall.SIGHUP)
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
		m := fmt.Sprint(l["msg"])
		return m == "configuration reloaded" || strings.HasPrefix(m, "reload refused")
	}); err != nil {
		t.Fatal(err)
	}
	if l := d.FindLog(func(l map[string]any) bool { return strings.HasPrefix(fmt.Sprint(l["msg"]), "reload refused") }); l != nil {
		t.Fatalf("changing a service's idle_timeout was refused: %v", l)
	}
	if tr := <-running; tr.Check() != nil {
		t.Fatalf("the flow across the reload: %v", tr.Check())
	}
	// The changed service intercepts new flows.
	tr := mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 64 << 10, S2C: 64 << 10, Seed: 4})
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow opened" && l["client"] == tr.Client.Local.String()
	}); err != nil {
		t.Fatalf("a flow after the reload was not intercepted: %v", err)
	}
}

// TestLabSecondDaemonSameTable: a second spliced started in the same
// network namespace with the same table (an operator's manual run next to
// the systemd unit, with another configuration and -socket) must refuse
// to start, saying so, and leave the running daemon, its table and its
// spliced flows alone.
func TestLabSecondDaemonSameTable(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	first := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	mux, dst := serverMux(t, lab)
	running := make(chan *testnet.Transfer, 1)
	go func() {
		running <- mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 6 << 20, S2C: 6 << 20, Seed: 5, Rate: 1 << 20})
	}()
	if err := first.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "flow spliced" }); err != nil {
		t.Fatal(err)
	}
	table, _ := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
	other := `
log:
  level: debug
services:
  - name: other
    listen: 15002
    ports: ["5002"]
`
	second, err := testnet.LaunchDaemon(lab, testnet.Binary(t, "spliced"), t.TempDir(), other)
	if second != nil {
		defer second.Stop()
	}
	if err == nil {
		t.Errorf("a second daemon on table inet spliced started")
		second.Stop()
	} else if !strings.Contains(second.Log(), "another spliced") {
		t.Errorf("the second daemon does not say why it stopped:\n%s", second.Log())
	}
	tr := <-running
	if err := tr.Check(); err != nil {
		t.Errorf("the first daemon's spliced flow: %v", err)
	}
	if l := first.FindLog(func(l map[string]any) bool {
		return l["msg"] == "ruleset drift" || strings.Contains(fmt.Sprint(l["msg"]), "restored")
	}); l != nil {
		t.Errorf("the first daemon's table was changed under it: %v", l)
	}
	if now, _ := lab.Gateway.Run("nft", "list", "table", "inet", "spliced"); strings.Contains(now, "service other") {
		t.Errorf("the second daemon's rules are installed:\n%s\nbefore:\n%s", now, table)
	}
	if t.Failed() {
		t.Logf("second daemon:\n%s", second.Log())
	}
}

// TestLabAcceptLocalAfterKill: a daemon with a NAT service that splices
// sets net.ipv4.conf.all.accept_local and restores it at SIGTERM. Killed
// with SIGKILL, it left 1; -cleanup ("remove its kernel state") did not
// restore it, and the next daemon took the 1 for the administrator's own
// and kept it after its SIGTERM: the setting stays changed for good.
func TestLabAcceptLocalAfterKill(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	get := func() string {
		out, _ := lab.Gateway.Run("sysctl", "-n", "net.ipv4.conf.all.accept_local")
		return strings.TrimSpace(out)
	}
	lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_local=0")
	cfg := faultConfig("splice", "") + "    upstream: nat\n"
	d := testnet.StartDaemon(t, lab, cfg)
	if v := get(); v != "1" {
		t.Fatalf("accept_local %q while a NAT splicing service runs", v)
	}
	d.Kill()
	if out, err := d.Run("-cleanup", "-config", d.Config); err != nil {
		t.Fatalf("-cleanup: %v\n%s", err, out)
	}
	if v := get(); v != "0" {
		t.Errorf("after kill -9 and -cleanup: accept_local %q, was 0 before spliced", v)
	}
	// And through a restart: kill -9, a new daemon, SIGTERM.
	lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_local=0")
	d = testnet.StartDaemon(t, lab, cfg)
	d.Kill()
	d = testnet.StartDaemon(t, lab, cfg)
	d.Stop()
	if v := get(); v != "0" {
		t.Errorf("after kill -9, a restart and SIGTERM: accept_local %q, was 0 before spliced", v)
	}
}

// TestLabAcceptLocalResetWhileRunning: net.ipv4.conf.all.accept_local
// set back to 0 (an operator, a hardening script) while spliced NAT
// flows move data. Their packets carry the gateway's own address once
// rewritten, which the kernel then drops as martians: before, nothing
// looked at the sysctl after the start, and 8 of 8 flows stalled for
// good without a word. Now the daemon notices, says so and sets it
// again: every transfer completes intact, and the sysctl goes back to 0
// when the daemon stops, as it was before spliced.
func TestLabAcceptLocalResetWhileRunning(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	get := func() string {
		out, _ := lab.Gateway.Run("sysctl", "-n", "net.ipv4.conf.all.accept_local")
		return strings.TrimSpace(out)
	}
	lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_local=0")
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "")+"    upstream: nat\n")
	const flows = 8
	failures := busyFlows(t, lab, d, "splice", flows, 3*time.Second, func() {
		lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_local=0")
	})
	if len(failures) > 0 {
		t.Fatalf("%d of %d flows failed:\n%s\n%s", len(failures), flows, strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
	if rec := d.FindLog(func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "net.ipv4.conf.all.accept_local was set to 0")
	}); rec == nil {
		t.Errorf("the daemon did not say accept_local was reset:\n%s", tail(d.Log(), 20))
	}
	if v := get(); v != "1" {
		t.Errorf("accept_local %q after the daemon noticed, want 1", v)
	}
	d.Stop()
	if err := d.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if v := get(); v != "0" {
		t.Errorf("accept_local %q after the stop, want 0 as before spliced", v)
	}
}
