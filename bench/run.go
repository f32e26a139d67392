package bench

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

// Options of a run.
type Options struct {
	Spliced     string        // the spliced binary
	Quick       bool          // fewer and shorter measures
	Repetitions int           // per configuration (default 3)
	Measure     time.Duration // length of one measure (default 3 s; quick 1 s)
	Flows       int           // established flows for the memory measure (default 10,000)
	Only        []string      // configurations to run (default all)
	Log         io.Writer     // progress
}

func (o *Options) defaults() {
	if o.Repetitions == 0 {
		o.Repetitions = 3
	}
	if o.Measure == 0 {
		o.Measure = 3 * time.Second
		if o.Quick {
			o.Measure = time.Second
		}
	}
	if o.Flows == 0 {
		o.Flows = 10000
		if o.Quick {
			o.Flows = 2000
		}
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

// Run measures every configuration and returns the report. It fails at
// once, naming them, when tools it needs are not installed.
func Run(opt Options) (*Report, error) {
	opt.defaults()
	if err := testnet.CheckTools(Tools(opt)...); err != nil {
		return nil, fmt.Errorf("%w; -only can select the parts whose tools are there", err)
	}
	dir, err := os.MkdirTemp("", "spliced-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	env := &Env{Spliced: opt.Spliced, Dir: dir}
	r := &Report{
		Commit: gitCommit(), Kernel: kernelRelease(), CPUs: runtime.NumCPU(),
		Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), Quick: opt.Quick,
		Repetitions: opt.Repetitions, Seconds: opt.Measure.Seconds(),
	}
	r.Configs = measureGateways(env, &opt)
	for _, s := range SOCKSServers {
		if len(opt.Only) > 0 && !contains(opt.Only, s.name) && !contains(opt.Only, "socks") {
			continue
		}
		fmt.Fprintf(opt.Log, "== %s: %s\n", s.name, s.desc)
		r.SOCKS = append(r.SOCKS, measureSOCKS(env, s, &opt))
	}
	if len(opt.Only) == 0 || contains(opt.Only, "latency") {
		fmt.Fprintln(opt.Log, "== splice latency")
		r.Latency = measureLatency(env, &opt)
	}
	if len(opt.Only) == 0 || contains(opt.Only, "memory") {
		fmt.Fprintf(opt.Log, "== memory of %d flows\n", opt.Flows)
		r.Memory = measureMemory(env, &opt)
	}
	if len(opt.Only) == 0 || contains(opt.Only, "http") {
		fmt.Fprintln(opt.Log, "== http proxy")
		r.HTTP = measureHTTP(env, &opt)
	}
	if peers := selectedHTTPPeers(opt); len(peers) > 0 {
		fmt.Fprintf(opt.Log, "== http proxy next to nginx and HAProxy (about %s)\n", httpPeersDuration(&opt, len(peers)).Round(time.Second))
		r.HTTPPeers = measureHTTPPeers(env, peers, &opt)
	}
	if len(opt.Only) == 0 || contains(opt.Only, "trace") {
		fmt.Fprintln(opt.Log, "== sequence trace")
		r.Trace = measureTrace(env, &opt)
	}
	return r, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// measureGateways measures the selected configurations in turn, once
// per repetition, each time in a fresh lab: rep 1 of every configuration,
// then rep 2 of every one, and so on. Measured all in one lab and one
// after the other, a configuration's repetitions shared that lab's
// placement of its processes and interrupts on the CPUs, and whatever
// else the machine did in its minute: one-connection request/response
// rates then differed by a fifth between configurations whose ranges did
// not overlap (routing-bpf-attached 0.78x routing-nft at 3bf99cc, 0.95x
// in the run before), while the program's own cost for such a packet is
// about 40 ns (BenchmarkProgramPass in splice/bpf).
func measureGateways(env *Env, opt *Options) []ConfigResult {
	var selected []gateway
	for _, g := range Gateways {
		if len(opt.Only) == 0 || contains(opt.Only, g.name) {
			selected = append(selected, g)
		}
	}
	results := make([]ConfigResult, len(selected))
	samples := make([]map[string][]float64, len(selected))
	for i, g := range selected {
		results[i] = ConfigResult{Name: g.name, Description: g.desc, Metrics: map[string]Stat{}, Errors: map[string]string{}}
		samples[i] = map[string][]float64{}
	}
	for rep := 1; rep <= opt.Repetitions; rep++ {
		for i, g := range selected {
			fmt.Fprintf(opt.Log, "== %s (repetition %d of %d): %s\n", g.name, rep, opt.Repetitions, g.desc)
			if err := measureGatewayOnce(env, g, opt, &results[i], samples[i]); err != nil {
				results[i].Errors["setup"] = err.Error()
				fmt.Fprintf(opt.Log, "   failed: %v\n", err)
				continue
			}
			fmt.Fprintf(opt.Log, "   repetition %d: %s\n", rep, summary(Metrics, samples[i]))
		}
	}
	for i := range results {
		if len(samples[i]) == 0 && results[i].Errors["setup"] != "" {
			results[i].Failed = results[i].Errors["setup"]
			delete(results[i].Errors, "setup")
		}
		results[i].finish(samples[i])
	}
	return results
}

// measureGatewayOnce builds a lab with configuration g and runs every
// measure once, adding to samples (and to res.Errors what failed).
func measureGatewayOnce(env *Env, g gateway, opt *Options, res *ConfigResult, samples map[string][]float64) error {
	lab, err := testnet.New(testnet.Options{})
	if err != nil {
		return fmt.Errorf("build the lab: %w", err)
	}
	defer lab.Close()
	pids, teardown, err := g.setup(env, lab)
	if err != nil {
		return err
	}
	defer teardown()
	meter := cpuMeter{pids: pids}
	add := func(key string, v float64, err error) {
		if err != nil {
			res.Errors[key] = err.Error()
			fmt.Fprintf(opt.Log, "   %s: failed: %v\n", key, err)
			return
		}
		samples[key] = append(samples[key], v)
	}
	for _, rr := range []struct {
		key         string
		size, conns int
	}{{"rr_1b_1c", 1, 1}, {"rr_1b_8c", 1, 8}, {"rr_1460b_1c", 1460, 1}, {"rr_1460b_8c", 1460, 8}} {
		before := meter.read()
		rate, err := requestResponse(lab.Client(), lab.Server(), rr.size, rr.conns, opt.Measure)
		cpu := meter.read().sub(before)
		add(rr.key, rate, err)
		if rr.key == "rr_1b_8c" && err == nil && rate > 0 {
			add("cpu_us_per_tx", float64(cpu.Microseconds())/(rate*opt.Measure.Seconds()), nil)
		}
	}
	for _, b := range []struct {
		key     string
		reverse bool
	}{{"bulk_c2s", false}, {"bulk_s2c", true}} {
		before := meter.read()
		gbps, err := iperf(lab, opt.Measure, b.reverse)
		cpu := meter.read().sub(before)
		add(b.key, gbps, err)
		if b.key == "bulk_c2s" && err == nil && gbps > 0 {
			gb := gbps * opt.Measure.Seconds() / 8
			add("cpu_s_per_gb", cpu.Seconds()/gb, nil)
		}
	}
	return nil
}

// finish turns the repetitions' samples into statistics; an error of a
// metric measured at least once is dropped.
func (res *ConfigResult) finish(samples map[string][]float64) {
	for k, v := range samples {
		res.Metrics[k] = NewStat(v)
		delete(res.Errors, k)
	}
	if len(res.Errors) == 0 {
		res.Errors = nil
	}
}

// summary is one repetition's last sample of each metric, for the log.
func summary(metrics []Metric, samples map[string][]float64) string {
	var parts []string
	for _, m := range metrics {
		if v := samples[m.Key]; len(v) > 0 {
			parts = append(parts, fmt.Sprintf("%s=%s", m.Key, num(v[len(v)-1])))
		}
	}
	return strings.Join(parts, " ")
}

func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if st, _ := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); len(st) > 0 {
		c += "-dirty"
	}
	return c
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func closeFD(fd int) { unix.Close(fd) }
