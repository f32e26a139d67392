package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabSourceNAT: a router that masquerades what leaves towards the
// servers (here the server's side plays the Internet: the gateway's
// default route goes there, and the server has no route back to the
// clients). A transparent service's upstream connection has the client's
// own 4-tuple, so conntrack takes it for the client's intercepted
// connection, whose NAT bindings were set when the client's SYN arrived:
// the masquerade rule never sees it, and its SYN leaves with the client's
// address, which the server cannot answer. Measured 2026-12-05 (16 MiB
// each way): no transparent connection reached the server in 120 s,
// copy, splice and splice-bpf alike, while NAT flows passed. A daemon cannot make such a
// service work, so it says so at start, in `splicectl status` and in
// `spliced -check`, naming the service, the interface and the rule, and
// the fix (upstream: nat); once reloaded with it, the warning is gone
// and spliced flows (whose packets go untracked, past the masquerade)
// reach the server from the gateway's address.
func TestLabSourceNAT(t *testing.T) {
	t.Parallel()
	const warning = "a transparent service's upstream connections miss the router's source NAT"
	lab := testnet.NewT(t, testnet.Options{})
	srv, wan := lab.Server(), lab.GatewayServerSide[0]
	lab.Gateway.MustRun("ip", "route", "add", "default", "via", srv.IPv4.String())
	lab.Gateway.MustRun("ip", "-6", "route", "add", "default", "via", srv.IPv6.String())
	srv.MustRun("ip", "route", "del", "default")
	srv.MustRun("ip", "-6", "route", "del", "default")
	nft(t, &lab.Gateway.NS, "add table inet operator",
		"add chain inet operator srcnat { type nat hook postrouting priority srcnat; }",
		"add chain inet operator srcnat_wan",
		fmt.Sprintf(`add rule inet operator srcnat oifname "%s" jump srcnat_wan`, wan.Dev),
		"add rule inet operator srcnat_wan counter masquerade")

	d := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	rec := d.FindLog(func(l map[string]any) bool { return strings.HasPrefix(fmt.Sprint(l["msg"]), warning) })
	rule := fmt.Sprintf("table inet operator chain srcnat_wan (masquerade on %s)", wan.Dev)
	if rec == nil || rec["service"] != "fwd" || rec["interface"] != wan.Dev || rec["rule"] != rule {
		t.Fatalf("no warning naming the service, %s and %q: %v\n%s", wan.Dev, rule, rec, tail(d.Log(), 10))
	}
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "service fwd: upstream transparent, but "+rule) || !strings.Contains(st.Warnings[0], "set upstream: nat") {
		t.Errorf("status warnings %q, want the service, the rule and the fix", st.Warnings)
	}
	if out, err := d.Run("-config", d.Config, "-check"); err != nil || !strings.Contains(out, "# source NAT: service fwd: upstream transparent, but "+rule) {
		t.Errorf("spliced -check: %v\n%s", err, out)
	}

	// The fix the warning names.
	cfg := strings.Replace(faultConfig("splice", ""), "    listen: 15001\n", "    listen: 15001\n    upstream: nat\n", 1)
	if err := os.WriteFile(d.Config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d.Signal(syscall.SIGHUP)
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "a transparent service's upstream connections no longer meet a source NAT rule")
	}); err != nil {
		t.Fatalf("the reload with upstream: nat was not noticed: %v\n%s", err, tail(d.Log(), 10))
	}
	if st, err := d.Client().Status(context.Background()); err != nil || len(st.Warnings) > 0 {
		t.Errorf("status after the fix: %v %q, want no warning", err, st.Warnings)
	}
	// The fix leaves no transparent service to check.
	if out, err := d.Run("-config", d.Config, "-check"); err != nil || !strings.Contains(out, "# source NAT: nothing to check") {
		t.Errorf("spliced -check after the fix: %v\n%s", err, out)
	}
	if failures := busyFlows(t, lab, d, "splice", 4, 2*time.Second, func() {}); len(failures) > 0 {
		t.Fatalf("spliced NAT flows behind the masquerade:\n%s\n%s", strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
}
