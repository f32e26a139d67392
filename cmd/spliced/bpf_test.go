package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"spliced/api"
	"spliced/testnet"
)

// tcxIngress counts the programs attached at tcx ingress of every
// interface of the gateway namespace, by interface.
func tcxIngress(t *testing.T, lab *testnet.Lab) map[string]int {
	t.Helper()
	out := map[string]int{}
	err := lab.Gateway.Do(func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, ifi := range ifs {
			r, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: ebpf.AttachTCXIngress})
			if err != nil {
				return fmt.Errorf("%s: %w", ifi.Name, err)
			}
			out[ifi.Name] = len(r.Programs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestLabBPFAttach: with kernel.datapath bpf the program is attached at
// tcx ingress of every interface but lo, a spliced flow runs on it, and
// once the daemon is killed (kill -9: no cleanup of its own) nothing is
// left attached: its links are pinned in the default bpffs, which the
// daemon mounted itself in the mount namespace `ip netns exec` gave it,
// and which goes with it (TestLabBPFRestartKeepsFlows pins in a bpffs
// that outlives the daemon). `spliced -check` prints what it would
// attach.
func TestLabBPFAttach(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	if n := tcxIngress(t, lab); sum(n) != 0 {
		t.Fatalf("programs attached before the daemon runs: %v", n)
	}
	// Unowned: the test deletes the table with nft.
	cfg := splicingForwardConfig("debug", "  datapath: bpf\n  own_table: off\n")
	d := testnet.StartDaemon(t, lab, cfg)
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "datapath" })
	if rec == nil || rec["datapath"] != "bpf" {
		t.Fatalf("datapath log: %v", rec)
	}
	t.Logf("datapath: %v on %v (%v)", rec["datapath"], rec["interfaces"], rec["reason"])
	attached := tcxIngress(t, lab)
	for name, n := range attached {
		want := 1
		if name == "lo" {
			want = 0
		}
		if n != want {
			t.Errorf("%s: %d programs at tcx ingress, want %d (%v)", name, n, want, attached)
		}
	}
	out, err := d.Run("-config", d.Config, "-check")
	if err != nil || !strings.Contains(out, "# datapath: bpf") || !strings.Contains(out, "BPF program at tcx ingress of: ") ||
		!strings.Contains(out, "straight to their egress device (kernel.bpf_forward: redirect)") ||
		!strings.Contains(out, "GSO packets on their egress device (kernel.resend: gso)") ||
		!strings.Contains(out, "meta mark & 0x20000000 == 0x20000000 notrack accept") {
		t.Errorf("spliced -check: %v\n%s", err, out)
	}

	// The skip rule survives a table repair and a reload.
	const skip = "meta mark & 0x20000000 == 0x20000000 notrack accept"
	hasSkip := func(when string) {
		t.Helper()
		out, err := lab.Gateway.Run("nft", "list", "chain", "inet", "spliced", "divert")
		if err != nil || !strings.Contains(out, skip) {
			t.Fatalf("%s: the divert chain lacks the skip rule: %v\n%s", when, err, out)
		}
	}
	hasSkip("at start")
	if out, err := lab.Gateway.Run("nft", "delete", "table", "inet", "spliced"); err != nil {
		t.Fatalf("nft delete table: %v: %s", err, out)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "ruleset restored" }); err != nil {
		t.Fatal(err)
	}
	hasSkip("after a repair")
	more := cfg + "  - name: more\n    listen: 15002\n    ports: [\"5002\"]\n"
	if err := os.WriteFile(d.Config, []byte(more), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Signal(syscall.SIGHUP)
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "configuration reloaded" }); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 10))
	}
	hasSkip("after a reload")

	// A flow spliced on the program: bytes both ways.
	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, s := labPair(t, lab, ln, dst)
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow spliced" && l["datapath"] == "bpf"
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
	}
	helloBothWays(t, "spliced", c, s)
	if n := bpfForwarded(t, d); n < 2 {
		t.Errorf("the program forwarded %d packets", n)
	}

	d.Kill()
	if err := testnet.Poll(5*time.Second, func() error {
		if n := tcxIngress(t, lab); sum(n) != 0 {
			return fmt.Errorf("programs still attached after kill -9: %v", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if out, err := d.Run("-cleanup"); err != nil {
		t.Errorf("spliced -cleanup: %v\n%s", err, out)
	}
}

// TestLabBPFRepromote: a packet the program does not handle (here one
// forged on the flow's tuple with 20 NOPs, more options than the program
// walks) sends the flow back to the Go engine, and the reaper promotes it
// again a second later: one such packet, which anyone who knows the tuple
// can send, no longer keeps a flow off the kernel path for good. The
// flow's bytes go through the program afterwards.
func TestLabBPFRepromote(t *testing.T) {
	t.Parallel()
	py := scapyPython(t)
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, bpfForwardConfig("debug"))
	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	c, s := connectThrough(t, lab, dst)
	id := waitSpliced(t, d)
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "flow promoted to the bpf datapath" }); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
	}
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	const script = `import sys
from scapy.all import IP, TCP, send, conf
conf.verb = 0
send(IP(src=sys.argv[1], dst=sys.argv[3])/TCP(sport=int(sys.argv[2]), dport=int(sys.argv[4]), flags="A",
     seq=12345, ack=67890, options=[("NOP", None)]*20), iface="eth0")
`
	if out, err := lab.Client().NS.Command(t.Context(), py, "-c", script, client.Addr().String(), fmt.Sprint(client.Port()),
		dst.Addr().String(), fmt.Sprint(dst.Port())).CombinedOutput(); err != nil {
		t.Fatalf("scapy: %v\n%s", err, out)
	}
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "promoting again a flow the bpf datapath passed back" }); err != nil {
		t.Fatalf("the flow was not promoted again: %v\n%s", err, tail(d.Log(), 20))
	}
	var e api.Engine
	if err := testnet.Poll(5*time.Second, func() error {
		e = spliceEngine(t, d)
		if e.BPFDemotions != 1 || e.BPFPromotions != 2 {
			return fmt.Errorf("bpf datapath: %d promotions, %d demotions; want 2 and 1", e.BPFPromotions, e.BPFDemotions)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	f, err := d.Client().Flow(t.Context(), id)
	if err != nil || f.Datapath != "bpf" {
		t.Fatalf("flow %d after its second promotion: %+v, %v; want it on bpf", id, f, err)
	}
	before := bpfForwarded(t, d)
	helloBothWays(t, "promoted again", c, s)
	if n := bpfForwarded(t, d) - before; n < 2 {
		t.Errorf("the program forwarded %d packets after the flow came back to it, want the data both ways", n)
	}
}

// helloBothWays sends 5 bytes each way between the ends of a connection
// and fails the test, saying when (what), unless they arrive within 5 s.
func helloBothWays(t *testing.T, what string, c, s *net.TCPConn) {
	t.Helper()
	for _, pair := range [][2]*net.TCPConn{{c, s}, {s, c}} {
		if _, err := pair[0].Write([]byte("hello")); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		pair[1].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(pair[1], make([]byte, 5)); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func bpfForwarded(t *testing.T, d *testnet.Daemon) uint64 {
	t.Helper()
	st, err := d.Client().Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Engines {
		if e.Datapath == "bpf" {
			return e.BPFVerdicts["forward"]
		}
	}
	t.Fatalf("no engine on the bpf datapath: %+v", st.Engines)
	return 0
}

// TestLabBPFAutoFallback: with kernel.datapath auto, a program that cannot
// attach (the interface does not exist) leaves the flows on NFQUEUE, the
// log says why, and flows splice as before; bpf refuses to start.
func TestLabBPFAutoFallback(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	cfg := `
log:
  level: debug
kernel:
  datapath: %s
  interfaces: [nosuch0]
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: bytes
      bytes: 1MiB
`
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(cfg, "auto"))
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "datapath" })
	if rec == nil || rec["datapath"] != "nfqueue" || !strings.HasPrefix(fmt.Sprint(rec["reason"]), "bpf: ") ||
		!strings.HasSuffix(fmt.Sprint(rec["reason"]), "; using nfqueue") {
		t.Fatalf("datapath log: %v", rec)
	}
	t.Logf("auto: %v", rec["reason"])
	if n := tcxIngress(t, lab); sum(n) != 0 {
		t.Errorf("programs attached: %v", n)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}

	file := filepath.Join(t.TempDir(), "bpf.yaml")
	if err := os.WriteFile(file, []byte(fmt.Sprintf(cfg, "bpf")), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := d.Run("-config", file, "-socket", "off")
	if err == nil || !strings.Contains(out, "kernel.datapath bpf") || !strings.Contains(out, "nosuch0") {
		t.Fatalf("spliced with datapath bpf and no interface to attach to: %v\n%s", err, out)
	}
	if n := tcxIngress(t, lab); sum(n) != 0 {
		t.Errorf("programs attached after a failed start: %v", n)
	}
	if tbl, _ := lab.Gateway.Run("nft", "list", "tables"); strings.Contains(tbl, "spliced") {
		t.Errorf("a failed start left the table: %s", tbl)
	}
}

// TestLabBPFHotPluggedInterface: with kernel.interfaces unset, an
// interface that appears after the start gets the program at its tcx
// ingress, and a flow that enters the gateway through it is rewritten
// by the program (bytes intact both ways, the program's counter grows
// and the queues' does not: unattached, the flow's packets from that
// interface would reach the queue); when the interface goes, its link is
// let go.
func TestLabBPFHotPluggedInterface(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, bpfForwardConfig("info"))
	run := func(ns *testnet.NS, args ...string) {
		t.Helper()
		if out, err := ns.Run(args[0], args[1:]...); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// A second link between the client and the gateway, made now, and
	// the client's route to the server through it.
	gw, cl := &lab.Gateway.NS, &lab.Client().NS
	run(gw, "ip", "link", "add", "hot0", "type", "veth", "peer", "name", "hotc", "netns", cl.Name)
	run(gw, "ip", "addr", "add", "10.9.0.1/24", "dev", "hot0")
	run(gw, "ip", "link", "set", "hot0", "up")
	run(cl, "ip", "addr", "add", "10.9.0.2/24", "dev", "hotc")
	run(cl, "ip", "link", "set", "hotc", "up")
	run(cl, "ip", "route", "add", lab.Server().IPv4.String()+"/32", "via", "10.9.0.1", "dev", "hotc", "src", "10.9.0.2")
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "datapath: interfaces changed" && strings.Contains(fmt.Sprint(l["attached"]), "hot0")
	}); err != nil {
		t.Fatalf("the new interface was not attached to: %v\n%s", err, tail(d.Log(), 10))
	}
	if n := tcxIngress(t, lab)["hot0"]; n != 1 {
		t.Fatalf("%d programs at tcx ingress of hot0, want 1", n)
	}

	c, s := connectThrough(t, lab, netip.AddrPortFrom(lab.Server().IPv4, 5001))
	if a := c.LocalAddr().(*net.TCPAddr).IP.String(); a != "10.9.0.2" {
		t.Fatalf("the client connected from %s, not through hot0", a)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow spliced" && l["datapath"] == "bpf"
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
	}
	before, err := bpfCounts(lab, d)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 4<<20)
	rand.Read(data)
	for _, pair := range [][2]*net.TCPConn{{c, s}, {s, c}} {
		errc := make(chan error, 1)
		go func() {
			_, err := pair[0].Write(data)
			errc <- err
		}()
		pair[1].SetReadDeadline(time.Now().Add(20 * time.Second))
		got := make([]byte, len(data))
		if _, err := io.ReadFull(pair[1], got); err != nil {
			t.Fatalf("read: %v\n%s", err, tail(d.Log(), 10))
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatal("the bytes read are not the bytes written")
		}
	}
	after, err := bpfCounts(lab, d)
	if err != nil {
		t.Fatal(err)
	}
	if after.forwarded <= before.forwarded || after.queued != before.queued {
		t.Errorf("program forwarded %d -> %d, queued %d -> %d: want the program's count up and the queues' unchanged",
			before.forwarded, after.forwarded, before.queued, after.queued)
	}

	run(gw, "ip", "link", "del", "hot0")
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "datapath: interfaces changed" && strings.Contains(fmt.Sprint(l["released"]), "hot0")
	}); err != nil {
		t.Fatalf("the link of the deleted interface was not let go of: %v\n%s", err, tail(d.Log(), 10))
	}
}

// bpfForwardConfig is splicingForwardConfig on the bpf datapath.
func bpfForwardConfig(logLevel string) string {
	return splicingForwardConfig(logLevel, "  datapath: bpf\n")
}

// splicingForwardConfig is a daemon with one forwarding service (port 5001,
// listener 15001) that splices at once; kernel is the lines of its
// kernel section (none when empty).
func splicingForwardConfig(logLevel, kernel string) string {
	if kernel != "" {
		kernel = "kernel:\n" + kernel
	}
	return `
log:
  level: ` + logLevel + `
` + kernel + `services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: immediate
`
}
