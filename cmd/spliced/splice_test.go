package main

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"spliced/testnet"
)

const spliceConfig = `
log:
  level: debug
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    upstream: %s
    splice:
      mode: bytes
      bytes: %d
`

func TestLabSpliceSmoke(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(spliceConfig, "transparent", 1<<20))
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 20 << 20, S2C: 20 << 20, Seed: 1, Timeout: 60 * time.Second})
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	t.Logf("elapsed %v", tr.Elapsed)
	if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" }) == nil {
		t.Fatalf("not spliced:\n%s", d.Log())
	}
	d.Stop()
	t.Log(d.Log())
}
