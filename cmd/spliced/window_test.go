package main

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"

	"spliced/testnet"
)

// TestLabSplicedSmallReceiveWindow: a flow spliced from its start, its
// client sending fast to a server with a 64 KiB receive buffer. The
// server's windows are in units of 2 bytes, the client's view of them in
// units of 1 KiB (the gateway's socket negotiated a larger shift with
// it), and a server short of buffer space offers windows of a few hundred
// bytes. Rounded up to a unit, such a window let the client send up to
// 1 KiB the server then dropped as beyond its window
// (TcpExtBeyondWindow), to be sent again (in some runs after a
// retransmission timeout). On both datapaths the server drops nothing beyond its window,
// and the bytes arrive intact both ways.
func TestLabSplicedSmallReceiveWindow(t *testing.T) {
	for i, datapath := range []string{"nfqueue", "bpf"} {
		t.Run(datapath, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			port := 7400 + i
			d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: debug
kernel:
  datapath: %s
services:
  - name: small
    listen: 15001
    ports: ["%d"]
    splice:
      mode: immediate
`, datapath, port))
			srv := netip.AddrPortFrom(lab.Server().IPv4, uint16(port))
			ln, err := lab.Server().Listen(srv)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			// Accepted sockets inherit the listener's buffer size.
			rc, err := ln.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			rc.Control(func(fd uintptr) {
				err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 64<<10)
			})
			if err != nil {
				t.Fatal(err)
			}
			beyond := func() uint64 {
				c, err := lab.Server().Counters()
				if err != nil {
					t.Fatal(err)
				}
				return c["TcpExt.BeyondWindow"]
			}
			before := beyond()
			tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 64 << 20, S2C: 16 << 20, Seed: 7})
			if err := tr.Check(); err != nil {
				t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
			}
			if waitSpliced(t, d) == 0 {
				t.Fatal("not spliced")
			}
			rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" })
			if rec["datapath"] != datapath {
				t.Fatalf("spliced on datapath %v, want %s", rec["datapath"], datapath)
			}
			dropped := beyond() - before
			t.Logf("the server dropped %d segments beyond its window; client: %s", dropped,
				nstatCounters(lab.Client(), "TCPTimeouts", "TCPLossProbes", "RetransSegs"))
			if dropped != 0 {
				t.Errorf("the server dropped %d segments beyond its window: the client was offered more window than the server had", dropped)
			}
		})
	}
}
