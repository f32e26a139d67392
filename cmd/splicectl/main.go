// Command splicectl is the operator's CLI for spliced (see package ctl).
package main

import (
	"os"

	"spliced/ctl"
)

func main() { os.Exit(ctl.Run(os.Args[1:], os.Stdout, os.Stderr)) }
