// Command spliced-bench runs the benchmark behind `make bench` and writes
// its report (see package bench).
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"syscall"

	"spliced/bench"
)

func main() {
	bin := flag.String("spliced", "bin/spliced", "path of the spliced binary")
	quick := flag.Bool("quick", false, "fewer, shorter measures (under 3 minutes)")
	out := flag.String("out", "bench/results", "directory for latest.json, latest.md and the pictures")
	reps := flag.Int("reps", 3, "repetitions per configuration")
	flows := flag.Int("flows", 0, "established flows for the memory measure (default 10000; quick 2000)")
	only := flag.String("only", "", "comma-separated configurations or parts (latency, memory, http, trace; socks for every SOCKS5 server; httppeers for the HTTP proxies next to nginx and HAProxy, which http includes) to run")
	hold := flag.String("hold", "", "internal: accept and hold connections on this address (memory measure)")
	flag.Parse()
	if *hold != "" {
		err := bench.Hold(*hold) // returns only when it fails
		fmt.Fprintln(os.Stderr, "spliced-bench -hold:", err)
		os.Exit(1)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "spliced-bench: needs root to build network namespaces (try: sudo make bench)")
		os.Exit(1)
	}
	// Ten thousand proxied flows are twenty thousand sockets in the
	// daemon: lift the hard limit where we may (CAP_SYS_RESOURCE);
	// children inherit it. Where we may not, the memory measure says so.
	lim := syscall.Rlimit{Cur: 1 << 20, Max: 1 << 20}
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	opt := bench.Options{Spliced: *bin, Quick: *quick, Repetitions: *reps, Flows: *flows, Log: os.Stdout}
	if *only != "" {
		opt.Only = strings.Split(*only, ",")
	}
	r, err := bench.Run(opt)
	if err != nil {
		fmt.Fprintln(os.Stderr, "spliced-bench:", err)
		os.Exit(1)
	}
	if err := r.Write(*out); err != nil {
		fmt.Fprintln(os.Stderr, "spliced-bench: write the report:", err)
		os.Exit(1)
	}
	fmt.Printf("\n%s\nwritten to %s/latest.{json,md} and pictures\n", r.Markdown(), *out)
}
