package gateway

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"spliced/config"
	"spliced/rules"
)

// TestWarningsReported: what the firewall check and the reverse path
// check found reaches splicectl status (Status.Warnings) and Prometheus
// (spliced_warnings), so that an operator who only watches metrics
// learns that flows are kept from splicing or would stall.
func TestWarningsReported(t *testing.T) {
	g := New(&config.Config{}, nil)
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{g: g})
	count := func() float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "spliced_warnings" && len(mf.GetMetric()) == 1 {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("no spliced_warnings gauge")
		return 0
	}
	if n := count(); n != 0 || len(g.Status().Warnings) != 0 {
		t.Fatalf("a fresh gateway: %v warnings, status %q", n, g.Status().Warnings)
	}
	drops := []rules.UntrackedDrop{{Family: "inet", Table: "filter", Chain: "forward"}}
	g.firewallDrops.Store(&drops)
	if n := count(); n != 1 {
		t.Errorf("spliced_warnings %v, want 1", n)
	}
	if st := g.Status().Warnings; len(st) != 1 || !strings.Contains(st[0], "ct state untracked accept") {
		t.Errorf("status warnings %q", st)
	}
}
