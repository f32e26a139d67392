package gateway

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"spliced/proxy"
	"spliced/splice"
)

// serveMetrics serves Prometheus metrics on listen (off when empty).
func (g *Gateway) serveMetrics(listen string) (func(), error) {
	if listen == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("metrics.listen %s: %w", listen, err)
	}
	return serveHTTP(ln, g.metricsHandler(), 30*time.Second), nil
}

// metricsHandler serves the Prometheus metrics at /metrics.
func (g *Gateway) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{g: g}, &proxyCollector{g: g})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// collector reads the gateway's counters at scrape time: nothing on the
// packet path updates a Prometheus object.
type collector struct{ g *Gateway }

var (
	descFlows = prometheus.NewDesc("spliced_flows", "Flows by state.", []string{"state"}, nil)
	descBytes = prometheus.NewDesc("spliced_bytes_total", "Payload bytes moved, by engine (proxy, splice) and direction (c2s, s2c).",
		[]string{"engine", "direction"}, nil)
	descPackets        = prometheus.NewDesc("spliced_packets_total", "Packets the splice engine handled, by verdict.", []string{"verdict"}, nil)
	descBPFPackets     = prometheus.NewDesc("spliced_bpf_packets_total", "Packets the bpf datapath handled, by verdict (pass: left to the queue; redirected: forwarded packets it sent to their egress device itself, counted in forward too).", []string{"verdict"}, nil)
	descBPFMoves       = prometheus.NewDesc("spliced_bpf_flow_moves_total", "Spliced flows moved to the bpf datapath (promoted), failed to, and back (demoted).", []string{"move"}, nil)
	descSplices        = prometheus.NewDesc("spliced_splices_total", "Flows spliced.", nil, nil)
	descAborts         = prometheus.NewDesc("spliced_splice_aborts_total", "Splices abandoned (the flow stayed proxied).", nil, nil)
	descUnsplices      = prometheus.NewDesc("spliced_unsplices_total", "Spliced flows given back to their proxy.", nil, nil)
	descUnspliceAborts = prometheus.NewDesc("spliced_unsplice_aborts_total", "Unsplices abandoned (the flow stayed spliced).", nil, nil)
	descLatency        = prometheus.NewDesc("spliced_splice_duration_seconds", "Time from diverting a flow to releasing it through the engine.", nil, nil)
	descQueue          = prometheus.NewDesc("spliced_queue_packets_total", "Packets of each NFQUEUE queue by what happened to them.", []string{"queue", "decision"}, nil)
	descDrops          = prometheus.NewDesc("spliced_queue_kernel_drops_total", "Packets the kernel dropped before they reached spliced: queue full, or socket buffer full (user).",
		[]string{"queue", "reason"}, nil)
	descRewriteErrors = prometheus.NewDesc("spliced_rewrite_errors_total", "Packets the engine could not rewrite: malformed, unsupported, no flow, queue errors.", nil, nil)
	descStalled       = prometheus.NewDesc("spliced_stalled_flows_total", "Directions of spliced flows whose data stayed unacknowledged for splice.stall_after while the flow was alive.", nil, nil)
	descHeldDropped   = prometheus.NewDesc("spliced_unsplice_held_dropped_total", "Packets of new client data dropped during unsplices beyond what one unsplice holds (TCP sends them again).", nil, nil)
	descRepairs       = prometheus.NewDesc("spliced_ruleset_repairs_total", "Times the table was restored after someone changed it.", nil, nil)
	descReopens       = prometheus.NewDesc("spliced_queue_reopens_total", "Times a queue's reader failed to receive and reopened its socket.", []string{"queue"}, nil)
	descRefreshes     = prometheus.NewDesc("spliced_divert_refreshes_total", "Rounds that restarted the timeout of live flows' divert entries, by result (ok, failed).", []string{"result"}, nil)
	descTakenOver     = prometheus.NewDesc("spliced_taken_over_sent_total", "Packets of payload taken over during splices, sent on by the gateway: gso (a packet longer than a segment, whole) or segment (through the raw socket, one MSS each).", []string{"how"}, nil)
	descPMTU          = prometheus.NewDesc("spliced_pmtu_errors_total", "ICMP path MTU errors about spliced flows, by result: translated (sent on to the sender of the segment they quote, in its terms), no_flow (the flow was not spliced or had ended: sent on as they came), bad_checksum (dropped), unparsed (a form the engine does not translate: sent on as they came).", []string{"result"}, nil)
	descWarnings      = prometheus.NewDesc("spliced_warnings", "Problems for the operator to fix, as splicectl status lists them: a firewall chain that drops spliced flows' packets, a source NAT rule that transparent connections miss, br_netfilter on a bridge, accept_local turned off, routing by connection marks, splices refused by strict reverse path filtering or by forwarding turned off, a drift of spliced's table or routing left in place.", nil, nil)
	descRefused       = prometheus.NewDesc("spliced_flows_refused_total", "Connections refused at a flow cap: max_flows (limits.max_flows, every service's flows) or max_flows_per_client (limits.max_flows_per_client; SOCKS5 handshakes count).", []string{"limit"}, nil)
	descDivertAdds    = prometheus.NewDesc("spliced_divert_adds_total", "Splices by how their divert entries went in: command (packets, microseconds) or netlink (a transaction: commands off, or one not taken).", []string{"path"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFlows, descBytes, descPackets, descSplices, descAborts, descUnsplices, descUnspliceAborts, descLatency, descQueue, descDrops, descRewriteErrors, descRepairs, descStalled, descHeldDropped, descRefreshes, descReopens, descBPFPackets, descBPFMoves, descPhase, descDivertAdds, descTakenOver, descPMTU, descWarnings, descRefused} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	g := c.g
	st := g.Status()
	for state, n := range st.Flows {
		ch <- prometheus.MustNewConstMetric(descFlows, prometheus.GaugeValue, float64(n), state)
	}
	for _, e := range st.Engines {
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(e.BytesC2S), e.Name, "c2s")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(e.BytesS2C), e.Name, "s2c")
	}
	ch <- prometheus.MustNewConstMetric(descRepairs, prometheus.CounterValue, float64(st.Repairs))
	table, client := g.flows.Refused()
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(table), "max_flows")
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(client), "max_flows_per_client")
	ch <- prometheus.MustNewConstMetric(descWarnings, prometheus.GaugeValue, float64(len(st.Warnings)))
	// Two counters, not failed subtracted from a total: read while a
	// round counted, the difference went up by one and back down.
	failed := g.divertRefreshErrors.Load()
	ch <- prometheus.MustNewConstMetric(descRefreshes, prometheus.CounterValue, float64(g.divertRefreshOK.Load()), "ok")
	ch <- prometheus.MustNewConstMetric(descRefreshes, prometheus.CounterValue, float64(failed), "failed")
	ch <- prometheus.MustNewConstMetric(descDivertAdds, prometheus.CounterValue, float64(g.divertCommands.Load()), "command")
	ch <- prometheus.MustNewConstMetric(descDivertAdds, prometheus.CounterValue, float64(g.divertNetlink.Load()), "netlink")
	ch <- prometheus.MustNewConstMetric(descTakenOver, prometheus.CounterValue, float64(g.injectedGSO.Load()), "gso")
	ch <- prometheus.MustNewConstMetric(descTakenOver, prometheus.CounterValue, float64(g.injectedSegments.Load()), "segment")
	if !g.splicing() {
		return
	}
	for r, name := range pmtuResultNames {
		ch <- prometheus.MustNewConstMetric(descPMTU, prometheus.CounterValue, float64(g.counters.pmtu[r].Load()), name)
	}
	var rewriteErrors uint64
	for v := range splice.NumVerdicts {
		n := g.counters.verdicts[v].Load()
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(n), splice.Verdict(v).String())
		switch splice.Verdict(v) {
		case splice.DropMalformed, splice.DropUnsupported, splice.DropNoFlow:
			rewriteErrors += n
		}
	}
	if k := g.kpath; k != nil {
		for name, n := range g.bpfCounters() {
			ch <- prometheus.MustNewConstMetric(descBPFPackets, prometheus.CounterValue, float64(n), name)
		}
		ch <- prometheus.MustNewConstMetric(descBPFMoves, prometheus.CounterValue, float64(k.promotions.Load()), "promoted")
		ch <- prometheus.MustNewConstMetric(descBPFMoves, prometheus.CounterValue, float64(k.promoteFailures.Load()), "promote_failed")
		ch <- prometheus.MustNewConstMetric(descBPFMoves, prometheus.CounterValue, float64(k.promoteSkipped.Load()), "promote_skipped")
		ch <- prometheus.MustNewConstMetric(descBPFMoves, prometheus.CounterValue, float64(k.demotions.Load()), "demoted")
	}
	ch <- prometheus.MustNewConstMetric(descSplices, prometheus.CounterValue, float64(g.spliceLatency.count.Load()))
	ch <- prometheus.MustNewConstMetric(descAborts, prometheus.CounterValue, float64(g.spliceAborts.Load()))
	ch <- prometheus.MustNewConstMetric(descUnsplices, prometheus.CounterValue, float64(g.unsplices.Load()))
	ch <- prometheus.MustNewConstMetric(descUnspliceAborts, prometheus.CounterValue, float64(g.unspliceAborts.Load()))
	ch <- prometheus.MustNewConstMetric(descStalled, prometheus.CounterValue, float64(g.stalledFlows.Load()))
	ch <- prometheus.MustNewConstMetric(descHeldDropped, prometheus.CounterValue, float64(g.counters.heldDropped.Load()))
	ch <- g.spliceLatency.histogram()
	g.phaseHistograms(ch)
	for _, e := range st.Engines {
		for _, q := range e.Queues {
			n := strconv.Itoa(int(q.Number))
			for d, v := range map[string]uint64{"accepted": q.Accepted, "modified": q.Modified, "dropped": q.Dropped, "received": q.Received, "errors": q.Errors} {
				ch <- prometheus.MustNewConstMetric(descQueue, prometheus.CounterValue, float64(v), n, d)
			}
			ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(q.KernelQueueDropped), n, "queue")
			ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(q.KernelUserDropped), n, "user")
			ch <- prometheus.MustNewConstMetric(descReopens, prometheus.CounterValue, float64(q.Reopens), n)
			rewriteErrors += q.Errors
		}
	}
	ch <- prometheus.MustNewConstMetric(descRewriteErrors, prometheus.CounterValue, float64(rewriteErrors))
}

// histogram is the Prometheus histogram of the splice durations.
func (l *latencies) histogram() prometheus.Metric {
	return l.histogramOf(descLatency)
}

// histogramOf is the histogram of desc of every sample since the start.
func (l *latencies) histogramOf(desc *prometheus.Desc, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(latencyBounds))
	l.mu.Lock()
	var below uint64
	for i, b := range latencyBounds {
		below += l.buckets[i]
		buckets[b] = below
	}
	n, sum := l.total, l.sum
	l.mu.Unlock()
	return prometheus.MustNewConstHistogram(desc, n, sum, buckets, labels...)
}

// proxyCollector reports the metrics of each service's proxy
// (proxy.MetricsSource), labelled with the service. It is an unchecked
// collector: which metrics exist depends on the proxies registered.
type proxyCollector struct{ g *Gateway }

func (c *proxyCollector) Describe(chan<- *prometheus.Desc) {}

// Collect sums the metrics of a service that have one name and the same
// label values. A configuration may make two: a backend listed twice in a
// pool (to give it twice the share of round robin), or two routes with
// one host and path. Sent as they came, the registry refused the second
// ("collected before with the same name and label values") and the whole
// scrape failed with status 500: every metric of the daemon was lost.
func (c *proxyCollector) Collect(ch chan<- prometheus.Metric) {
	type series struct {
		desc   *prometheus.Desc
		typ    prometheus.ValueType
		value  float64
		labels []string
	}
	var order []string
	all := map[string]*series{}
	c.g.mu.Lock()
	descs := map[string]*prometheus.Desc{}
	for name, svc := range c.g.services {
		src, ok := svc.proxy.(proxy.MetricsSource)
		if !ok {
			continue
		}
		for _, m := range src.Metrics() {
			labels := append([]string{name}, m.Values...)
			key := m.Name + "\xff" + strings.Join(labels, "\xff")
			if s := all[key]; s != nil {
				s.value += m.Value
				continue
			}
			d := descs[m.Name]
			if d == nil {
				d = prometheus.NewDesc(m.Name, m.Help, append([]string{"service"}, m.Labels...), nil)
				descs[m.Name] = d
			}
			typ := prometheus.GaugeValue
			if m.Counter {
				typ = prometheus.CounterValue
			}
			all[key] = &series{desc: d, typ: typ, value: m.Value, labels: labels}
			order = append(order, key)
		}
	}
	c.g.mu.Unlock()
	for _, k := range order {
		s := all[k]
		ch <- prometheus.MustNewConstMetric(s.desc, s.typ, s.value, s.labels...)
	}
}
