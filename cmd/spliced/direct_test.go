package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabForwardDirect: the forwarder as a TCP load balancer in direct
// mode. Clients connect to the gateway's own addresses (port 8080, IPv4
// and IPv6), each flow goes to a backend of the pool (nginx on two
// servers; a dead backend listed first is skipped after its failed
// connect), copied and spliced, SHA-256 checked. In splice mode the
// client leg ends at the gateway's address and the server leg starts at
// it: the engine rewrites both addresses and ports each way, and a
// rate-limited transfer proves the splice mid-transfer.
func TestLabForwardDirect(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "nginx", "curl")
	for _, mode := range []string{"copy", "splice"} {
		t.Run(mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{Servers: 2})
			var sum string
			for k := range 2 {
				root := t.TempDir()
				os.Chmod(root, 0o755)
				os.MkdirAll(filepath.Join(root, "www"), 0o755)
				f, err := os.Create(filepath.Join(root, "www", "file.bin"))
				if err != nil {
					t.Fatal(err)
				}
				h := sha256.New()
				io.CopyN(io.MultiWriter(f, h), testnet.NewRandomStream(21), socksFileSize) // same file on both
				f.Close()
				sum = hex.EncodeToString(h.Sum(nil))
				stop, err := lab.Servers[k].StartNginx(root)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(stop)
			}
			gw := lab.GatewayClientSide[0]
			splice := "never"
			if mode == "splice" {
				splice = "immediate"
			}
			backends := func(v6 bool) string {
				dead := netip.AddrPortFrom(lab.Servers[0].Addr(v6), 9)
				return fmt.Sprintf(`["%s", "%s", "%s"]`, dead,
					netip.AddrPortFrom(lab.Servers[0].Addr(v6), testnet.NginxPort), netip.AddrPortFrom(lab.Servers[1].Addr(v6), testnet.NginxPort))
			}
			d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: debug
services:
  - name: tcp4
    listen_mode: direct
    listen_on: ["%s"]
    splice:
      mode: %s
    forward:
      backends: %s
  - name: tcp6
    listen_mode: direct
    listen_on: ["%s"]
    splice:
      mode: %s
    forward:
      backends: %s
`, netip.AddrPortFrom(gw.IPv4, 8080), splice, backends(false), netip.AddrPortFrom(gw.IPv6, 8080), splice, backends(true)))
			get := func(v6 bool, extra ...string) error {
				out := filepath.Join(t.TempDir(), "out")
				url := fmt.Sprintf("http://%s/file.bin", netip.AddrPortFrom(gw.Addr(v6), 8080))
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				msg, err := lab.Client().Command(ctx, "curl", append([]string{"-sS", "-o", out, url}, extra...)...).CombinedOutput()
				if err != nil {
					return fmt.Errorf("curl %s: %w: %s", url, err, msg)
				}
				data, _ := os.ReadFile(out)
				s := sha256.Sum256(data)
				if got := hex.EncodeToString(s[:]); got != sum {
					return fmt.Errorf("SHA-256 %s, want %s", got, sum)
				}
				return nil
			}
			for _, v6 := range []bool{false, true} {
				for i := range 3 {
					if err := get(v6); err != nil {
						t.Fatalf("v6=%v transfer %d: %v", v6, i, err)
					}
				}
			}
			// Both live backends served; the dead one failed once per
			// family and was skipped afterwards.
			for _, srv := range lab.Servers {
				for _, v6 := range []bool{false, true} {
					want := fmt.Sprintf(`"server":"%s"`, netip.AddrPortFrom(srv.Addr(v6), testnet.NginxPort))
					if !strings.Contains(d.Log(), want) {
						t.Errorf("no flow went to %s", want)
					}
				}
			}
			if n := strings.Count(d.Log(), `"msg":"backend failed, skipping it for a while"`); n != 2 {
				t.Errorf("%d backend failures logged, want 2 (one per family)", n)
			}
			if mode != "splice" {
				return
			}
			if strings.Contains(d.Log(), "flow stays proxied") {
				t.Error("a flow stayed proxied in splice mode")
			}
			spliced := func() int { return strings.Count(d.Log(), `"msg":"flow spliced"`) }
			// A splice logs its line once the flow's packets are
			// released: a transfer may end before it.
			testnet.Poll(10*time.Second, func() error {
				if n := spliced(); n < 6 {
					return fmt.Errorf("%d flows spliced", n)
				}
				return nil
			})
			if n := spliced(); n != 6 {
				t.Errorf("%d flows spliced, want 6", n)
			}
			before := spliced()
			done := make(chan error, 1)
			go func() { done <- get(false, "--limit-rate", "4M") }()
			testnet.Eventually(t, 10*time.Second, func() error {
				if spliced() <= before {
					return fmt.Errorf("no new flow spliced")
				}
				return nil
			})
			if err := provenSplicedLast(lab, d); err != nil {
				t.Error(err)
			}
			// The transfer's result is read once, whether it came early
			// (an error of the test) or not: a second read waited for
			// ever (a hung lab run under -race).
			var err error
			select {
			case err = <-done:
				t.Error("the transfer ended before the splice was checked")
			default:
				err = <-done
			}
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
