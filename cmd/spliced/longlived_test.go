package main

import (
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"spliced/testnet"
)

// longLivedConfig: the shortest divert_timeout, and a drain_timeout
// within half of it (see config's validation).
var longLivedConfig = `
log:
  level: debug
kernel:
  divert_timeout: 1s
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: immediate
      drain_timeout: 500ms
`

// TestLabFlowOutlivesDivertTimeout: with kernel.divert_timeout at 1 s
// (the shortest it may be), a spliced flow runs for over 10 s (ten
// timeouts), sending steadily and once staying idle for three timeouts:
// the daemon refreshes its divert entries, and every byte arrives intact
// both ways. Without the refresh its entries expire after 1 s and its
// packets reach the ends unrewritten.
func TestLabFlowOutlivesDivertTimeout(t *testing.T) {
	t.Parallel()
	const timeout = time.Second
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, longLivedConfig)
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const writes, writeSize = 100, 32 << 10
	var paused bool
	opt := testnet.TransferOptions{C2S: writes * writeSize, S2C: writes * writeSize, WriteSize: writeSize, Seed: rand.Uint64(), Timeout: time.Minute,
		Progress: func(sent int64) {
			if !paused && sent >= writes*writeSize/2 {
				paused = true
				time.Sleep(3 * timeout) // idle: only the refresh keeps the entries
			}
			time.Sleep(75 * time.Millisecond)
		}}
	tr := testnet.RunTransfer(lab.Client(), ln, srv, opt)
	if err := tr.Check(); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 30))
	}
	if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" }) == nil {
		t.Fatal("the flow was not spliced")
	}
	refreshes := 0
	for _, l := range d.Lines() {
		if l["msg"] == "divert entries refreshed" {
			refreshes++
		}
	}
	t.Logf("a spliced flow lived %v (%.0f divert timeouts), %d KiB each way intact; %d refreshes",
		tr.Elapsed.Round(time.Millisecond), tr.Elapsed.Seconds()/timeout.Seconds(), writes*writeSize>>10, refreshes)
	if tr.Elapsed < 10*timeout {
		t.Errorf("the flow lived only %v, not ten timeouts", tr.Elapsed)
	}
}
