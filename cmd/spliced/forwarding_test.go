package main

import (
	"context"
	"fmt"
	"net/netip"
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
// say what to turn on, spliced -check lists the interfaces; once IPv4
// forwarding is on, IPv4 flows splice again and an IPv6 flow, with IPv6
// forwarding still off, stays proxied.
func TestLabForwardingOff(t *testing.T) {
	t.Parallel()
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

			// IPv6 forwarding is still off: an IPv6 flow stays proxied,
			// and the status says why (the log said it for IPv4 within
			// the minute, so not again).
			dst6 := netip.AddrPortFrom(lab.Server().IPv6, 5001)
			ln6, err := lab.Server().Listen(dst6)
			if err != nil {
				t.Fatal(err)
			}
			defer ln6.Close()
			c, s := labPair(t, lab, ln6, dst6)
			helloBothWays(t, "IPv6 flow", c, s)
			testnet.Eventually(t, 10*time.Second, func() error {
				st, err := d.Client().Status(context.Background())
				if err != nil {
					return err
				}
				if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "IPv6 forwarding is off") || !strings.Contains(st.Warnings[0], "net.ipv6.conf.all.forwarding=1") {
					return fmt.Errorf("status warnings %q, want the IPv6 refusal", st.Warnings)
				}
				return nil
			})
			helloBothWays(t, "IPv6 flow, refused", c, s)
			if n := countMsg(d, "flow spliced"); n != 4 {
				t.Errorf("%d flows spliced, want the 4 IPv4 ones", n)
			}
		})
	}
}

// TestLabForwardingTurnedOffWhileSpliced: forwarding turned off after
// flows were spliced drops their packets (the check that refuses a
// splice runs before it), and the stall line said nothing of why. It
// now names the cause and the fix; with forwarding back on, the flows
// complete intact.
func TestLabForwardingTurnedOffWhileSpliced(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, `
log:
  level: debug
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: immediate
      stall_after: 2s
`)
	failures := busyFlows(t, lab, d, "splice", 2, 4*time.Second, func() {
		lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=0")
		defer lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
		if err := d.WaitLog(20*time.Second, func(l map[string]any) bool { return l["msg"] == stallMsg }); err != nil {
			t.Errorf("no stall reported with forwarding off: %v\n%s", err, tail(d.Log(), 10))
			return
		}
		rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == stallMsg })
		if cause := fmt.Sprint(rec["likely_cause"]); !strings.Contains(cause, "IPv4 forwarding is off on ") || !strings.Contains(cause, "sysctl -w net.ipv4.ip_forward=1") {
			t.Errorf("the stall line does not name the cause: %v", rec)
		}
	})
	if len(failures) > 0 {
		t.Fatalf("flows after forwarding came back on:\n%s\n%s", strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
}
