package rules

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"spliced/config"
	"spliced/testnet"
)

const sampleConfig = `
kernel:
  table: spl_rt
  mark: 0x5c1
services:
  - name: web
    listen: 15001
    ports: ["80", "8000-8100", "8050"]
    destinations: [10.2.0.0/16, 10.2.3.0/24, "fd00:2::/32"]
  - name: any
    listen: 15002
    ports: ["5201", "60000-65535"]
  - name: src6
    listen: 15003
    ports: ["21"]
    sources: ["fd00:1::/48"]
    destinations: [10.9.0.7, "::/0"]
`

func sampleSpec(t *testing.T) Spec {
	t.Helper()
	cfg, err := config.Parse("sample.yaml", []byte(sampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	return FromConfig(cfg)
}

func TestSpecMergesAndSplits(t *testing.T) {
	spec := sampleSpec(t)
	web := spec.Services[0]
	if got := len(web.Ports); got != 2 {
		t.Errorf("ports not merged: %v", web.Ports)
	}
	if len(web.Dst4) != 1 || web.Dst4[0].String() != "10.2.0.0/16" || len(web.Dst6) != 1 {
		t.Errorf("destinations: %v %v", web.Dst4, web.Dst6)
	}
	if v4, v6 := spec.Services[2].Families(); v4 || !v6 {
		t.Errorf("src6 families = %v %v, want IPv6 only", v4, v6)
	}
}

// TestRoundTrip programs the table with Go (netlink) in a scratch
// namespace and compares `nft list table` with Render, which is what
// `spliced -check` prints. It also loads Render's output with `nft -f` into
// a second namespace and compares that listing, proving the text is real
// nft syntax.
func TestRoundTrip(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	ns := testnet.Scratch(t)
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	for i := 0; i < 2; i++ { // the second install proves idempotence
		if err := m.Install(); err != nil {
			t.Fatalf("install #%d: %v", i+1, err)
		}
	}
	listed, err := ns.Run("nft", "list", "table", "inet", spec.Table)
	if err != nil {
		t.Fatal(err)
	}
	want := Render(spec)
	if diff := cmp.Diff(want, listed); diff != "" {
		t.Fatalf("kernel listing differs from Render (-render +kernel):\n%s", diff)
	}

	ns2 := testnet.Scratch(t)
	cmd := ns2.Command(t.Context(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(want)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f of Render output: %v\n%s", err, out)
	}
	listed2, err := ns2.Run("nft", "list", "table", "inet", spec.Table)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, listed2); diff != "" {
		t.Fatalf("nft -f of Render does not list as Render (-render +kernel):\n%s", diff)
	}

	table, ipRules, routes, err := m.State()
	if err != nil || !table || ipRules != 2 || routes != 2 {
		t.Fatalf("state after install: table=%v rules=%d routes=%d err=%v", table, ipRules, routes, err)
	}
	rulesOut, _ := ns.Run("ip", "rule")
	if !strings.Contains(rulesOut, "fwmark 0x5c1/0x5c1 lookup 100 proto 92") {
		t.Errorf("ip rule lacks ours:\n%s", rulesOut)
	}
	routesOut, _ := ns.Run("ip", "-6", "route", "show", "table", "100")
	if !strings.Contains(routesOut, "local default dev lo proto 92") {
		t.Errorf("ip -6 route table 100 lacks ours:\n%s", routesOut)
	}
}

// TestRemoveTouchesOnlyOurs installs next to an operator's own table, rule
// and route, then removes: only ours disappears.
func TestRemoveTouchesOnlyOurs(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	ns := testnet.Scratch(t)
	for _, args := range [][]string{
		{"nft", "add table inet operator"},
		{"nft", "add chain inet operator input { type filter hook input priority 0; }"},
		{"ip", "rule add fwmark 0x7 lookup 100 priority 50"},
		{"ip", "route add local 192.0.2.0/24 dev lo table 100"},
	} {
		if _, err := ns.Run(args[0], strings.Fields(args[1])...); err != nil {
			t.Fatal(err)
		}
	}
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	table, ipRules, routes, err := m.State()
	if err != nil || table || ipRules != 0 || routes != 0 {
		t.Fatalf("after remove: table=%v rules=%d routes=%d err=%v", table, ipRules, routes, err)
	}
	if out, _ := ns.Run("nft", "list", "tables"); !strings.Contains(out, "table inet operator") {
		t.Errorf("operator's table is gone:\n%s", out)
	}
	if out, _ := ns.Run("ip", "rule"); !strings.Contains(out, "fwmark 0x7 lookup 100") {
		t.Errorf("operator's rule is gone:\n%s", out)
	}
	if out, _ := ns.Run("ip", "route", "show", "table", "100"); !strings.Contains(out, "192.0.2.0/24") {
		t.Errorf("operator's route is gone:\n%s", out)
	}
}
