// Command splicectl is the operator's CLI for spliced.
package main

import (
	"fmt"
	"io"
	"os"

	"spliced/config"
)

const usage = `usage: splicectl COMMAND

commands:
  config check FILE   validate a configuration file as the daemon would
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	switch {
	case len(args) == 3 && args[0] == "config" && args[1] == "check":
		if _, err := config.LoadFile(args[2]); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: valid\n", args[2])
		return 0
	case len(args) == 1 && (args[0] == "help" || args[0] == "-h" || args[0] == "--help"):
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprint(stderr, usage)
	return 2
}
