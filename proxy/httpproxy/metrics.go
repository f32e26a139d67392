package httpproxy

import "spliced/proxy"

// Metrics reports the requests of every route and backend and the failed
// connects to backends (proxy.MetricsSource).
func (p *Proxy) Metrics() []proxy.Metric {
	var out []proxy.Metric
	labels := []string{"route", "backend"}
	for _, b := range p.Stats() {
		out = append(out, proxy.Metric{Name: "spliced_http_requests_total", Help: "HTTP requests by service and route (backend \"\") and by backend.",
			Counter: true, Labels: labels, Values: []string{b.Route, b.Backend}, Value: float64(b.Requests)})
		if b.Backend != "" {
			out = append(out, proxy.Metric{Name: "spliced_http_backend_failures_total", Help: "Connects to an HTTP backend that failed.",
				Counter: true, Labels: labels, Values: []string{b.Route, b.Backend}, Value: float64(b.Failures)})
		}
	}
	return append(out, p.spliceMetrics()...)
}
