// Command spliced-demo runs the lab demonstration behind `make demo`.
package main

import (
	"flag"
	"fmt"
	"os"

	"spliced/internal/demo"
)

func main() {
	bin := flag.String("spliced", "bin/spliced", "path of the spliced binary")
	mb := flag.Int64("mb", 200, "megabytes to send each way")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "spliced-demo: needs root to build network namespaces (try: sudo make demo)")
		os.Exit(1)
	}
	if err := demo.Run(demo.Options{Spliced: *bin, Bytes: *mb << 20, Out: os.Stdout}); err != nil {
		fmt.Fprintln(os.Stderr, "spliced-demo:", err)
		os.Exit(1)
	}
}
