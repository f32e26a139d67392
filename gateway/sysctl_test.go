package gateway

import (
	"io"
	"log/slog"
	"strings"
	"testing"

	"spliced/config"
	"spliced/testnet"
)

// TestCheckAcceptLocal: accept_local set back to 0 while spliced NAT
// flows need it is set to 1 again and counted as a repair; with
// kernel.repair off it stays 0, and the status says what to do until it
// is 1 again. Before, nothing looked at it after the start.
func TestCheckAcceptLocal(t *testing.T) {
	ns := testnet.Scratch(t)
	const key = "net.ipv4.conf.all.accept_local"
	for _, repair := range []string{"on", "off"} {
		t.Run("repair_"+repair, func(t *testing.T) {
			cfg, err := config.LoadDefault()
			if err != nil {
				t.Fatal(err)
			}
			cfg.Kernel.Repair = repair
			g := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
			t.Cleanup(g.workers.Close)
			check := func() {
				t.Helper()
				if err := ns.Do(func() error { g.checkAcceptLocal(); return nil }); err != nil {
					t.Fatal(err)
				}
			}
			value := func() string {
				t.Helper()
				v, err := ns.ReadSysctl(key)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			if err := ns.Sysctl(key, "0"); err != nil {
				t.Fatal(err)
			}
			check() // no NAT flow needs it
			if v := value(); v != "0" || g.repairs.Load() != 0 {
				t.Fatalf("not needed: accept_local %s, %d repairs; want 0 and none", v, g.repairs.Load())
			}
			g.acceptLocalNeeded.Store(true)
			check()
			warned := strings.Join(g.statusWarnings(), "\n")
			if repair == "on" {
				if v := value(); v != "1" || g.repairs.Load() != 1 || warned != "" {
					t.Errorf("accept_local %s, %d repairs, warnings %q; want 1, 1 repair, none", v, g.repairs.Load(), warned)
				}
				return
			}
			if v := value(); v != "0" || g.repairs.Load() != 0 || !strings.Contains(warned, "sysctl -w net.ipv4.conf.all.accept_local=1") {
				t.Errorf("repair off: accept_local %s, %d repairs, warnings %q; want 0, none, the fix", v, g.repairs.Load(), warned)
			}
			if err := ns.Sysctl(key, "1"); err != nil {
				t.Fatal(err)
			}
			check()
			if w := g.statusWarnings(); len(w) != 0 {
				t.Errorf("accept_local 1 again: warnings %q", w)
			}
		})
	}
}
