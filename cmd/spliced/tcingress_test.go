package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// TestLabIngressShaping: the server's side of the gateway shapes what
// arrives (an ingress qdisc whose filter redirects everything to an ifb
// device with a rate limit, as OpenWrt's SQM does on the WAN), added
// while the daemon runs on the bpf datapath with its redirect. A spliced
// flow's download, rewritten by the program, still goes through the ifb
// device: every byte of it. Before, the program's redirect skipped the
// ingress filters (tcx runs before them): the ifb device saw 402 bytes
// of 32 MiB. Once the qdisc is removed the program redirects there again.
func TestLabIngressShaping(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "  datapath: bpf\n"))
	for _, cmd := range [][]string{
		{"ip", "link", "add", "ifb0", "type", "ifb"},
		{"ip", "link", "set", "ifb0", "up"},
		{"tc", "qdisc", "add", "dev", "ifb0", "root", "tbf", "rate", "400mbit", "burst", "256k", "latency", "100ms"},
		{"tc", "qdisc", "add", "dev", "s0", "handle", "ffff:", "ingress"},
		{"tc", "filter", "add", "dev", "s0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
			"action", "mirred", "egress", "redirect", "dev", "ifb0"},
	} {
		if out, err := lab.Gateway.Run(cmd[0], cmd[1:]...); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	stackIfaces := func(want string) {
		t.Helper()
		testnet.Eventually(t, 15*time.Second, func() error {
			var last any
			for _, l := range d.Lines() {
				if _, ok := l["stack_interfaces"]; ok {
					last = l["stack_interfaces"]
				}
			}
			if last != want {
				return fmt.Errorf("interfaces whose packets go through the stack: %v, want %q", last, want)
			}
			return nil
		})
	}
	stackIfaces("s0")

	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	download := func(what string, size int) (ifbBytes int64) {
		t.Helper()
		c, s := labPair(t, lab, ln, dst)
		defer c.Close()
		defer s.Close()
		helloBothWays(t, what, c, s)
		testnet.Eventually(t, 10*time.Second, func() error {
			fl, err := d.Client().Flows(context.Background(), api.FlowFilter{})
			if err != nil {
				return err
			}
			for _, f := range fl {
				if f.ClientLeg.Remote == c.LocalAddr().String() && f.Datapath == "bpf" {
					return nil
				}
			}
			return fmt.Errorf("%s: the flow is not on the bpf datapath yet", what)
		})
		before := ifbTxBytes(t, lab)
		go func() {
			s.Write(make([]byte, size))
			s.CloseWrite()
		}()
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := io.Copy(io.Discard, c)
		if err != nil || n != int64(size) {
			t.Fatalf("%s: received %d of %d bytes: %v", what, n, size, err)
		}
		return ifbTxBytes(t, lab) - before
	}
	const size = 32 << 20
	forwarded := bpfForwarded(t, d)
	if got := download("shaped", size); got < size {
		t.Errorf("the ifb device sent %d bytes of a %d-byte spliced download: the ingress filter was skipped", got, size)
	}
	if bpfForwarded(t, d)-forwarded < 100 {
		t.Errorf("the program rewrote %d packets of the download: not on the bpf datapath", bpfForwarded(t, d)-forwarded)
	}

	// Without the qdisc the program redirects there again.
	if out, err := lab.Gateway.Run("tc", "qdisc", "del", "dev", "s0", "handle", "ffff:", "ingress"); err != nil {
		t.Fatalf("tc qdisc del: %v %s", err, out)
	}
	stackIfaces("")
	if got := download("unshaped", 1<<20); got > 64<<10 {
		t.Errorf("the ifb device sent %d bytes after the ingress qdisc went", got)
	}
}

// ifbTxBytes reads the bytes the gateway's ifb0 sent.
func ifbTxBytes(t *testing.T, lab *testnet.Lab) int64 {
	t.Helper()
	out, err := lab.Gateway.Run("cat", "/sys/class/net/ifb0/statistics/tx_bytes")
	if err != nil {
		t.Fatalf("ifb0 statistics: %v %s", err, out)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
