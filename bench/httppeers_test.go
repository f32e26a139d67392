package bench

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"spliced/config"
	_ "spliced/proxy/httpproxy" // registers the http section
)

// peerRow is a row of the peers table with every cell of the quick run:
// requests per second rps, latency and CPU per request cost.
func peerRow(name string, rps, cost float64) ConfigResult {
	c := ConfigResult{Name: name, Metrics: map[string]Stat{}}
	for _, cell := range httpCells {
		if cell.quick {
			c.Metrics["rps_"+cell.key] = NewStat([]float64{rps, rps * 1.1, rps * 0.9})
			c.Metrics["p99_ms_"+cell.key] = NewStat([]float64{cost / 10})
			c.Metrics["cpu_us_"+cell.key] = NewStat([]float64{cost})
		}
	}
	return c
}

func TestHTTPPeersTables(t *testing.T) {
	haproxy := peerRow("http-haproxy", 15000, 40)
	haproxy.Metrics["rps_1m_8c"] = NewStat([]float64{20000})
	haproxy.Metrics["cpu_us_1m_8c"] = NewStat([]float64{900})
	relayed := peerRow("spliced-http-copy", 4000, 120)
	delete(relayed.Metrics, "rps_4k_close")
	relayed.Errors = map[string]string{"rps_4k_close": "wrk saw errors"}
	r := &Report{HTTPPeers: []ConfigResult{
		peerRow("http-nginx", 16000, 50), haproxy, relayed,
		{Name: "spliced-http-splice", Failed: "spliced: not ready"},
	}}
	md := r.Markdown()
	for _, want := range []string{
		"### HTTP proxy next to nginx and HAProxy\n",
		"Requests per second (req/s):\n\n| responses, connections | http-nginx | http-haproxy | spliced-http-copy | spliced-http-splice | relayed / better peer |\n",
		"| 4 KiB, 8 conns | 16000 (14400–17600) | 15000 (13500–16500) | 4000 (3600–4400) | failed: spliced: not ready | 0.25 (http-nginx) |",
		// The better peer is per cell: HAProxy at 1 MiB.
		"| 1 MiB, 8 conns | 16000 (14400–17600) | 20000 (20000–20000) | 4000 (3600–4400) | failed: spliced: not ready | 0.20 (http-haproxy) |",
		"| 4 KiB, 1 request per conn, 8 conns | 16000 (14400–17600) | 15000 (13500–16500) | failed: wrk saw errors | failed: spliced: not ready | n/a |",
		"P99 latency (ms):\n\n",
		"| 4 KiB, 64 conns | 5.00 (5.00–5.00) | 4.00 (4.00–4.00) | 12.0 (12.0–12.0) | failed: spliced: not ready | 0.33 (http-haproxy) |",
		"Gateway CPU per request (µs):\n\n",
		// Lower is better: the ratio is the peer's cost over spliced's.
		"| 4 KiB, 8 conns | 50.0 (50.0–50.0) | 40.0 (40.0–40.0) | 120.0 (120.0–120.0) | failed: spliced: not ready | 0.33 (http-haproxy) |",
		"| 1 MiB, 8 conns | 50.0 (50.0–50.0) | 900.0 (900.0–900.0) | 120.0 (120.0–120.0) | failed: spliced: not ready | 0.42 (http-nginx) |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	// Only the cells measured have rows.
	if strings.Contains(md, "| 16 MiB") || strings.Contains(md, "| 64 KiB") {
		t.Errorf("rows of cells not measured:\n%s", md)
	}
	// Without the relayed row or the peers there is no ratio.
	r.HTTPPeers = r.HTTPPeers[:2]
	if md := r.Markdown(); !strings.Contains(md, "| 4 KiB, 8 conns | 16000 (14400–17600) | 15000 (13500–16500) | n/a |") {
		t.Errorf("peers alone:\n%s", md)
	}
}

func TestSelectedHTTPPeers(t *testing.T) {
	names := func(only ...string) []string {
		var out []string
		for _, p := range selectedHTTPPeers(Options{Only: only}) {
			out = append(out, p.name)
		}
		return out
	}
	all := []string{"http-nginx", "http-haproxy", "spliced-http-copy", "spliced-http-splice"}
	for _, only := range [][]string{nil, {"http"}, {"httppeers"}, {"latency", "httppeers"}} {
		if got := names(only...); !slices.Equal(got, all) {
			t.Errorf("-only %v selects %v", only, got)
		}
	}
	if got := names("http-haproxy", "spliced-http-copy"); !slices.Equal(got, []string{"http-haproxy", "spliced-http-copy"}) {
		t.Errorf("by name: %v", got)
	}
	if got := names("socks", "latency"); len(got) != 0 {
		t.Errorf("-only socks,latency selects %v", got)
	}
	// Every cell of bench-quick is also in the full run, and the quick
	// run has the peers at 4 KiB and 1 MiB.
	var quick []string
	for _, c := range httpCells {
		if c.quick {
			quick = append(quick, c.key)
		}
	}
	if !slices.Contains(quick, "4k_8c") || !slices.Contains(quick, "1m_8c") || !slices.Contains(quick, "4k_close") {
		t.Errorf("bench-quick measures %v", quick)
	}
}

func TestPeerConfigs(t *testing.T) {
	listen := netip.MustParseAddrPort("10.1.0.1:8081")
	backend := netip.MustParseAddrPort("10.2.0.2:8080")
	ngx := nginxPeerConfig("/tmp/x", listen, backend)
	for _, want := range []string{
		"daemon off;\n", "master_process on;\n", "worker_processes 2;\n", "pid /tmp/x/nginx.pid;\n", "proxy_temp_path /tmp/x/proxy;\n",
		"upstream backend {\n        server 10.2.0.2:8080;\n        keepalive 128;\n",
		"listen 10.1.0.1:8081;\n", "proxy_pass http://backend;\n", "proxy_http_version 1.1;\n", `proxy_set_header Connection "";`,
	} {
		if !strings.Contains(ngx, want) {
			t.Errorf("nginx.conf lacks %q:\n%s", want, ngx)
		}
	}
	hap := haproxyPeerConfig(listen, backend)
	for _, want := range []string{"nbthread 2\n", "mode http\n", "http-reuse always\n", "bind 10.1.0.1:8081\n", "server backend 10.2.0.2:8080\n"} {
		if !strings.Contains(hap, want) {
			t.Errorf("haproxy.cfg lacks %q:\n%s", want, hap)
		}
	}
	spliced := splicedPeersConfig(HTTPPeers)
	cfg, err := config.Parse("bench", []byte(spliced))
	if err != nil {
		t.Fatalf("%v\n%s", err, spliced)
	}
	if len(cfg.Services) != 2 {
		t.Fatalf("services %+v", cfg.Services)
	}
	for i, want := range []struct {
		mode config.SpliceMode
		port string
	}{{"never", "80"}, {"immediate", "81"}} {
		s := cfg.Services[i]
		if s.Proxy != "http" || s.Splice.Mode != want.mode || len(s.Ports) != 1 || s.Ports[0].String() != want.port {
			t.Errorf("service %d: %+v", i, s)
		}
	}
}

func TestHTTPCellDuration(t *testing.T) {
	opt := &Options{Measure: 3 * time.Second}
	for _, c := range httpCells {
		want := 3 * time.Second
		if c.key == "16m_64c" {
			want = 12 * time.Second
		}
		if got := c.duration(opt); got != want {
			t.Errorf("%s runs %v, want %v", c.key, got, want)
		}
	}
	if d := httpPeersDuration(&Options{Measure: time.Second, Quick: true, Repetitions: 3}, 4); d != 4*3*4*1100*time.Millisecond {
		t.Errorf("quick part takes %v", d)
	}
}
