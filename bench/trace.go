package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"spliced/testnet"
)

const portTrace = 7300

const traceConfig = `
log:
  level: info
services:
  - name: trace
    listen: 15001
    ports: ["7300"]
    splice:
      mode: bytes
      bytes: 48MiB
`

// measureTrace records, at the server, the sequence numbers of a busy
// flow's client-to-server segments while the flow is spliced mid-transfer
// (the paper's figure 10).
func measureTrace(env *Env, opt *Options) *Trace {
	res := &Trace{}
	if _, err := exec.LookPath("tshark"); err != nil {
		res.Error = "tshark is not installed (apt-get install tshark)"
		return res
	}
	lab, err := testnet.New(testnet.Options{})
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer lab.Close()
	d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, traceConfig)
	if d != nil {
		defer d.Stop()
	}
	if err != nil {
		res.Error = err.Error()
		return res
	}
	pcap := filepath.Join(env.Dir, "trace.pcap")
	stop, err := lab.Server().Capture("eth0", pcap, fmt.Sprintf("tcp dst port %d", portTrace))
	if err != nil {
		res.Error = "tshark: " + err.Error()
		return res
	}
	srv := netip.AddrPortFrom(lab.Server().IPv4, portTrace)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		stop()
		res.Error = err.Error()
		return res
	}
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 128 << 20, S2C: 128 << 20, Seed: 3})
	ln.Close()
	time.Sleep(200 * time.Millisecond)
	stop()
	if err := tr.Check(); err != nil {
		res.Error = "transfer: " + err.Error()
		return res
	}
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" })
	if rec == nil {
		res.Error = "the flow was not spliced"
		return res
	}
	end, err := time.Parse(time.RFC3339Nano, rec["time"].(string))
	if err != nil {
		res.Error = err.Error()
		return res
	}
	start := end.Add(-time.Duration(rec["took_us"].(float64)) * time.Microsecond)
	out, err := exec.CommandContext(context.Background(), "tshark", "-r", pcap, "-T", "fields",
		"-e", "frame.time_epoch", "-e", "tcp.seq_raw", "-e", "tcp.len", "-Y", "tcp.len > 0").Output()
	if err != nil {
		res.Error = "read capture: " + err.Error()
		return res
	}
	var t0 float64
	var seq0 uint32
	for i, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		ts, _ := strconv.ParseFloat(f[0], 64)
		seq, _ := strconv.ParseUint(f[1], 10, 32)
		if i == 0 {
			t0, seq0 = ts, uint32(seq)
		}
		res.Points = append(res.Points, [2]float64{(ts - t0) * 1000, float64(uint32(seq) - seq0)})
	}
	if len(res.Points) == 0 {
		res.Error = "no packets captured"
		return res
	}
	epoch := func(t time.Time) float64 { return float64(t.UnixNano())/1e9 - t0 }
	res.SpliceStartMS, res.SpliceEndMS = epoch(start)*1000, epoch(end)*1000
	fmt.Fprintf(opt.Log, "   %d segments, splice %.1f–%.1f ms\n", len(res.Points), res.SpliceStartMS, res.SpliceEndMS)
	return res
}
