package httpproxy

import "spliced/proxy"

// Metrics reports the requests of every route and backend, the failed
// connects to backends, and their upstream connections: dialed, reused,
// idle, and requests sent again (proxy.MetricsSource).
func (p *Proxy) Metrics() []proxy.Metric {
	var out []proxy.Metric
	labels := []string{"route", "backend"}
	howLabels := []string{"route", "backend", "how"}
	for _, b := range p.Stats() {
		out = append(out, proxy.Metric{Name: "spliced_http_requests_total", Help: "HTTP requests by service and route (backend \"\") and by backend.",
			Counter: true, Labels: labels, Values: []string{b.Route, b.Backend}, Value: float64(b.Requests)})
		if b.Backend == "" {
			continue
		}
		values := []string{b.Route, b.Backend}
		out = append(out,
			proxy.Metric{Name: "spliced_http_backend_failures_total", Help: "Connects to an HTTP backend that failed.",
				Counter: true, Labels: labels, Values: values, Value: float64(b.Failures)},
			proxy.Metric{Name: "spliced_http_upstream_connections_total", Help: "Connections to an HTTP backend that client connections got: dialed, or reused from the idle ones.",
				Counter: true, Labels: howLabels, Values: []string{b.Route, b.Backend, "dialed"}, Value: float64(b.Dialed)},
			proxy.Metric{Name: "spliced_http_upstream_connections_total", Help: "Connections to an HTTP backend that client connections got: dialed, or reused from the idle ones.",
				Counter: true, Labels: howLabels, Values: []string{b.Route, b.Backend, "reused"}, Value: float64(b.Reused)},
			proxy.Metric{Name: "spliced_http_upstream_retries_total", Help: "Requests sent again on a new connection because the backend had closed the used one under them.",
				Counter: true, Labels: labels, Values: values, Value: float64(b.Retries)},
			proxy.Metric{Name: "spliced_http_upstream_early_responses_total", Help: "Responses refusing a request that an HTTP backend sent before it took the whole body (relayed; both connections then close).",
				Counter: true, Labels: labels, Values: values, Value: float64(b.EarlyResponses)},
			proxy.Metric{Name: "spliced_http_upstream_idle_connections", Help: "Idle connections to an HTTP backend kept for later requests.",
				Labels: labels, Values: values, Value: float64(b.Idle)},
		)
	}
	return append(out, p.spliceMetrics()...)
}
