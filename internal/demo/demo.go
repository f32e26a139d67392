// Package demo runs spliced's demonstration: a namespace lab with a client,
// the gateway running the real daemon, and a server; a real transfer goes
// through the gateway and the demo prints what happened. Nothing outside
// the lab's namespaces is touched, and everything is removed at the end.
//
// It needs root and one command besides its own binaries: ip (iproute2),
// which creates the namespaces and runs the daemon in one. The table is
// read through netlink, not with nft.
package demo

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/rules"
	"spliced/testnet"
)

// Options of a demo run.
type Options struct {
	Spliced string // path of the spliced binary
	Bytes   int64  // bytes each way
	Out     io.Writer
}

// The demo service splices each flow once 64 MiB went through the proxy.
const demoConfig = `
log:
  level: info
services:
  - name: demo
    listen: 15001
    ports: ["5001"]
    destinations: [10.2.0.0/16]
    upstream: transparent
    splice:
      mode: bytes
      bytes: 64MiB
`

// Run builds the lab, runs the transfer and prints the summary.
func Run(opt Options) error {
	out := opt.Out
	lab, err := testnet.New(testnet.Options{})
	if err != nil {
		return err
	}
	defer func() {
		lab.Close()
		fmt.Fprintln(out, "lab removed")
	}()
	fmt.Fprintf(out, "lab %s: client %v -- gateway -- server %v\n", lab.ID, lab.Client().IPv4, lab.Server().IPv4)

	dir, err := os.MkdirTemp("", "spliced-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	d, err := testnet.LaunchDaemon(lab, opt.Spliced, dir, demoConfig)
	if d != nil {
		defer d.Stop()
	}
	if err != nil {
		return err
	}
	table, err := kernelTable(lab)
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "spliced is running in the gateway namespace; its table (the kernel has it; shown as `spliced -check` renders it):")
	fmt.Fprint(out, indent(table))

	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Fprintf(out, "\nclient -> %v: sending %d MB each way at once; spliced after 64 MiB ...\n", srv, opt.Bytes>>20)
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: opt.Bytes, S2C: opt.Bytes, Seed: uint64(time.Now().UnixNano())})
	if err := tr.Check(); err != nil {
		return fmt.Errorf("transfer failed: %w", err)
	}
	spliced := waitRecord(d, "flow spliced", 5*time.Second)
	fmt.Fprintln(out, "waiting for the engine to see both FINs and retire the flow ...")
	closed := waitRecord(d, "flow closed", 15*time.Second)
	if spliced == nil || closed == nil {
		return fmt.Errorf("the daemon did not log the splice and the end of the flow; log:\n%s", d.Log())
	}
	gbps := float64(8*(tr.Client.Sent+tr.Server.Sent)) / tr.Elapsed.Seconds() / 1e9
	fmt.Fprintf(out, "\nsummary\n")
	fmt.Fprintf(out, "  flow %v  %v -> %v  upstream transparent (the server saw the client's own address %v)\n",
		closed["flow"], closed["client"], closed["server"], tr.Server.Peer)
	fmt.Fprintf(out, "  before the splice, through the proxy: client->server %s, server->client %s\n",
		mb(spliced["bytes_c2s"]), mb(spliced["bytes_s2c"]))
	fmt.Fprintf(out, "  splice took %v us (%s taken over while the sockets drained, %v packets re-sent through the engine)\n",
		spliced["took_us"], mb(spliced["taken_over_bytes"]), spliced["injected_packets"])
	fmt.Fprintf(out, "  after the splice, rewritten packet by packet (no gateway socket): client->server %s, server->client %s\n",
		mb(closed["spliced_bytes_c2s"]), mb(closed["spliced_bytes_s2c"]))
	fmt.Fprintf(out, "  sha256 equal both ways: %x... / %x...\n", tr.Client.SentHash[:6], tr.Server.SentHash[:6])
	fmt.Fprintf(out, "  %.1f Gbit/s (both directions together) in %v\n", gbps, tr.Elapsed.Round(time.Millisecond))
	return nil
}

// kernelTable checks through netlink that the daemon installed its table
// and policy routing in the gateway namespace, and returns the table as
// `nft list table` shows it, rendered by package rules from the demo's
// configuration (what `spliced -check` prints). The nft command is not
// needed.
func kernelTable(lab *testnet.Lab) (string, error) {
	cfg, err := config.Parse("demo", []byte(demoConfig))
	if err != nil {
		return "", err
	}
	spec := rules.FromConfig(cfg)
	fd, err := lab.Gateway.Open()
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	table, ipRules, routes, err := rules.NewManager(spec, rules.WithNetNS(fd)).State()
	if err != nil {
		return "", fmt.Errorf("read the gateway's kernel state: %w", err)
	}
	if !table || ipRules == 0 || routes == 0 {
		return "", fmt.Errorf("the daemon is ready but the kernel lacks its state: table inet %s present %v, %d ip rules, %d routes", spec.Table, table, ipRules, routes)
	}
	return rules.Render(spec), nil
}

func mb(v any) string {
	f, _ := v.(float64)
	return fmt.Sprintf("%.1f MB", f/(1<<20))
}

func waitRecord(d *testnet.Daemon, msg string, within time.Duration) map[string]any {
	var rec map[string]any
	testnet.Poll(within, func() error {
		if rec = d.FindLog(func(l map[string]any) bool { return l["msg"] == msg }); rec == nil {
			return fmt.Errorf("no %q", msg)
		}
		return nil
	})
	return rec
}

func indent(s string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		b.WriteString("    " + line)
	}
	return b.String()
}
