package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabFwmarkAccept: with net.ipv4.tcp_fwmark_accept on, a socket
// accepted from a SYN takes the SYN's mark, and an intercepted SYN
// carries spliced's: the SYN-ACK, routed by that mark, goes back into
// the gateway, and no intercepted connection opens. The daemon said
// nothing of it. It now logs the problem with the fix, lists it in the
// status and in -check, and says when it is gone; with the fix, flows
// go through.
func TestLabFwmarkAccept(t *testing.T) {
	t.Parallel()
	const fix = "sysctl -w net.ipv4.tcp_fwmark_accept=0"
	lab := testnet.NewT(t, testnet.Options{})
	lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1")
	d := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "intercepted connections fail" })
	if rec == nil || !strings.Contains(fmt.Sprint(rec["detail"]), fix) {
		t.Fatalf("no error naming %q: %v\n%s", fix, rec, tail(d.Log(), 10))
	}
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "tcp_fwmark_accept") {
		t.Errorf("status warnings %q, want tcp_fwmark_accept's", st.Warnings)
	}
	if out, err := d.Run("-config", d.Config, "-check"); err != nil || !strings.Contains(out, "# marks: net.ipv4.tcp_fwmark_accept is on") {
		t.Errorf("spliced -check: %v\n%s", err, out)
	}
	// What the problem is: no intercepted connection opens.
	ln, err := lab.Server().Listen(netip.AddrPortFrom(lab.Server().IPv4, 5001))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, 5001), 2*time.Second); err == nil {
		c.Close()
		t.Fatalf("an intercepted connection opened with tcp_fwmark_accept on; the warning is wrong")
	}
	ln.Close()
	// What the error says to run; a reload checks again at once.
	lab.Gateway.MustRun("sh", "-c", fix)
	d.Signal(syscall.SIGHUP)
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
		return l["msg"] == "net.ipv4.tcp_fwmark_accept is off again: intercepted connections open"
	}); err != nil {
		t.Fatalf("the change was not noticed: %v\n%s", err, tail(d.Log(), 10))
	}
	if st, err := d.Client().Status(context.Background()); err != nil || len(st.Warnings) > 0 {
		t.Errorf("status after the change: %v %q, want no warning", err, st.Warnings)
	}
	if failures := busyFlows(t, lab, d, "splice", 4, 2*time.Second, func() {}); len(failures) > 0 {
		t.Fatalf("spliced flows after the fix:\n%s\n%s", strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
}
