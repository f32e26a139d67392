package gateway

import (
	"strings"
	"testing"

	"spliced/config"
)

// TestRestartOnly: a reload applies the flow caps, but not
// limits.client_ipv6_prefix, by which the flow table keeps its
// per-client counts: a reload that changes it is refused, naming it.
func TestRestartOnly(t *testing.T) {
	parse := func(limits string) *config.Config {
		t.Helper()
		cfg, err := config.Parse("spliced.yaml", []byte("limits:\n"+limits+"services:\n  - name: fwd\n    listen: 15001\n    ports: [\"5001\"]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	old := parse("  max_flows_per_client: 10\n")
	if err := restartOnly(old, parse("  max_flows_per_client: 20\n  max_flows: 500\n")); err != nil {
		t.Errorf("the caps changed: %v", err)
	}
	err := restartOnly(old, parse("  max_flows_per_client: 10\n  client_ipv6_prefix: 64\n"))
	if err == nil || !strings.Contains(err.Error(), "limits.client_ipv6_prefix") || !strings.Contains(err.Error(), "restart") {
		t.Errorf("client_ipv6_prefix changed: %v, want a refusal naming it", err)
	}
}
