package gateway

import (
	"math"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"spliced/config"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
)

// scrape fetches /metrics as Prometheus does and parses it strictly: the
// answer is 200 in the text format, every family has a HELP and a TYPE,
// no series appears twice, and every histogram is one: cumulative
// buckets, none above the count, a +Inf bucket equal to the count.
func scrape(t *testing.T, g *Gateway) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	g.metricsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: status %d: %s", rec.Code, rec.Body)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("scrape: content type %q", ct)
	}
	text := rec.Body.String()
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("scrape: %v\n%s", err, text)
	}
	for name, mf := range mfs {
		if mf.GetHelp() == "" || !strings.Contains(text, "# TYPE "+name+" ") {
			t.Errorf("%s: no HELP or TYPE", name)
		}
		seen := map[string]bool{}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			key := strings.Join(ls, ",")
			if seen[key] {
				t.Errorf("%s{%s} appears twice", name, key)
			}
			seen[key] = true
			if h := m.GetHistogram(); h != nil {
				checkHistogram(t, name+"{"+key+"}", h)
			}
		}
	}
	return mfs
}

func checkHistogram(t *testing.T, name string, h *dto.Histogram) {
	t.Helper()
	var prev uint64
	for _, b := range h.GetBucket() {
		n := b.GetCumulativeCount()
		if n < prev {
			t.Errorf("%s: bucket le=%v has %d, less than the bucket below it (%d): buckets must be cumulative", name, b.GetUpperBound(), n, prev)
		}
		if n > h.GetSampleCount() {
			t.Errorf("%s: bucket le=%v has %d, more than the count %d", name, b.GetUpperBound(), n, h.GetSampleCount())
		}
		if math.IsInf(b.GetUpperBound(), 1) {
			if n != h.GetSampleCount() {
				t.Errorf("%s: the +Inf bucket has %d, the count is %d", name, n, h.GetSampleCount())
			}
		}
		prev = n
	}
}

// series returns the value of the series of family name whose labels
// include those given (name=value pairs), and whether there is one.
func series(mfs map[string]*dto.MetricFamily, name string, labels ...string) (*dto.Metric, bool) {
	mf := mfs[name]
	if mf == nil {
		return nil, false
	}
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		return m, true
	}
	return nil, false
}

// TestMetricsBackendListedTwice: a pool that lists a backend twice (to
// give it twice the share of round robin) made its proxy report two
// series with one name and the same labels; the registry refused the
// second, and every scrape failed with status 500, losing every metric
// of the daemon. The two are now one series, their sum.
func TestMetricsBackendListedTwice(t *testing.T) {
	cfg, err := config.Parse("t.yaml", []byte(`
services:
  - name: web
    proxy: http
    listen: 18080
    ports: ["80"]
    http:
      routes:
        - path: /
          backends: [10.0.0.5:80, 10.0.0.5:80, 10.0.0.6:80]
        - path: /
          backends: [10.0.0.7:80]
  - name: fw
    listen_mode: direct
    listen_on: ["10.1.0.1:8081"]
    forward:
      backends: [10.0.0.5:80, 10.0.0.5:80]
`))
	if err != nil {
		t.Fatal(err)
	}
	g := quietGateway(t)
	for i := range cfg.Services {
		svc := &cfg.Services[i]
		p, err := proxy.New(proxy.Setup{Service: svc, Flows: g.flows})
		if err != nil {
			t.Fatal(err)
		}
		g.services[svc.Name] = &service{cfg: svc, proxy: p}
	}
	mfs := scrape(t, g)
	for _, s := range []struct{ name, service, backend string }{
		{"spliced_http_backend_failures_total", "web", "10.0.0.5:80"},
		{"spliced_http_backend_failures_total", "web", "10.0.0.7:80"},
		{"spliced_forward_backend_flows_total", "fw", "10.0.0.5:80"},
	} {
		if _, ok := series(mfs, s.name, "service", s.service, "backend", s.backend); !ok {
			t.Errorf("no %s{service=%q,backend=%q}", s.name, s.service, s.backend)
		}
	}
}

// TestLatencyHistogramCounts: the splice duration histogram counts every
// splice since the start, as a Prometheus histogram must (its buckets,
// count and sum are counters). It was made from the last 4096 samples:
// its count stopped at 4096, and when fast splices followed slow ones
// its slow buckets and its sum fell, which rate() reads as resets.
func TestLatencyHistogramCounts(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	g.queues = &nfq.Set{}
	g.spliceOn.Store(true)
	for range 4096 {
		g.spliceLatency.observe(2 * time.Second)
	}
	before, ok := series(scrape(t, g), "spliced_splice_duration_seconds")
	if !ok {
		t.Fatal("no spliced_splice_duration_seconds")
	}
	for range 100 {
		g.spliceLatency.observe(30 * time.Microsecond)
	}
	g.phases[stepCapture].observe(time.Millisecond)
	mfs := scrape(t, g)
	after, _ := series(mfs, "spliced_splice_duration_seconds")
	h := after.GetHistogram()
	if h.GetSampleCount() != 4196 {
		t.Errorf("count %d after 4196 splices", h.GetSampleCount())
	}
	if h.GetSampleSum() < before.GetHistogram().GetSampleSum() {
		t.Errorf("sum fell from %v to %v", before.GetHistogram().GetSampleSum(), h.GetSampleSum())
	}
	was := map[float64]uint64{}
	for _, b := range before.GetHistogram().GetBucket() {
		was[b.GetUpperBound()] = b.GetCumulativeCount()
	}
	for _, b := range h.GetBucket() {
		if was := was[b.GetUpperBound()]; b.GetCumulativeCount() < was {
			t.Errorf("bucket le=%v fell from %d to %d", b.GetUpperBound(), was, b.GetCumulativeCount())
		}
		switch want := uint64(100); {
		case b.GetUpperBound() >= 5e-5 && b.GetUpperBound() < 2 && b.GetCumulativeCount() != want:
			t.Errorf("bucket le=%v has %d, want %d (the fast splices)", b.GetUpperBound(), b.GetCumulativeCount(), want)
		case b.GetUpperBound() >= 2 && b.GetCumulativeCount() != 4196:
			t.Errorf("bucket le=%v has %d, want 4196", b.GetUpperBound(), b.GetCumulativeCount())
		}
	}
	if p, ok := series(mfs, "spliced_transition_phase_seconds", "phase", "capture"); !ok || p.GetHistogram().GetSampleCount() != 1 {
		t.Errorf("capture phase: %v", p)
	}
	// The status's percentiles stay those of recent splices.
	if p50 := g.spliceLatency.percentile(0.5); p50 != 2*time.Second {
		t.Errorf("p50 %v", p50)
	}
}
