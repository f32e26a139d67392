package gateway

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"spliced/config"
	"spliced/testnet"
)

// TestDriftLeftReported: with kernel.repair off, a deleted ip rule of
// spliced's (policy routing alone: the table is intact) is logged once
// and listed by the status, which the metrics count, until it is back;
// deleted again, it is logged again. Before, a drift of the routing
// alone was never logged (the check compared the table's diff, empty,
// with the last one), the status listed no drift of any kind, and a
// drift that ended and came back was not said again.
func TestDriftLeftReported(t *testing.T) {
	testnet.Privileged(t, "nft", "ip")
	ns := testnet.Scratch(t)
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Kernel.Repair = "off"
	cfg.Kernel.OwnTable = "off"
	var logs bytes.Buffer
	var logMu sync.Mutex
	g := New(cfg, slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &logMu}, nil)))
	t.Cleanup(g.workers.Close)
	in := func(fn func() error) {
		t.Helper()
		if err := ns.Do(fn); err != nil {
			t.Fatal(err)
		}
	}
	in(func() error { return g.manager().Install(nil) })
	t.Cleanup(func() { ns.Do(g.manager().Close) })
	check := func() []string {
		in(func() error { g.repairDrift(context.Background()); return nil })
		return g.statusWarnings()
	}
	said := func() int {
		logMu.Lock()
		defer logMu.Unlock()
		return strings.Count(logs.String(), "kernel.repair is off, leaving it")
	}
	if w := check(); len(w) != 0 || said() != 0 {
		t.Fatalf("installed: warnings %q, %d drifts logged", w, said())
	}
	rule := []string{"-4", "rule", "del", "fwmark", "0x5c1/0x5c1", "lookup", "100"}
	ns.MustRun("ip", rule...)
	for range 2 {
		w := check()
		if len(w) != 1 || !strings.Contains(w[0], "1 of 2 ip rules") || !strings.Contains(w[0], "kernel.repair is off") {
			t.Errorf("ip rule deleted: warnings %q; want the policy routing's", w)
		}
	}
	if n := said(); n != 1 {
		t.Errorf("ip rule deleted, two checks: %d drifts logged, want 1", n)
	}
	in(func() error { return g.manager().Install(nil) })
	if w := check(); len(w) != 0 {
		t.Errorf("routing back: warnings %q", w)
	}
	ns.MustRun("ip", rule...)
	if w := check(); len(w) != 1 || said() != 2 {
		t.Errorf("ip rule deleted again: warnings %q, %d drifts logged; want 1 and 2", w, said())
	}
}
