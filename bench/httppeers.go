package bench

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"spliced/testnet"
)

// The HTTP peers part: nginx and HAProxy as reverse proxies on the
// gateway's own address, and spliced's HTTP proxy (transparent, through
// its TPROXY listener), relaying and splicing, all in front of the same
// nginx backend in the server namespace and driven by the same wrk in the
// client namespace. They run side by side in one lab, and every cell
// (response size and load) is measured for each of them in turn before
// the next cell, so that a change of the machine's load (it may be
// shared) spreads over all rows alike.

// httpCell is one load of the peers table.
type httpCell struct {
	key, title string
	file       string // on the backend, one of httpFiles
	conns      int
	closing    bool // one request per connection
	quick      bool // measured by bench-quick too
	// longer: the run is this many times the measure's length. 64
	// connections of 16 MiB responses are a GiB in flight, which takes
	// a proxy here 2 to 4 s: in a run of 3 s some completed none.
	longer int
}

// duration is the length of the cell's runs.
func (c httpCell) duration(opt *Options) time.Duration {
	return max(opt.Measure, time.Second) * time.Duration(max(c.longer, 1))
}

var httpCells = []httpCell{
	{key: "4k_8c", title: "4 KiB, 8 conns", file: "small.bin", conns: 8, quick: true},
	{key: "4k_64c", title: "4 KiB, 64 conns", file: "small.bin", conns: 64, quick: true},
	{key: "64k_8c", title: "64 KiB, 8 conns", file: "medium.bin", conns: 8},
	{key: "64k_64c", title: "64 KiB, 64 conns", file: "medium.bin", conns: 64},
	{key: "1m_8c", title: "1 MiB, 8 conns", file: "big.bin", conns: 8, quick: true},
	{key: "1m_64c", title: "1 MiB, 64 conns", file: "big.bin", conns: 64},
	{key: "16m_8c", title: "16 MiB, 8 conns", file: "large.bin", conns: 8},
	{key: "16m_64c", title: "16 MiB, 64 conns", file: "large.bin", conns: 64, longer: 4},
	{key: "4k_close", title: "4 KiB, 1 request per conn, 8 conns", file: "small.bin", conns: 8, closing: true, quick: true},
}

// The three measures of every cell, the prefixes of its metrics' keys.
var httpMeasures = []Metric{
	{Key: "rps_", Title: "requests per second", Unit: "req/s"},
	{Key: "p99_ms_", Title: "p99 latency", Unit: "ms", Lower: true},
	{Key: "cpu_us_", Title: "gateway CPU per request", Unit: "µs", Lower: true},
}

// httpCellMetrics are a measure's metrics, a cell each, in table order.
func httpCellMetrics(measure Metric) []Metric {
	var ms []Metric
	for _, c := range httpCells {
		ms = append(ms, Metric{Key: measure.Key + c.key, Title: c.title, Unit: measure.Unit, Lower: measure.Lower})
	}
	return ms
}

// Where the HTTP proxies listen. nginx and HAProxy listen on the
// gateway's client-side address; spliced intercepts connections to the
// backend's address on its own ports (none of them is open there: the
// backend nginx listens on testnet.NginxPort).
const (
	portNginxPeer   = 8081
	portHAProxyPeer = 8082
)

// httpPeer is one HTTP proxy of the peers table.
type httpPeer struct {
	name, desc string
	// start runs a peer on listen, the gateway's address.
	start func(env *Env, lab *testnet.Lab, listen netip.AddrPort) (pids func() []int, teardown func(), err error)
	// splice is the splice mode of a spliced row; the spliced rows run
	// as services of one daemon, each intercepting its port.
	splice string
	port   uint16
}

// HTTPPeers are the rows of the peers table; -only selects them by name,
// all of them with "httppeers" or "http" (the whole HTTP section).
var HTTPPeers = []httpPeer{
	{name: "http-nginx", desc: "nginx proxy_pass, upstream keepalive, 2 workers, on the gateway's address", start: nginxPeer, port: portNginxPeer},
	{name: "http-haproxy", desc: "HAProxy mode http, http-reuse always, 2 threads, on the gateway's address", start: haproxyPeer, port: portHAProxyPeer},
	{name: "spliced-http-copy", desc: "spliced proxy: http, transparent, relaying every response (splice mode never)", splice: "never", port: 80},
	{name: "spliced-http-splice", desc: "spliced proxy: http, transparent, splicing responses from splice_min (64 KiB) on where the measured policy finds it pays (splice mode immediate, the default splice_policy)", splice: "immediate", port: 81},
}

// The ratio column compares the relayed row with the better of the
// peers.
var (
	httpRelayed   = "spliced-http-copy"
	httpPeerNames = []string{"http-nginx", "http-haproxy"}
)

// selectedHTTPPeers are the rows opt.Only selects.
func selectedHTTPPeers(opt Options) []httpPeer {
	var out []httpPeer
	for _, p := range HTTPPeers {
		if len(opt.Only) == 0 || slices.Contains(opt.Only, "http") || slices.Contains(opt.Only, "httppeers") || slices.Contains(opt.Only, p.name) {
			out = append(out, p)
		}
	}
	return out
}

// measureHTTPPeers starts every selected row in one lab and measures each
// cell on each of them in turn, Repetitions times.
func measureHTTPPeers(env *Env, peers []httpPeer, opt *Options) []ConfigResult {
	res := make([]ConfigResult, len(peers))
	for i, p := range peers {
		res[i] = ConfigResult{Name: p.name, Description: p.desc, Metrics: map[string]Stat{}, Errors: map[string]string{}}
	}
	fail := func(why string) []ConfigResult {
		for i := range res {
			if res[i].Failed == "" {
				res[i].Failed = why
			}
		}
		return res
	}
	// One request per connection opens thousands of connections a
	// second, on the client and on the gateway's upstream side.
	lab, err := testnet.New(churnLabOptions)
	if err != nil {
		return fail("build the lab: " + err.Error())
	}
	defer lab.Close()
	stop, err := startNginx(env, lab)
	if err != nil {
		return fail("the backend nginx: " + err.Error())
	}
	defer stop()

	gw := lab.GatewayClientSide[0].IPv4
	meters := make([]cpuMeter, len(peers))
	targets := make([]netip.AddrPort, len(peers))
	var spliced []httpPeer
	for i, p := range peers {
		if p.start == nil {
			spliced = append(spliced, p)
			targets[i] = netip.AddrPortFrom(lab.Server().IPv4, p.port)
			continue
		}
		targets[i] = netip.AddrPortFrom(gw, p.port)
		pids, teardown, err := p.start(env, lab, targets[i])
		if err != nil {
			res[i].Failed = err.Error()
			continue
		}
		defer teardown()
		meters[i] = cpuMeter{pids: pids}
	}
	if len(spliced) > 0 {
		d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, splicedPeersConfig(spliced))
		if d != nil {
			defer d.Stop()
		}
		for i, p := range peers {
			switch {
			case p.start != nil:
			case err != nil:
				res[i].Failed = "spliced: " + err.Error()
			default:
				meters[i] = cpuMeter{pids: func() []int { return []int{d.Pid()} }}
			}
		}
	}

	samples := make([]map[string][]float64, len(peers))
	for i := range samples {
		samples[i] = map[string][]float64{}
	}
	for rep := 1; rep <= opt.Repetitions; rep++ {
		for _, c := range httpCells {
			if opt.Quick && !c.quick {
				continue
			}
			var line []string
			for i, p := range peers {
				if res[i].Failed != "" {
					continue
				}
				before := meters[i].read()
				r, err := runWrk(lab, fmt.Sprintf("http://%s/%s", targets[i], c.file), wrkOptions{conns: c.conns, d: c.duration(opt), closing: c.closing})
				cpu := meters[i].read().procSub(before)
				if err == nil && r.Requests == 0 {
					err = fmt.Errorf("wrk completed no request")
				}
				if err != nil {
					for _, m := range httpMeasures {
						res[i].Errors[m.Key+c.key] = err.Error()
					}
					line = append(line, fmt.Sprintf("%s failed: %v", p.name, err))
					continue
				}
				s := samples[i]
				s["rps_"+c.key] = append(s["rps_"+c.key], r.Rate)
				s["p99_ms_"+c.key] = append(s["p99_ms_"+c.key], r.P99.Seconds()*1000)
				s["cpu_us_"+c.key] = append(s["cpu_us_"+c.key], float64(cpu.Microseconds())/float64(r.Requests))
				line = append(line, fmt.Sprintf("%s %s/s p99 %s ms %s µs", p.name, num(r.Rate), num(r.P99.Seconds()*1000), num(float64(cpu.Microseconds())/float64(r.Requests))))
			}
			fmt.Fprintf(opt.Log, "   repetition %d, %s: %s\n", rep, c.title, strings.Join(line, "; "))
		}
	}
	for i := range res {
		res[i].finish(samples[i])
	}
	return res
}

// splicedPeersConfig is the daemon configuration of the spliced rows of
// peers: a service each. It logs warnings only, as the peers log nothing
// per request.
func splicedPeersConfig(peers []httpPeer) string {
	var b strings.Builder
	b.WriteString("\nlog:\n  level: warn\nlimits:\n  max_flows: 30000\nservices:\n")
	listen := uint16(15080)
	for _, p := range peers {
		if p.start == nil {
			b.WriteString(httpService("web_"+p.splice, listen, p.port, p.splice, "")) // the default policy (measured)
			listen++
		}
	}
	return b.String()
}

// nginxPeerConfig is the configuration of nginx as the reverse proxy on
// the gateway: two workers, the backend's connections kept alive
// (HTTP/1.1 upstream, no Connection header passed on), no access log;
// buffering of responses as nginx does by default.
func nginxPeerConfig(dir string, listen netip.AddrPort, backend netip.AddrPort) string {
	return testnet.NginxConfig(dir, 2, fmt.Sprintf(`    upstream backend {
        server %s;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen %s;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
`, backend, listen))
}

// haproxyPeerConfig is the configuration of HAProxy as the reverse proxy
// on the gateway: HTTP mode, two threads, idle backend connections
// shared between clients (http-reuse always), no logs.
func haproxyPeerConfig(listen netip.AddrPort, backend netip.AddrPort) string {
	return fmt.Sprintf(`global
    maxconn 4000
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 2m
    timeout server 2m
    http-reuse always
frontend web
    bind %s
    default_backend nginx
backend nginx
    server backend %s
`, listen, backend)
}

// httpBackend is the bench's nginx, in the server namespace.
func httpBackend(lab *testnet.Lab) netip.AddrPort {
	return netip.AddrPortFrom(lab.Server().IPv4, testnet.NginxPort)
}

// peerServer writes a peer's configuration under the scratch directory
// and starts it on the gateway.
func peerServer(env *Env, lab *testnet.Lab, name string, config func(dir string) string, listen netip.AddrPort, args ...string) (func() []int, func(), error) {
	bin, err := exec.LookPath(name)
	if err != nil {
		return nil, nil, fmt.Errorf("%s is not installed (see scripts/deps.sh)", name)
	}
	dir := filepath.Join(env.Dir, "peer-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	file := filepath.Join(dir, name+".conf")
	if err := os.WriteFile(file, []byte(config(dir)), 0o644); err != nil {
		return nil, nil, err
	}
	pids, teardown, err := startServer(lab, listen.Port(), bin, append(args, file)...)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		return nil, nil, fmt.Errorf("%s: %w %s", name, err, tailStr(string(log), 300))
	}
	return pids, teardown, nil
}

func nginxPeer(env *Env, lab *testnet.Lab, listen netip.AddrPort) (func() []int, func(), error) {
	config := func(dir string) string { return nginxPeerConfig(dir, listen, httpBackend(lab)) }
	return peerServer(env, lab, "nginx", config, listen, "-c")
}

func haproxyPeer(env *Env, lab *testnet.Lab, listen netip.AddrPort) (func() []int, func(), error) {
	config := func(string) string { return haproxyPeerConfig(listen, httpBackend(lab)) }
	return peerServer(env, lab, "haproxy", config, listen, "-db", "-f")
}

// httpPeersDuration is roughly how long the part takes, for the log.
func httpPeersDuration(opt *Options, rows int) time.Duration {
	var d time.Duration
	for _, c := range httpCells {
		if !opt.Quick || c.quick {
			d += c.duration(opt) + 100*time.Millisecond
		}
	}
	return d * time.Duration(rows*opt.Repetitions)
}
