package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"spliced/testnet"
)

// HTTP is the HTTP proxy measured with wrk, relaying every byte and
// splicing large responses, and the time its unsplices took.
type HTTP struct {
	// Requests per second by wrk, 8 connections, keyed MODE_FILE: the
	// modes routed (no proxy: wrk asks nginx itself through the gateway,
	// which only routes; what the lab allows a proxy at best), copy
	// (relayed), splice (spliced per response, NFQUEUE) and splicebpf
	// (spliced per response, then on the bpf datapath); the files large
	// (16 MiB), big (1 MiB) and small (4 KiB, below splice_min: never
	// spliced).
	Rates map[string]Stat `json:"requests_per_second"`
	// Unsplice time as the gateway measured it, µs: idle (the client
	// asks again after reading the whole response) and busy (the next
	// request arrives while the response still flows).
	IdleSamples, BusySamples int
	IdleP50, IdleP99         float64
	BusyP50, BusyP99         float64
	// The phases of the idle unsplices.
	IdlePhases []PhaseLatency `json:"idle_unsplice_phases,omitempty"`
	Error      string         `json:"error,omitempty"`
}

const (
	httpBigSize   = 1 << 20
	httpSmallSize = 4 << 10
	httpHugeSize  = 32 << 20
)

// httpFiles are the files the backend nginx serves, by name.
var httpFiles = map[string]int64{
	"small.bin": httpSmallSize, "medium.bin": 64 << 10, "big.bin": httpBigSize,
	"large.bin": 16 << 20, "huge.bin": httpHugeSize,
}

// httpBenchConfig is the daemon of the HTTP rows: "spliced per response"
// splices every response from splice_min on (splice_policy: always), the
// cost the measured policy weighs; datapath is kernel.datapath.
func httpBenchConfig(mode, datapath string) string {
	return "\nlog:\n  level: info\nlimits:\n  max_flows: 30000\nkernel:\n  datapath: " + datapath + "\nservices:\n" + httpService("web", 15080, 80, mode, "always")
}

// httpModes are the columns of the HTTP table: the key in HTTP.Rates,
// the splice mode and the datapath.
var httpModes = []struct{ key, splice, datapath string }{
	{"copy", "never", "nfqueue"},
	{"splice", "immediate", "nfqueue"},
	{"splicebpf", "immediate", "bpf"},
}

// httpService is a service of spliced's HTTP proxy: its TPROXY listener
// on listen intercepts port and sends every request to the bench's nginx.
// policy is its splice_policy (the default when empty).
func httpService(name string, listen, port uint16, mode, policy string) string {
	if policy != "" {
		policy = "\n      splice_policy: " + policy
	}
	return fmt.Sprintf(`  - name: %s
    listen: %d
    ports: ["%d"]
    proxy: http
    idle_timeout: 1m
    splice:
      mode: %s
    http:%s
      routes:
        - path: /
          backends: ["%s:%d"]
`, name, listen, port, mode, policy, "10.2.0.2", testnet.NginxPort)
}

// startNginx runs nginx in the server namespace with the bench's files.
func startNginx(env *Env, lab *testnet.Lab) (stop func(), err error) {
	root := filepath.Join(env.Dir, "nginx")
	if err := os.MkdirAll(filepath.Join(root, "www"), 0o755); err != nil {
		return nil, err
	}
	for name, size := range httpFiles {
		f, err := os.Create(filepath.Join(root, "www", name))
		if err != nil {
			return nil, err
		}
		_, err = io.CopyN(f, testnet.NewRandomStream(uint64(size)), size)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	return lab.Server().StartNginx(root)
}

// wrkRun is what one wrk run measured.
type wrkRun struct {
	Requests int64         // responses completed
	Elapsed  time.Duration // the run's length as wrk timed it
	Rate     float64       // requests per second
	P99      time.Duration // 99th percentile latency (--latency)
}

var (
	wrkRate     = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkRequests = regexp.MustCompile(`(\d+) requests in ([0-9.]+[a-z]+)`)
	wrkP99      = regexp.MustCompile(`(?m)^\s*99%\s+([0-9.]+[a-z]+)\s*$`)
)

// parseWrk reads wrk's output (run with --latency). A run that saw
// responses other than 2xx or 3xx, or socket errors, failed.
func parseWrk(out string) (wrkRun, error) {
	var r wrkRun
	if strings.Contains(out, "Non-2xx") || strings.Contains(out, "Socket errors") {
		return r, fmt.Errorf("wrk saw errors: %s", tailStr(out, 300))
	}
	m := wrkRate.FindStringSubmatch(out)
	n := wrkRequests.FindStringSubmatch(out)
	if m == nil || n == nil {
		return r, fmt.Errorf("wrk printed no rate: %s", tailStr(out, 300))
	}
	var err error
	if r.Rate, err = strconv.ParseFloat(m[1], 64); err != nil {
		return r, err
	}
	if r.Requests, err = strconv.ParseInt(n[1], 10, 64); err != nil {
		return r, err
	}
	if r.Elapsed, err = wrkDuration(n[2]); err != nil {
		return r, err
	}
	if p := wrkP99.FindStringSubmatch(out); p != nil {
		if r.P99, err = wrkDuration(p[1]); err != nil {
			return r, err
		}
	}
	return r, nil
}

// wrkDuration reads a time as wrk prints it: a number and us, ms, s, m
// or h.
func wrkDuration(s string) (time.Duration, error) {
	i := strings.IndexFunc(s, func(r rune) bool { return r >= 'a' && r <= 'z' })
	unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour}[s[max(i, 0):]]
	v, err := strconv.ParseFloat(s[:max(i, 0)], 64)
	if i < 0 || unit == 0 || err != nil {
		return 0, fmt.Errorf("wrk printed %q, not a time", s)
	}
	return time.Duration(v * float64(unit)), nil
}

// wrkOptions are the load of a wrk run: two threads, conns connections,
// for d; closing asks for one request per connection.
type wrkOptions struct {
	conns   int
	d       time.Duration
	closing bool
}

// runWrk runs wrk from the client namespace.
func runWrk(lab *testnet.Lab, url string, o wrkOptions) (wrkRun, error) {
	ctx, cancel := context.WithTimeout(context.Background(), o.d+30*time.Second)
	defer cancel()
	// A 16 MiB response on 64 connections may take longer than wrk's
	// default timeout of 2 s, which it would count as an error.
	args := []string{"-t2", "-c" + strconv.Itoa(o.conns), "-d" + strconv.Itoa(int(max(o.d, time.Second).Seconds())) + "s", "--latency", "--timeout", "20s"}
	if o.closing {
		args = append(args, "-H", "Connection: close")
	}
	out, err := lab.Client().Command(ctx, "wrk", append(args, url)...).CombinedOutput()
	if err != nil {
		return wrkRun{}, fmt.Errorf("wrk: %w: %s", err, tailStr(string(out), 300))
	}
	return parseWrk(string(out))
}

// wrk runs wrk from the client namespace on 8 connections and returns
// requests per second.
func wrk(lab *testnet.Lab, url string, d time.Duration) (float64, error) {
	r, err := runWrk(lab, url, wrkOptions{conns: 8, d: d})
	return r.Rate, err
}

func measureHTTP(env *Env, opt *Options) *HTTP {
	res := &HTTP{Rates: map[string]Stat{}}
	lab, err := testnet.New(testnet.Options{})
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer lab.Close()
	stop, err := startNginx(env, lab)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer stop()
	vip := netip.AddrPortFrom(lab.Server().IPv4, 80)
	// The ceiling: the same requests to nginx itself, routed by the
	// gateway with no daemon. wrk, nginx and the gateway share the
	// machine's CPUs, so no proxy can beat this.
	backend := netip.AddrPortFrom(lab.Server().IPv4, testnet.NginxPort)
	if err := measureHTTPFiles(res, opt, lab, "routed", backend); err != nil {
		res.Error = err.Error()
		return res
	}
	var idle, busy []float64
	for _, m := range httpModes {
		mode := m.key
		d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, httpBenchConfig(m.splice, m.datapath))
		if err != nil {
			if d != nil {
				d.Stop()
			}
			res.Error = err.Error()
			return res
		}
		if err := measureHTTPFiles(res, opt, lab, mode, vip); err != nil {
			res.Error = err.Error() + warnings(d)
			d.Stop()
			return res
		}
		if mode == "splice" {
			idle = tookOf(d, "flow unspliced")
			res.IdlePhases = phasesFor(d.Lines(), "flow unspliced", unsplicePhases, "idle", "")
			n := 30
			if opt.Quick {
				n = 10
			}
			before := len(idle)
			if err := busyUnsplices(lab, vip, n); err != nil {
				res.Error = "busy unsplice: " + err.Error()
			}
			testnet.Poll(5*time.Second, func() error {
				if len(tookOf(d, "flow unspliced")) < before+n {
					return fmt.Errorf("waiting for the unsplice log")
				}
				return nil
			})
			busy = tookOf(d, "flow unspliced")[before:]
		}
		d.Stop()
	}
	res.IdleSamples, res.BusySamples = len(idle), len(busy)
	res.IdleP50, res.IdleP99 = percentile(idle, 0.5), percentile(idle, 0.99)
	res.BusyP50, res.BusyP99 = percentile(busy, 0.5), percentile(busy, 0.99)
	for _, file := range []string{"large", "big", "small"} {
		fmt.Fprintf(opt.Log, "   wrk %s: routed %.0f/s copy %.0f/s splice %.0f/s splice on bpf %.0f/s\n", file, res.Rates["routed_"+file].Median,
			res.Rates["copy_"+file].Median, res.Rates["splice_"+file].Median, res.Rates["splicebpf_"+file].Median)
	}
	fmt.Fprintf(opt.Log, "   unsplice idle %d p50 %.0f µs p99 %.0f µs, busy %d p50 %.0f µs p99 %.0f µs\n",
		res.IdleSamples, res.IdleP50, res.IdleP99, res.BusySamples, res.BusyP50, res.BusyP99)
	for _, ph := range res.IdlePhases {
		fmt.Fprintf(opt.Log, "   idle unsplice phase %s p50 %.0f µs p99 %.0f µs\n", ph.Phase, ph.P50, ph.P99)
	}
	return res
}

// measureHTTPFiles measures the table's three files through to (the
// proxy's address, or nginx's for the routed column) and keeps the rates
// under mode.
func measureHTTPFiles(res *HTTP, opt *Options, lab *testnet.Lab, mode string, to netip.AddrPort) error {
	for _, file := range []string{"large", "big", "small"} {
		var samples []float64
		for range opt.Repetitions {
			r, err := wrk(lab, fmt.Sprintf("http://%s/%s.bin", to, file), opt.Measure)
			if err != nil {
				return fmt.Errorf("%s %s: %w", mode, file, err)
			}
			samples = append(samples, r)
		}
		res.Rates[mode+"_"+file] = NewStat(samples)
	}
	return nil
}

// tookOf returns the took_us of the daemon's log lines with msg.
func tookOf(d *testnet.Daemon, msg string) []float64 {
	var out []float64
	for _, l := range d.Lines() {
		if l["msg"] == msg {
			if v, ok := l["took_us"].(float64); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// busyUnsplices asks for a large response n times on one connection and
// sends the next request while it still flows (after its header, when
// the gateway has spliced it), so that each unsplice happens mid-response.
func busyUnsplices(lab *testnet.Lab, vip netip.AddrPort, n int) error {
	c, err := lab.Client().Dial(vip, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	send := func() error {
		_, err := fmt.Fprintf(c, "GET /huge.bin HTTP/1.1\r\nHost: bench\r\n\r\n")
		return err
	}
	if err := send(); err != nil {
		return err
	}
	for i := range n + 1 {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			return err
		}
		if resp.StatusCode != 200 || resp.ContentLength != httpHugeSize {
			return fmt.Errorf("status %d, length %d", resp.StatusCode, resp.ContentLength)
		}
		// Read a part, let the splice happen, then ask again.
		if _, err := io.CopyN(io.Discard, resp.Body, 1<<20); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
		if i < n {
			if err := send(); err != nil {
				return err
			}
		}
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			return err
		}
	}
	return nil
}

// warnings returns the first warnings and errors the daemon logged.
func warnings(d *testnet.Daemon) string {
	var out []string
	for _, l := range d.Lines() {
		if (l["level"] == "WARN" || l["level"] == "ERROR" || l["msg"] == "http connection closed" || l["msg"] == "flow closed") && len(out) < 12 && l["msg"] != "http: response stays proxied" {
			out = append(out, fmt.Sprintf("%v: %v %v", l["msg"], l["err"], l["reason"]))
		}
	}
	if len(out) == 0 {
		return ""
	}
	return "; the daemon logged: " + strings.Join(out, "; ")
}
