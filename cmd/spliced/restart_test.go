package main

import (
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"spliced/testnet"
)

var restartConfig = splicingForwardConfig("debug", "")

// TestLabRestartRace: a daemon splicing at once is killed with -9 while a
// spliced flow runs (its table, routes and divert entries stay behind);
// then a new daemon starts while 50 clients connect. The old table hands
// SYNs to the new daemon's listener the moment it exists, before the new
// table is installed: nothing may be accepted before everything a splice
// needs exists. Every connection either completes intact (SHA-256 both
// ways) or fails at connect; the daemon neither crashes nor panics.
func TestLabRestartRace(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	mux, srv := serverMux(t, lab)

	// The first daemon, killed mid-flow.
	old := testnet.StartDaemon(t, lab, restartConfig)
	running := make(chan *testnet.Transfer, 1)
	go func() {
		running <- mux.Transfer(lab.Client(), srv, testnet.TransferOptions{C2S: 1 << 30, S2C: 1 << 30, Seed: 7, Timeout: 8 * time.Second})
	}()
	if err := old.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "flow spliced" }); err != nil {
		t.Fatalf("the first daemon did not splice: %v", err)
	}
	old.Kill()
	if out, _ := lab.Gateway.Run("nft", "list", "table", "inet", "spliced"); !strings.Contains(out, "elements = {") {
		t.Fatalf("kill -9 should leave the table with divert entries behind:\n%s", out)
	}

	// The second daemon, started while clients connect.
	const clients = 50
	bin := testnet.Binary(t, "spliced")
	var d *testnet.Daemon
	var launchErr error
	launched := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(launched)
		d, launchErr = testnet.LaunchDaemon(lab, bin, t.TempDir(), restartConfig, "-log-level", "debug")
	}()
	results := make([]*testnet.Transfer, clients)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Spread over the daemon's start: before its listener exists,
			// between the listener and the new table, and after.
			time.Sleep(time.Duration(i) * 3 * time.Millisecond)
			results[i] = mux.Transfer(lab.Client(), srv, testnet.TransferOptions{C2S: 256 << 10, S2C: 256 << 10, Seed: rand.Uint64(), Timeout: 30 * time.Second})
		}()
	}
	<-launched
	ready := time.Since(start)
	if d != nil {
		t.Cleanup(func() {
			d.Stop()
			d.CheckRaces(t)
			if t.Failed() {
				t.Logf("daemon log:\n%s", d.Log())
			}
		})
	}
	if launchErr != nil {
		t.Fatalf("the second daemon: %v", launchErr)
	}
	wg.Wait()
	<-running // broken by the kill: its outcome does not matter

	var intact, refused int
	for i, tr := range results {
		switch err := tr.Check(); {
		case err == nil:
			intact++
		case tr.Client.Err != nil && strings.HasPrefix(tr.Client.Err.Error(), "dial "):
			refused++
		default:
			t.Errorf("connection %d neither completed intact nor failed at connect: %v", i, err)
		}
	}
	spliced := 0
	for _, l := range d.Lines() {
		if l["msg"] == "flow spliced" {
			spliced++
		}
	}
	t.Logf("daemon ready after %v; %d connections intact (%d spliced by the new daemon), %d failed at connect", ready.Round(time.Millisecond), intact, spliced, refused)
	if strings.Contains(d.Log(), "panic") || strings.Contains(d.Log(), "goroutine ") {
		t.Fatalf("the daemon panicked:\n%s", tail(d.Log(), 40))
	}
	if _, err := d.Client().Status(t.Context()); err != nil {
		t.Fatalf("the daemon is not alive after the race: %v", err)
	}
	if spliced == 0 {
		t.Errorf("no connection was spliced by the new daemon")
	}
	if intact < clients/2 {
		t.Errorf("only %d of %d connections completed", intact, clients)
	}
	if err := d.Stop(); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}
