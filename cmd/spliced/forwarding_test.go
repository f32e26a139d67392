package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabForwardingOff: a gateway that does not forward (net.ipv4.ip_forward
// and net.ipv6.conf.all.forwarding 0, as on a transparent proxy or a load
// balancer that only proxies). Proxied flows need no forwarding; spliced
// ones do, on both datapaths (their rewritten packets are forwarded):
// before, every spliced flow stalled at its splice. Now the splices are
// refused and the flows stay proxied and complete, the log and the status
// say what to turn on, spliced -check lists the interfaces; once
// forwarding is on, flows splice again.
func TestLabForwardingOff(t *testing.T) {
	for _, datapath := range []string{"nfqueue", "bpf"} {
		t.Run(datapath, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			for _, s := range []string{"net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"} {
				if out, err := lab.Gateway.Run("sysctl", "-w", s); err != nil {
					t.Fatalf("sysctl %s: %v: %s", s, err, out)
				}
			}
			d := testnet.StartDaemon(t, lab, faultConfig("splice", "  datapath: "+datapath+"\n"))
			out, err := d.Run("-config", d.Config, "-check")
			if err != nil || !strings.Contains(out, "# forwarding: IPv4 off on ") || !strings.Contains(out, "net.ipv4.ip_forward=1") ||
				!strings.Contains(out, "# forwarding: IPv6 off on ") || !strings.Contains(out, "net.ipv6.conf.all.forwarding=1") {
				t.Errorf("spliced -check does not list the interfaces that do not forward: %v\n%s", err, out)
			}
			// Refused splices: nothing to wait for, the flows stay proxied.
			mux, dst := serverMux(t, lab)
			if failures := busyFlowsVia(t, lab, d, mux, dst, "copy", 4, 2*time.Second, func() {}); len(failures) > 0 {
				t.Fatalf("%d of 4 flows failed with forwarding off:\n%s\n%s", len(failures), strings.Join(failures, "\n"), tail(d.Log(), 20))
			}
			if n := countMsg(d, "flow spliced"); n != 0 {
				t.Errorf("%d flows spliced with forwarding off", n)
			}
			refused := d.FindLog(func(l map[string]any) bool {
				return strings.HasPrefix(fmt.Sprint(l["msg"]), "splice refused: IPv4 forwarding is off on ")
			})
			if refused == nil || !strings.Contains(fmt.Sprint(refused["msg"]), "sysctl -w net.ipv4.ip_forward=1") {
				t.Fatalf("no refusal naming the fix: %v\n%s", refused, tail(d.Log(), 20))
			}
			st, err := d.Client().Status(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "IPv4 forwarding is off on ") {
				t.Errorf("status warnings %q, want the refusal", st.Warnings)
			}

			// The operator turns it on: the next flows splice (the
			// reading holds 5 s) and the warning goes.
			if out, err := lab.Gateway.Run("sysctl", "-w", "net.ipv4.ip_forward=1"); err != nil {
				t.Fatalf("sysctl: %v: %s", err, out)
			}
			testnet.Eventually(t, 10*time.Second, func() error {
				st, err := d.Client().Status(context.Background())
				if err != nil {
					return err
				}
				if len(st.Warnings) != 0 {
					return fmt.Errorf("status warnings %q", st.Warnings)
				}
				return nil
			})
			if failures := busyFlowsVia(t, lab, d, mux, dst, "splice", 4, 2*time.Second, func() {}); len(failures) > 0 {
				t.Fatalf("%d of 4 flows failed with forwarding on:\n%s\n%s", len(failures), strings.Join(failures, "\n"), tail(d.Log(), 20))
			}
			if n := countMsg(d, "flow spliced"); n != 4 {
				t.Errorf("%d flows spliced once forwarding was on, want 4", n)
			}
		})
	}
}
