package bench

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fixedReport() *Report {
	cfg := func(name string, rr float64, failed string) ConfigResult {
		c := ConfigResult{Name: name, Failed: failed, Metrics: map[string]Stat{}}
		if failed == "" {
			for _, m := range Metrics {
				c.Metrics[m.Key] = NewStat([]float64{rr * 0.9, rr, rr * 1.2})
			}
			delete(c.Metrics, "bulk_s2c")
			c.Errors = map[string]string{"bulk_s2c": "iperf3 exited 1"}
		}
		return c
	}
	return &Report{
		Commit: "abc123", Kernel: "6.18", CPUs: 2, Date: "2026-11-26", Repetitions: 3, Seconds: 1,
		Configs: []ConfigResult{cfg("routing", 20000, ""), cfg("haproxy", 0, "haproxy is not installed"), cfg("spliced-copy", 10000, ""), cfg("spliced-splice", 15000, "")},
		Latency: &Latency{IdleSamples: 10, IdleP50: 80, IdleP99: 120, BusySamples: 10, BusyP50: 1500, BusyP99: 7000, StallP50: 2, StallP99: 8,
			BusyFixedSamples: 10, BusyFixedP50: 700, BusyFixedP99: 3000, StallFixedP50: 1, StallFixedP99: 4,
			Phases: append(phasesFor(phaseLines, "flow spliced", splicePhases, "idle", "10.2.0.2:7101"),
				phasesFor(phaseLines, "flow spliced", splicePhases, "busy", "10.2.0.2:7102")...),
			UnspliceSamples: 2, UnspliceP50: 90, UnspliceP99: 300,
			UnsplicePhases: phasesFor(phaseLines, "flow unspliced", unsplicePhases, "idle", "10.2.0.2:7101")},
		Memory: &Memory{Flows: 100, Proxied: MemSample{DaemonRSS: 30 << 20, BaseRSS: 10 << 20, DaemonLive: 22 << 20, BaseLive: 2 << 20, SocketMem: 4 << 20, Sockets: 200},
			Spliced:    MemSample{DaemonRSS: 11 << 20, BaseRSS: 10 << 20, DaemonLive: 3 << 20, BaseLive: 2 << 20},
			SplicedBPF: &MemSample{DaemonRSS: 11 << 20, BaseRSS: 10 << 20, DaemonLive: 3 << 20, BaseLive: 2 << 20, MapBytes: 1 << 20},
			Ratio:      0.04, PerFlowB: 300, RatioBPF: 0.08, PerFlowBPFB: 600},
		SOCKS: []ConfigResult{socksCfg("dante", 1000), socksCfg("spliced-socks5-copy", 2000), {Name: "spliced-socks5-splice", Failed: "daemon not ready"}},
		HTTP: &HTTP{Rates: map[string]Stat{
			"routed_large": NewStat([]float64{175}), "copy_large": NewStat([]float64{60, 70, 80}), "splice_large": NewStat([]float64{70}), "splicebpf_large": NewStat([]float64{140}),
			"copy_small": NewStat([]float64{20000}), "splice_small": NewStat([]float64{19000}),
		}},
		Trace: &Trace{Points: [][2]float64{{0, 0}, {1, 1 << 20}, {2, 3 << 20}}, Segments: 3, SpliceStartMS: 0.9, SpliceEndMS: 1.1,
			UnspliceStartMS: 1.5, UnspliceEndMS: 1.6, LargestGapMS: 1, LargestGapAtMS: 2, Timeouts: [2]uint64{0, 1}, BeyondWindow: [2]uint64{7, 0}},
	}
}

func socksCfg(name string, setup float64) ConfigResult {
	c := ConfigResult{Name: name, Metrics: map[string]Stat{}}
	for _, m := range SOCKSMetrics {
		c.Metrics[m.Key] = NewStat([]float64{setup, setup * 2})
	}
	return c
}

// TestReportGenerator checks the report on fixed input: medians, ratios
// against both baselines, a failed configuration shown with its reason, a
// missing measure shown as failed, and all three outputs written.
// phaseLines are daemon log lines of splices of idle (port 7101) and
// busy (7102) flows.
var phaseLines = []map[string]any{
	{"msg": "flow spliced", "server": "10.2.0.2:7101", "phases_us": map[string]any{"divert": 40.0, "drain": 10.0, "capture": 30.0}},
	{"msg": "flow spliced", "server": "10.2.0.2:7101", "phases_us": map[string]any{"divert": 60.0, "drain": 20.0, "capture": 50.0}},
	{"msg": "flow spliced", "server": "10.2.0.2:7102", "phases_us": map[string]any{"divert": 45.0, "drain": 9000.0}},
	{"msg": "flow opened", "server": "10.2.0.2:7101"},
	{"msg": "flow unspliced", "server": "10.2.0.2:7101", "phases_us": map[string]any{"drain": 5.0, "rebuild": 70.0, "release": 12.0}},
	{"msg": "flow unspliced", "server": "10.2.0.2:7101", "phases_us": map[string]any{"drain": 7.0, "rebuild": 90.0, "release": 14.0}},
}

func TestReportGenerator(t *testing.T) {
	r := fixedReport()
	md := r.Markdown()
	for _, want := range []string{
		"| routing | 20000 (18000–24000) |",
		"| haproxy | failed: haproxy is not installed |",
		"failed: iperf3 exited 1",
		"### Ratio to spliced-copy",
		"| spliced-splice | 1.50 | 1.50 | 1.50 | 1.50 | 1.50 | n/a | 0.67 | 0.67 |", // CPU: lower is better
		"### Ratio to routing",
		"| spliced-copy | 0.50 |",
		"| idle flow, splice time | 10 | 80 µs | 120 µs |",
		"| busy flow, socket_buffer 256KiB, longest stall | 10 | 1.0 ms | 4.0 ms |",
		"| splice phase | idle p50 | idle p99 | busy p50 | busy p99 |",
		"| 16 MiB (spliced) | 175.0 (175.0–175.0) | 2.50 | 70.0 (60.0–80.0) | 70.0 (70.0–70.0) | 1.00 | 140.0 (140.0–140.0) | 2.00 |",
		"| 1 MiB (spliced) | n/a | n/a | n/a | n/a | n/a | n/a | n/a |",
		"| 4 KiB (below splice_min) | n/a | n/a | 20000 (20000–20000) | 19000 (19000–19000) | 0.95 | n/a | n/a |",
		"| divert | 60 µs | 60 µs | 45 µs | 45 µs |", // the percentile of two samples rounds up
		"| drain | 20 µs | 20 µs | 9000 µs | 9000 µs |",
		"| capture | 50 µs | 50 µs | - | - |",
		"| idle flow, unsplice time (splicectl unsplice, one at a time) | 2 | 90 µs | 300 µs |",
		"| unsplice phase (idle flows) | p50 | p99 |",
		"| rebuild | 90 µs | 90 µs |",
		"| release | 14 µs | 14 µs |",
		"| proxied | 20.0 MiB | 20.0 MiB | 4.0 MiB | 0 B | 200 | 24.0 MiB |",
		"| spliced, bpf datapath | 1.0 MiB | 1.0 MiB | 0 B | 1.0 MiB | 0 | 2.0 MiB |",
		"on the bpf datapath 8.0% (600 bytes per flow)",
		"Spliced flows cost 4.0% of proxied ones",
		"### SOCKS5 (",
		"| configuration | setup + 1-byte exchange, 8 loops (conn/s) | 1-byte RR, 1 conn (tx/s) | 1-byte RR, 8 conns (tx/s) | bulk client→server (Gbit/s) | gateway CPU per connection (µs) | gateway CPU per GB (s) |",
		"| dante | 1500 (1000–2000) |",
		"| spliced-socks5-splice | failed: daemon not ready |",
		"Ratio to dante",
		"| spliced-socks5-copy | 2.00 | 2.00 | 2.00 | 2.00 | 0.50 | 0.50 |", // CPU: lower is better
		"| spliced-socks5-splice | failed | failed |",
		"### Sequence trace\n\n3 segments (0 dropped by the capture); splice 0.9–1.1 ms, unsplice 1.5–1.6 ms; largest gap 1.0 ms (ending at 2.0 ms); retransmission timeouts: client 0, server 1; segments dropped beyond the receive window: client 7, server 0",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	dir := t.TempDir()
	if err := r.Write(dir); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"latest.json", "latest.md", "rr.png", "bulk.png", "cpu.png", "trace.png"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Size() == 0 {
			t.Errorf("%s not written: %v", f, err)
		}
	}
	var back Report
	js, _ := os.ReadFile(filepath.Join(dir, "latest.json"))
	if err := json.Unmarshal(js, &back); err != nil || back.Config("haproxy").Failed == "" || back.Commit != "abc123" ||
		len(back.SOCKS) != 3 || back.SOCKS[1].Metrics["setup_8c"].Median != 3000 {
		t.Fatalf("json round trip: %v %+v", err, back)
	}
}

// A run of the SOCKS5 part alone has no tables of the gateways.
func TestReportSOCKSOnly(t *testing.T) {
	r := &Report{SOCKS: []ConfigResult{socksCfg("spliced-socks5-copy", 2000)}}
	md := r.Markdown()
	if strings.Contains(md, "### Measured") || !strings.Contains(md, "| spliced-socks5-copy | no baseline |") {
		t.Errorf("markdown of the SOCKS5 part alone:\n%s", md)
	}
}

func TestNewStat(t *testing.T) {
	if s := NewStat([]float64{3, 1, 2}); s.Median != 2 || s.Min != 1 || s.Max != 3 {
		t.Errorf("%+v", s)
	}
	if s := NewStat([]float64{4, 1, 2, 3}); s.Median != 2.5 {
		t.Errorf("even median %+v", s)
	}
}
