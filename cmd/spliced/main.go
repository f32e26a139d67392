// Command spliced is the spliced daemon: a transparent proxy gateway for
// Linux routers that splices proxied TCP connections. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"spliced/config"
	"spliced/gateway"
	"spliced/logging"
	"spliced/rules"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("spliced", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configFile := fs.String("config", "", "configuration file (default: the embedded default, which intercepts nothing)")
	check := fs.Bool("check", false, "validate the configuration, print the nftables table it would install, and exit")
	cleanup := fs.Bool("cleanup", false, "remove the table, ip rules and routes the configuration installs (after a crash), and exit")
	logFormat := fs.String("log-format", "", "override log.format: auto, text or json")
	logLevel := fs.String("log-level", "", "override log.level: debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: spliced [-config FILE] [-check | -cleanup] [-log-format F] [-log-level L]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "spliced: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}

	var cfg *config.Config
	var err error
	if *configFile != "" {
		cfg, err = config.LoadFile(*configFile)
	} else {
		cfg, err = config.LoadDefault()
	}
	if err != nil {
		fmt.Fprintln(stderr, err)
		fmt.Fprintln(stderr, "spliced: configuration rejected; nothing was installed")
		return 1
	}
	if *logFormat != "" {
		cfg.Log.Format = *logFormat
	}
	if *logLevel != "" {
		cfg.Log.Level = *logLevel
	}
	log, err := logging.New(stderr, cfg.Log.Format, cfg.Log.Level)
	if err != nil {
		fmt.Fprintln(stderr, "spliced:", err)
		return 2
	}

	switch {
	case *check:
		fmt.Fprintf(stdout, "# %s: valid; spliced would install:\n", cfg.File)
		fmt.Fprint(stdout, rules.Render(rules.FromConfig(cfg)))
		spec := rules.FromConfig(cfg)
		fmt.Fprintf(stdout, "# policy routing (IPv4 and IPv6):\n#   ip rule add fwmark 0x%x/0x%x lookup %d priority %d proto %d\n#   ip route add local default dev lo table %d proto %d\n",
			spec.Mark, spec.Mark, spec.RouteTable, spec.RulePriority, rules.RouteProtocol, spec.RouteTable, rules.RouteProtocol)
		return 0
	case *cleanup:
		if err := gateway.Cleanup(cfg); err != nil {
			log.Error("cleanup failed", logging.Err(err))
			return 1
		}
		log.Info("removed spliced's kernel state", logging.KeyTable, "inet "+cfg.Kernel.Table)
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	gw := gateway.New(cfg, log)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	go func() {
		for range usr1 {
			gw.LogState()
		}
	}()
	if err := gw.Run(ctx, nil); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("spliced stopped", logging.Err(err))
		return 1
	}
	return 0
}
