package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Stat summarizes the repetitions of one measure.
type Stat struct {
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
}

// NewStat summarizes samples.
func NewStat(samples []float64) Stat {
	s := slices.Clone(samples)
	slices.Sort(s)
	st := Stat{Samples: samples}
	if len(s) == 0 {
		return st
	}
	st.Min, st.Max = s[0], s[len(s)-1]
	if len(s)%2 == 1 {
		st.Median = s[len(s)/2]
	} else {
		st.Median = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return st
}

// Metric describes one column of the comparison.
type Metric struct {
	Key, Title, Unit string
	// Lower is better (CPU cost); otherwise higher is better.
	Lower bool
}

// Metrics are the measures taken for every configuration, in table order.
var Metrics = []Metric{
	{Key: "rr_1b_1c", Title: "1-byte RR, 1 conn", Unit: "tx/s"},
	{Key: "rr_1b_8c", Title: "1-byte RR, 8 conns", Unit: "tx/s"},
	{Key: "rr_1460b_1c", Title: "1460-byte RR, 1 conn", Unit: "tx/s"},
	{Key: "rr_1460b_8c", Title: "1460-byte RR, 8 conns", Unit: "tx/s"},
	{Key: "bulk_c2s", Title: "bulk client→server", Unit: "Gbit/s"},
	{Key: "bulk_s2c", Title: "bulk server→client", Unit: "Gbit/s"},
	{Key: "cpu_us_per_tx", Title: "gateway CPU per transaction", Unit: "µs", Lower: true},
	{Key: "cpu_s_per_gb", Title: "gateway CPU per GB", Unit: "s", Lower: true},
}

// ConfigResult is what one configuration measured.
type ConfigResult struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	Failed      string          `json:"failed,omitempty"` // why the whole configuration failed
	Metrics     map[string]Stat `json:"metrics"`
	// Errors says why single measures are missing.
	Errors map[string]string `json:"errors,omitempty"`
}

// Latency is the splice latency of idle flows and what busy flows saw.
type Latency struct {
	IdleSamples int `json:"idle_samples"`
	// Splice time as the gateway measured it (divert to release), µs.
	IdleP50, IdleP99 float64
	BusySamples      int `json:"busy_samples"`
	BusyP50, BusyP99 float64
	// Stall: the longest gap between two reads at a receiver of a busy
	// flow, over its whole transfer, ms.
	StallP50, StallP99 float64
	// StallAcross: the longest gap that overlaps the flow's splice (from
	// its start to the gateway's "flow spliced"), ms.
	StallAcrossSamples             int `json:"stall_across_samples"`
	StallAcrossP50, StallAcrossP99 float64
	// The same busy flows in a service with splice.socket_buffer 256KiB.
	BusyFixedSamples                         int `json:"busy_fixed_samples"`
	BusyFixedP50, BusyFixedP99               float64
	StallFixedP50, StallFixedP99             float64
	StallFixedAcrossSamples                  int `json:"stall_fixed_across_samples"`
	StallFixedAcrossP50, StallFixedAcrossP99 float64
	// The same busy flows never spliced (splice.mode never): the gaps the
	// saturated machine makes without a splice, ms.
	NeverSamples                 int `json:"never_samples"`
	StallNeverP50, StallNeverP99 float64
	// Phases: where the splice time went, per phase of the gateway's
	// transition (the "phases_us" of its log lines), idle and busy flows.
	Phases []PhaseLatency `json:"phases,omitempty"`
	// The idle flows unspliced (splicectl unsplice), one at a time: the
	// unsplice time the gateway measured, µs, and its phases.
	UnspliceSamples          int `json:"unsplice_samples"`
	UnspliceP50, UnspliceP99 float64
	UnsplicePhases           []PhaseLatency `json:"unsplice_phases,omitempty"`
	Error                    string         `json:"error,omitempty"`
}

// PhaseLatency is one phase of the splices of idle or busy flows, µs.
type PhaseLatency struct {
	Flows    string  `json:"flows"` // idle or busy
	Phase    string  `json:"phase"`
	P50, P99 float64 `json:",omitempty"`
}

// phaseOrder lists the phases in the order they first appear.
func phaseOrder(ps []PhaseLatency) []string {
	var names []string
	for _, p := range ps {
		if !slices.Contains(names, p.Phase) {
			names = append(names, p.Phase)
		}
	}
	return names
}

// Memory compares established flows proxied and spliced.
type Memory struct {
	Flows   int       `json:"flows"`
	Note    string    `json:"note,omitempty"`
	Proxied MemSample `json:"proxied"`
	Spliced MemSample `json:"spliced"`
	// SplicedBPF: spliced and promoted to the kernel datapath.
	SplicedBPF *MemSample `json:"spliced_bpf,omitempty"`
	Error      string     `json:"error,omitempty"`
	Ratio      float64    `json:"ratio"` // spliced total / proxied total
	PerFlowB   float64    `json:"spliced_bytes_per_flow"`
	// The same for the bpf datapath.
	RatioBPF    float64 `json:"ratio_bpf,omitempty"`
	PerFlowBPFB float64 `json:"spliced_bpf_bytes_per_flow,omitempty"`
}

// MemSample is the gateway's memory with the flows established.
type MemSample struct {
	DaemonRSS int64 `json:"daemon_rss_bytes"`
	BaseRSS   int64 `json:"daemon_rss_before_bytes"`
	// Live memory of the daemon (Go heap and stacks in use after a GC),
	// with the flows and before them.
	DaemonLive int64 `json:"daemon_live_bytes"`
	BaseLive   int64 `json:"daemon_live_before_bytes"`
	SocketMem  int64 `json:"kernel_socket_mem_bytes"`
	Sockets    int   `json:"tcp_sockets"`
	// MapBytes: the growth of the kernel's account of the daemon's BPF
	// maps (their memlock) with the flows: the program's flow maps on the
	// bpf datapath, the record of spliced flows for restarts on nfqueue.
	// BaseMaps: the same account before the flows.
	MapBytes int64 `json:"bpf_map_bytes,omitempty"`
	BaseMaps int64 `json:"bpf_map_before_bytes,omitempty"`
}

// Total is the memory the flows cost the gateway: the daemon's live
// memory growth plus kernel socket memory plus the growth of its BPF maps.
func (m MemSample) Total() int64 { return max(m.DaemonLive-m.BaseLive, 0) + m.SocketMem + m.MapBytes }

// Trace is the sequence-number trace of a flow across its splice.
type Trace struct {
	Points          [][2]float64 `json:"-"` // ms since start, relative sequence (bytes)
	Segments        int          `json:"segments"`
	Dropped         int          `json:"dropped"` // packets the capture lost
	SpliceStartMS   float64      `json:"splice_start_ms"`
	SpliceEndMS     float64      `json:"splice_end_ms"`
	UnspliceStartMS float64      `json:"unsplice_start_ms"`
	UnspliceEndMS   float64      `json:"unsplice_end_ms"`
	// The longest time between two captured segments, and when it
	// ended: a stall of the flow (a retransmission timeout is 200 ms
	// or more).
	LargestGapMS   float64 `json:"largest_gap_ms"`
	LargestGapAtMS float64 `json:"largest_gap_at_ms"`
	// What the ends' TCP counted during the transfer (client, server):
	// retransmission timeouts, and segments they dropped as beyond
	// their receive window (payload a splice took over and sent on
	// past the receiver's window does that).
	Timeouts     [2]uint64 `json:"timeouts"`
	BeyondWindow [2]uint64 `json:"beyond_window"`
	Picture      string    `json:"picture,omitempty"`
	Error        string    `json:"error,omitempty"`
}

// summary says what the trace shows in a line: its transitions, its
// largest gap, and the ends' timeouts and beyond-window drops.
func (t *Trace) summary() string {
	return fmt.Sprintf("%d segments (%d dropped by the capture); splice %.1f–%.1f ms, unsplice %.1f–%.1f ms; largest gap %.1f ms (ending at %.1f ms); retransmission timeouts: client %d, server %d; segments dropped beyond the receive window: client %d, server %d",
		t.Segments, t.Dropped, t.SpliceStartMS, t.SpliceEndMS, t.UnspliceStartMS, t.UnspliceEndMS, t.LargestGapMS, t.LargestGapAtMS,
		t.Timeouts[0], t.Timeouts[1], t.BeyondWindow[0], t.BeyondWindow[1])
}

// Report is a whole run.
type Report struct {
	Commit      string         `json:"commit"`
	Kernel      string         `json:"kernel"`
	CPUs        int            `json:"cpus"`
	Date        string         `json:"date"`
	Quick       bool           `json:"quick"`
	Repetitions int            `json:"repetitions"`
	Seconds     float64        `json:"seconds_per_measure"`
	Configs     []ConfigResult `json:"configs"`
	// SOCKS are the SOCKS5 servers, measured with SOCKSMetrics.
	SOCKS   []ConfigResult `json:"socks5,omitempty"`
	Latency *Latency       `json:"splice_latency,omitempty"`
	Memory  *Memory        `json:"memory,omitempty"`
	Trace   *Trace         `json:"trace,omitempty"`
	HTTP    *HTTP          `json:"http,omitempty"`
	// HTTPPeers are the HTTP proxies side by side, measured per cell of
	// httpCells with httpMeasures.
	HTTPPeers []ConfigResult `json:"http_peers,omitempty"`
	Pictures  []string       `json:"pictures,omitempty"`
}

// Config returns the result of a configuration by name.
func (r *Report) Config(name string) *ConfigResult {
	for i := range r.Configs {
		if r.Configs[i].Name == name {
			return &r.Configs[i]
		}
	}
	return nil
}

// The configurations ratios are taken against.
const (
	BaselineCopy    = "spliced-copy"
	BaselineRouting = "routing"
	// The kernel datapath's goals are set against routing with a filter
	// and conntrack, what a router with a firewall does anyway.
	BaselineRoutingNFT = "routing-nft"
)

// Markdown renders the report: one table in the shape of the paper's
// Table 2 (configurations as rows), then the same as ratios against copy
// mode and against kernel routing, then latency and memory.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s on Linux %s, %d CPUs, commit %s; %d repetitions of %.0f s each, median (min–max).\n\n",
		r.Date, r.Kernel, r.CPUs, r.Commit, r.Repetitions, r.Seconds)
	if len(r.Configs) > 0 {
		b.WriteString("### Measured\n\n")
		configTable(&b, r.Configs, Metrics, measured)
		for _, base := range []string{BaselineCopy, BaselineRouting, BaselineRoutingNFT} {
			bc := r.Config(base)
			if bc == nil {
				continue // a partial run (-only) without this baseline
			}
			fmt.Fprintf(&b, "### Ratio to %s (median / median; above 1 is better)\n\n", base)
			configTable(&b, r.Configs, Metrics, func(c *ConfigResult, m Metric) string {
				return ratio(c, bc, m)
			})
		}
	}
	if len(r.SOCKS) > 0 {
		b.WriteString("### SOCKS5 (CONNECT from the client to an echo server or sink; the server on the gateway's address; no authentication)\n\n")
		configTable(&b, r.SOCKS, SOCKSMetrics, measured)
		var base *ConfigResult
		for i := range r.SOCKS {
			if r.SOCKS[i].Name == BaselineSOCKS {
				base = &r.SOCKS[i]
			}
		}
		fmt.Fprintf(&b, "Ratio to %s (median / median; above 1 is better):\n\n", BaselineSOCKS)
		configTable(&b, r.SOCKS, SOCKSMetrics, func(c *ConfigResult, m Metric) string {
			return ratio(c, base, m)
		})
	}
	if l := r.Latency; l != nil {
		b.WriteString("### Splice latency\n\n")
		if l.Error != "" {
			fmt.Fprintf(&b, "failed: %s\n\n", l.Error)
		} else {
			fmt.Fprintf(&b, "| | flows | p50 | p99 |\n|---|---|---|---|\n")
			fmt.Fprintf(&b, "| idle flow, splice time | %d | %.0f µs | %.0f µs |\n", l.IdleSamples, l.IdleP50, l.IdleP99)
			if l.UnspliceSamples > 0 {
				fmt.Fprintf(&b, "| idle flow, unsplice time (splicectl unsplice, one at a time) | %d | %.0f µs | %.0f µs |\n", l.UnspliceSamples, l.UnspliceP50, l.UnspliceP99)
			}
			fmt.Fprintf(&b, "| busy flow, splice time | %d | %.0f µs | %.0f µs |\n", l.BusySamples, l.BusyP50, l.BusyP99)
			fmt.Fprintf(&b, "| busy flow, longest stall at the receiver | %d | %.1f ms | %.1f ms |\n", l.BusySamples, l.StallP50, l.StallP99)
			if l.StallAcrossSamples > 0 {
				fmt.Fprintf(&b, "| busy flow, longest stall across its splice | %d | %.1f ms | %.1f ms |\n", l.StallAcrossSamples, l.StallAcrossP50, l.StallAcrossP99)
			}
			if l.BusyFixedSamples > 0 {
				fmt.Fprintf(&b, "| busy flow, socket_buffer 256KiB, splice time | %d | %.0f µs | %.0f µs |\n", l.BusyFixedSamples, l.BusyFixedP50, l.BusyFixedP99)
				fmt.Fprintf(&b, "| busy flow, socket_buffer 256KiB, longest stall | %d | %.1f ms | %.1f ms |\n", l.BusyFixedSamples, l.StallFixedP50, l.StallFixedP99)
			}
			if l.StallFixedAcrossSamples > 0 {
				fmt.Fprintf(&b, "| busy flow, socket_buffer 256KiB, longest stall across its splice | %d | %.1f ms | %.1f ms |\n", l.StallFixedAcrossSamples, l.StallFixedAcrossP50, l.StallFixedAcrossP99)
			}
			if l.NeverSamples > 0 {
				fmt.Fprintf(&b, "| busy flow never spliced (`mode: never`), longest stall | %d | %.1f ms | %.1f ms |\n", l.NeverSamples, l.StallNeverP50, l.StallNeverP99)
			}
			b.WriteString("\n")
			if len(l.Phases) > 0 {
				fmt.Fprintf(&b, "| splice phase | idle p50 | idle p99 | busy p50 | busy p99 |\n|---|---|---|---|---|\n")
				for _, name := range phaseOrder(l.Phases) {
					var cells []string
					for _, kind := range []string{"idle", "busy"} {
						p, p99 := "-", "-"
						for _, ph := range l.Phases {
							if ph.Flows == kind && ph.Phase == name {
								p, p99 = fmt.Sprintf("%.0f µs", ph.P50), fmt.Sprintf("%.0f µs", ph.P99)
							}
						}
						cells = append(cells, p, p99)
					}
					fmt.Fprintf(&b, "| %s | %s |\n", name, strings.Join(cells, " | "))
				}
				b.WriteString("\n")
			}
			if len(l.UnsplicePhases) > 0 {
				fmt.Fprintf(&b, "| unsplice phase (idle flows) | p50 | p99 |\n|---|---|---|\n")
				for _, ph := range l.UnsplicePhases {
					fmt.Fprintf(&b, "| %s | %.0f µs | %.0f µs |\n", ph.Phase, ph.P50, ph.P99)
				}
				b.WriteString("\n")
			}
		}
	}
	if m := r.Memory; m != nil {
		b.WriteString("### Memory of established flows\n\n")
		if m.Error != "" {
			fmt.Fprintf(&b, "failed: %s\n\n", m.Error)
		} else {
			fmt.Fprintf(&b, "| %d flows | daemon live memory growth | daemon RSS growth | kernel socket memory | BPF map growth | gateway TCP sockets | total (live + kernel) |\n|---|---|---|---|---|---|---|\n", m.Flows)
			rows := []struct {
				name string
				s    MemSample
			}{{"proxied", m.Proxied}, {"spliced", m.Spliced}}
			if m.SplicedBPF != nil {
				rows = append(rows, struct {
					name string
					s    MemSample
				}{"spliced, bpf datapath", *m.SplicedBPF})
			}
			for _, row := range rows {
				fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %d | %s |\n", row.name, bytesStr(max(row.s.DaemonLive-row.s.BaseLive, 0)),
					bytesStr(max(row.s.DaemonRSS-row.s.BaseRSS, 0)), bytesStr(row.s.SocketMem), bytesStr(row.s.MapBytes), row.s.Sockets, bytesStr(row.s.Total()))
			}
			fmt.Fprintf(&b, "\nSpliced flows cost %.1f%% of proxied ones (%.0f bytes per flow)", 100*m.Ratio, m.PerFlowB)
			if m.SplicedBPF != nil {
				fmt.Fprintf(&b, "; on the bpf datapath %.1f%% (%.0f bytes per flow)", 100*m.RatioBPF, m.PerFlowBPFB)
			}
			b.WriteString(".")
			if m.SplicedBPF != nil {
				fmt.Fprintf(&b, " BPF map growth is the kernel's account of the daemon's maps (their memlock), which held %s before the flows on nfqueue (the record of spliced flows for restarts) and %s on bpf.", bytesStr(m.Spliced.BaseMaps), bytesStr(m.SplicedBPF.BaseMaps))
			}
			b.WriteString("\n\n")
			if m.Note != "" {
				fmt.Fprintf(&b, "Note: %s.\n\n", m.Note)
			}
		}
	}
	if h := r.HTTP; h != nil {
		b.WriteString("### HTTP proxy (nginx backend, wrk, 8 connections)\n\n")
		b.WriteString("Spliced per response: every response from splice_min (64 KiB) on is spliced (`splice_policy: always`) and the flow unspliced for the next request; on the bpf datapath the spliced response is rewritten by the BPF program once promoted. Routed, no proxy: wrk asks nginx itself through the gateway, which only routes (the ceiling for any proxy in this lab: wrk, nginx and the gateway share the CPUs). Ratios are to relayed.\n\n")
		if h.Error != "" {
			fmt.Fprintf(&b, "failed: %s\n\n", h.Error)
		} else {
			rate := func(k string) string {
				st, ok := h.Rates[k]
				if !ok {
					return "n/a"
				}
				return fmt.Sprintf("%s (%s–%s)", num(st.Median), num(st.Min), num(st.Max))
			}
			fmt.Fprintf(&b, "| responses | routed, no proxy (req/s) | ratio | relayed (req/s) | spliced per response (req/s) | ratio | spliced per response, bpf datapath (req/s) | ratio |\n|---|---|---|---|---|---|---|---|\n")
			ratio := func(mode, key string) string {
				if c, s := h.Rates["copy_"+key].Median, h.Rates[mode+"_"+key].Median; c > 0 && s > 0 {
					return fmt.Sprintf("%.2f", s/c)
				}
				return "n/a"
			}
			for _, row := range []struct{ name, key string }{{"16 MiB (spliced)", "large"}, {"1 MiB (spliced)", "big"}, {"4 KiB (below splice_min)", "small"}} {
				fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", row.name, rate("routed_"+row.key), ratio("routed", row.key), rate("copy_"+row.key),
					rate("splice_"+row.key), ratio("splice", row.key), rate("splicebpf_"+row.key), ratio("splicebpf", row.key))
			}
			fmt.Fprintf(&b, "\n| unsplice | samples | p50 | p99 |\n|---|---|---|---|\n")
			fmt.Fprintf(&b, "| idle (next request after the whole response) | %d | %.0f µs | %.0f µs |\n", h.IdleSamples, h.IdleP50, h.IdleP99)
			fmt.Fprintf(&b, "| busy (next request while the response flows) | %d | %.0f µs | %.0f µs |\n\n", h.BusySamples, h.BusyP50, h.BusyP99)
			if len(h.IdlePhases) > 0 {
				// From the client's next request: the drain phase
				// includes the wait for a transition worker.
				fmt.Fprintf(&b, "| idle unsplice phase | p50 | p99 |\n|---|---|---|\n")
				for _, ph := range h.IdlePhases {
					fmt.Fprintf(&b, "| %s | %.0f µs | %.0f µs |\n", ph.Phase, ph.P50, ph.P99)
				}
				b.WriteString("\n")
			}
		}
	}
	if len(r.HTTPPeers) > 0 {
		httpPeersTables(&b, r.HTTPPeers)
	}
	if t := r.Trace; t != nil && t.Error != "" {
		fmt.Fprintf(&b, "### Sequence trace\n\nfailed: %s\n\n", t.Error)
	} else if t != nil {
		fmt.Fprintf(&b, "### Sequence trace\n\n%s\n\n", t.summary())
	}
	return b.String()
}

// configTable writes a table with a row per configuration and a column
// per metric.
func configTable(b *strings.Builder, configs []ConfigResult, metrics []Metric, cell func(c *ConfigResult, m Metric) string) {
	cols := []string{"configuration"}
	for _, m := range metrics {
		cols = append(cols, fmt.Sprintf("%s (%s)", m.Title, m.Unit))
	}
	fmt.Fprintf(b, "| %s |\n|%s\n", strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	for i := range configs {
		c := &configs[i]
		row := []string{c.Name}
		for _, m := range metrics {
			row = append(row, cell(c, m))
		}
		fmt.Fprintf(b, "| %s |\n", strings.Join(row, " | "))
	}
	b.WriteString("\n")
}

// measured is a cell of the measured table: median (min–max), or why
// the measure is missing.
func measured(c *ConfigResult, m Metric) string {
	if c.Failed != "" {
		return "failed: " + c.Failed
	}
	st, ok := c.Metrics[m.Key]
	if !ok {
		if e := c.Errors[m.Key]; e != "" {
			return "failed: " + e
		}
		return "n/a"
	}
	return fmt.Sprintf("%s (%s–%s)", num(st.Median), num(st.Min), num(st.Max))
}

func ratio(c, base *ConfigResult, m Metric) string {
	if c.Failed != "" {
		return "failed"
	}
	if base == nil || base.Failed != "" {
		return "no baseline"
	}
	st, ok1 := c.Metrics[m.Key]
	bs, ok2 := base.Metrics[m.Key]
	if !ok1 || !ok2 || bs.Median == 0 || st.Median == 0 {
		return "n/a"
	}
	r := st.Median / bs.Median
	if m.Lower {
		r = bs.Median / st.Median
	}
	return fmt.Sprintf("%.2f", r)
}

func num(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 1000:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func bytesStr(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// Write stores the report in dir: latest.json, latest.md and the
// pictures.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	pics, err := r.plot(dir)
	if err != nil {
		return fmt.Errorf("pictures: %w", err)
	}
	r.Pictures = pics
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "latest.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	md := "# spliced benchmark\n\n" + r.Markdown()
	for _, p := range pics {
		md += fmt.Sprintf("![%s](%s)\n\n", strings.TrimSuffix(p, ".png"), p)
	}
	return os.WriteFile(filepath.Join(dir, "latest.md"), []byte(md), 0o644)
}

// httpPeersTables writes the HTTP proxies side by side: a table per
// measure, with a row per cell measured and a column per proxy, and the
// ratio of spliced relaying to the better peer.
func httpPeersTables(b *strings.Builder, rows []ConfigResult) {
	b.WriteString("### HTTP proxy next to nginx and HAProxy\n\n")
	b.WriteString("The same nginx backend, wrk -t2 --latency from the client; nginx and HAProxy on the gateway's address, " +
		"spliced's HTTP proxy transparent (through its TPROXY listener); gateway CPU per request: user and system time " +
		"of the proxy's processes over the run, divided by the requests wrk completed. " +
		"16 MiB on 64 connections runs four times as long (a GiB in flight). " +
		"Median (min–max); ratio: spliced relayed / the better of nginx and HAProxy in that cell (above 1 is better).\n\n")
	var relayed *ConfigResult
	var peers []*ConfigResult
	for i := range rows {
		switch {
		case rows[i].Name == httpRelayed:
			relayed = &rows[i]
		case slices.Contains(httpPeerNames, rows[i].Name):
			peers = append(peers, &rows[i])
		}
	}
	for _, measure := range httpMeasures {
		fmt.Fprintf(b, "%s (%s):\n\n", strings.ToUpper(measure.Title[:1])+measure.Title[1:], measure.Unit)
		cols := []string{"responses, connections"}
		for _, c := range rows {
			cols = append(cols, c.Name)
		}
		cols = append(cols, "relayed / better peer")
		fmt.Fprintf(b, "| %s |\n|%s\n", strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
		for _, m := range httpCellMetrics(measure) {
			if !measuredBy(rows, m) {
				continue
			}
			cells := []string{m.Title}
			for i := range rows {
				cells = append(cells, measured(&rows[i], m))
			}
			cells = append(cells, ratioToBetter(relayed, peers, m))
			fmt.Fprintf(b, "| %s |\n", strings.Join(cells, " | "))
		}
		b.WriteString("\n")
	}
}

// measuredBy tells whether any row measured m or failed to.
func measuredBy(rows []ConfigResult, m Metric) bool {
	for _, c := range rows {
		if _, ok := c.Metrics[m.Key]; ok || c.Errors[m.Key] != "" {
			return true
		}
	}
	return false
}

// ratioToBetter is c's ratio to the best of peers in m (the highest, or
// the lowest where lower is better), naming it.
func ratioToBetter(c *ConfigResult, peers []*ConfigResult, m Metric) string {
	var best *ConfigResult
	for _, p := range peers {
		st, ok := p.Metrics[m.Key]
		if p.Failed != "" || !ok || st.Median == 0 {
			continue
		}
		if best == nil || (st.Median > best.Metrics[m.Key].Median) != m.Lower {
			best = p
		}
	}
	if c == nil || best == nil {
		return "n/a"
	}
	r := ratio(c, best, m)
	if r == "n/a" || r == "failed" {
		return r
	}
	return fmt.Sprintf("%s (%s)", r, best.Name)
}
