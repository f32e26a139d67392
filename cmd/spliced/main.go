// Command spliced is the spliced daemon: a transparent proxy gateway for
// Linux routers that splices proxied TCP connections. See README.md.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"os/user"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"

	"spliced/config"
	"spliced/gateway"
	"spliced/internal/sdnotify"
	"spliced/internal/version"
	"spliced/logging"
	"spliced/proxy/socks5"
	"spliced/rules"
	"spliced/splice/bpf"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("spliced", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configFile := fs.String("config", "", "configuration file (default: the embedded default, which intercepts nothing)")
	check := fs.Bool("check", false, "validate the configuration, print the nftables table it would install, and exit")
	cleanup := fs.Bool("cleanup", false, "remove the table, ip rules and routes the configuration installs (after a crash), reset the flows the bpf datapath still rewrites and remove its pins, and exit")
	keepFlows := fs.Bool("keep-flows", false, "with -cleanup: leave the bpf datapath's pinned flows running, for the next spliced to adopt")
	logFormat := fs.String("log-format", "", "override log.format: auto, text or json")
	logLevel := fs.String("log-level", "", "override log.level: debug, info, warn or error")
	socket := fs.String("socket", "", "override control.socket: the control API's Unix socket (\"off\" disables it)")
	hashPassword := fs.Bool("hash-password", false, "read a password from stdin (first line) and print its hash for a socks5 users file, then exit")
	showVersion := fs.Bool("version", false, "print the version (the Debian package's) and how it was built, and exit")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: spliced [-config FILE] [-check | -cleanup [-keep-flows]] [-log-format F] [-log-level L] [-socket PATH]\n       spliced -version\n       spliced -hash-password < password\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *hashPassword {
		return hashPasswordFrom(os.Stdin, stdout, stderr)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "spliced: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	if *showVersion {
		v := version.Get()
		fmt.Fprintf(stdout, "spliced %s\n%s\n", v, v.Details())
		return 0
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
	overrides := func(c *config.Config) {
		if *logFormat != "" {
			c.Log.Format = *logFormat
		}
		if *logLevel != "" {
			c.Log.Level = *logLevel
		}
		switch *socket {
		case "":
		case "off":
			c.Control.Socket = ""
		default:
			c.Control.Socket = *socket
		}
	}
	overrides(cfg)
	if msg := config.ControlSocketProblem(cfg.Control.Socket); msg != "" {
		fmt.Fprintf(stderr, "spliced: -socket %q %s\n", *socket, msg)
		return 2
	}
	// The group is this machine's, which the file's validation does not
	// look at: without this -check passed a file the daemon then
	// refused to start with.
	if g := cfg.Control.Group; g != "" && cfg.Control.Socket != "" {
		if _, err := user.LookupGroup(g); err != nil {
			fmt.Fprintf(stderr, "spliced: %s: control.group %q: %v; create the group (groupadd %s) or remove control.group (the socket is then root's only)\n", cfg.File, g, err, g)
			// The file does not fit this machine: refused as a file that
			// does not validate (1), not as a wrong flag (2).
			return 1
		}
	}
	log, err := logging.New(stderr, cfg.Log.Format, cfg.Log.Level)
	if err != nil {
		fmt.Fprintln(stderr, "spliced:", err)
		return 2
	}

	switch {
	case *check:
		fmt.Fprintf(stdout, "# %s: valid; spliced would install:\n", cfg.File)
		spec := rules.FromConfig(cfg)
		if cfg.Kernel.Datapath != config.DatapathNFQueue && spec.Divert.Enabled {
			spec.Divert.SkipMark = config.BPFMark // when the program attaches
		}
		fmt.Fprint(stdout, rules.Render(spec))
		if spec.OwnTable {
			fmt.Fprintf(stdout, "# table owned by the daemon (kernel.own_table: on; flags owner, persist, Linux 6.9 and later): no other process changes or deletes it, nft flush ruleset included\n")
		} else {
			fmt.Fprintf(stdout, "# table unowned (kernel.own_table: off): any process may change it; kernel.repair: %s\n", cfg.Kernel.Repair)
		}
		fmt.Fprintf(stdout, "# policy routing (IPv4 and IPv6):\n#   ip rule add fwmark 0x%x/0x%x lookup %d priority %d proto %d\n#   ip route add local default dev lo table %d proto %d\n",
			spec.Mark, spec.Mark, spec.RouteTable, spec.RulePriority, rules.RouteProtocol, spec.RouteTable, rules.RouteProtocol)
		if spec.Divert.Enabled && (cfg.Kernel.Datapath != config.DatapathBPF || cfg.Kernel.BPFForward != config.BPFForwardRedirect || stackInterfaces()) {
			checkFirewall(stdout, spec)
		}
		checkSourceNAT(stdout, cfg, spec)
		if spec.Divert.Enabled {
			checkForwarding(stdout)
			checkMarkRouting(stdout, cfg, spec)
		}
		if problem, err := gateway.BridgeNetfilterProblem(cfg); err != nil {
			fmt.Fprintf(stdout, "# bridges: not checked (%v)\n", err)
		} else if problem != "" {
			fmt.Fprintf(stdout, "# bridges: %s\n", problem)
		}
		fmt.Fprintf(stdout, "# datapath: %s\n", cfg.Kernel.Datapath)
		if cfg.Kernel.Datapath != config.DatapathNFQueue {
			ifaces, err := gateway.Interfaces(cfg)
			if err != nil {
				fmt.Fprintln(stderr, "spliced:", err)
				return 1
			}
			how := "kernel.interfaces"
			if len(cfg.Kernel.Interfaces) == 0 {
				how = "every interface but lo, bonds' and teams' slaves and bridges' ports (but those of bridges br_netfilter runs for) present now, and those that appear later"
			}
			fmt.Fprintf(stdout, "#   BPF program at tcx ingress of: %s (%s)\n", strings.Join(ifaces, ", "), how)
			if cfg.Kernel.BPFForward == config.BPFForwardRedirect {
				fmt.Fprintf(stdout, "#   rewritten packets sent straight to their egress device (kernel.bpf_forward: redirect)\n")
			} else {
				fmt.Fprintf(stdout, "#   rewritten packets forwarded by the kernel's stack (kernel.bpf_forward: stack)\n")
			}
			fmt.Fprintf(stdout, "#   maps and links pinned in %s (kernel.bpffs/spliced/TABLE): spliced flows outlive the daemon\n", bpf.PinDir(cfg.Kernel.BPFFS, cfg.Kernel.Table))
			if cfg.Kernel.Datapath == config.DatapathAuto {
				fmt.Fprintf(stdout, "#   if it does not load or attach: nfqueue, without the divert chain's first rule\n")
			}
		}
		if cfg.Kernel.Resend == config.ResendGSO {
			fmt.Fprintf(stdout, "# payload a splice takes over: packets longer than a segment whole, as GSO packets on their egress device (kernel.resend: gso)\n")
		} else {
			fmt.Fprintf(stdout, "# payload a splice takes over: segments through the IP output path (kernel.resend: raw)\n")
		}
		return 0
	case *cleanup:
		if err := gateway.Cleanup(cfg, log, *keepFlows); err != nil {
			log.Error("cleanup failed", logging.Err(err))
			return 1
		}
		log.Info("removed spliced's kernel state", logging.KeyTable, "inet "+cfg.Kernel.Table, "kept_bpf_flows", *keepFlows)
		return 0
	}
	if *keepFlows {
		fmt.Fprintln(stderr, "spliced: -keep-flows goes with -cleanup")
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	gw := gateway.New(cfg, log)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGHUP, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	var restart atomic.Bool
	go func() {
		for sig := range sigs {
			switch sig {
			case syscall.SIGUSR1:
				gw.LogState()
			case syscall.SIGHUP:
				reload(ctx, gw, *configFile, overrides, log)
			case syscall.SIGUSR2:
				// Exit, leaving the spliced flows in the kernel for the
				// next daemon (a restart that keeps them).
				log.Info("SIGUSR2: exiting; spliced flows are left for the next spliced to adopt")
				restart.Store(true)
				gw.HandOver()
				stop()
			}
		}
	}()
	err = gw.Run(ctx, func() { sdnotify.Notify("READY=1") })
	sdnotify.Notify("STOPPING=1")
	if errors.Is(err, gateway.ErrHandedOver) {
		return ExitHandedOver
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Error("spliced stopped", logging.Err(err))
		return 1
	}
	if restart.Load() {
		// SIGUSR2 with no flow to leave (none spliced, or kept nowhere):
		// the shutdown was the ordinary one, but the operator asked for
		// a restart, which a status of 0 would not get under
		// Restart=on-failure.
		return ExitHandedOver
	}
	return 0
}

// ExitHandedOver is the exit status after SIGUSR2, which left the spliced
// flows for the next daemon (EX_TEMPFAIL): not a success, so that systemd's
// Restart=on-failure starts the daemon that adopts them, and its
// ExecStopPost cleans up with -keep-flows.
const ExitHandedOver = 75

// reload reads the configuration file again and applies it; a file that
// does not validate, or a change that needs a restart, leaves everything as
// it was.
func reload(ctx context.Context, gw *gateway.Gateway, file string, overrides func(*config.Config), log *slog.Logger) {
	sdnotify.Notify("RELOADING=1")
	defer sdnotify.Notify("READY=1")
	if file == "" {
		log.Warn("SIGHUP: nothing to reload: spliced runs with the embedded default configuration (start it with -config FILE)")
		return
	}
	cfg, err := config.LoadFile(file)
	if err != nil {
		log.Error("reload refused: the configuration does not validate; the running one stays", logging.Err(err))
		return
	}
	overrides(cfg)
	if err := gw.Reload(ctx, cfg); err != nil {
		log.Error("reload refused", logging.Err(err))
	}
}

// hashPasswordFrom prints the users-file hash of the first line of in.
func hashPasswordFrom(in io.Reader, stdout, stderr io.Writer) int {
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && (err != io.EOF || line == "") {
		fmt.Fprintln(stderr, "spliced: -hash-password reads the password from stdin, one line:", err)
		return 2
	}
	h, err := socks5.HashPassword([]byte(strings.TrimRight(line, "\r\n")))
	if err != nil {
		fmt.Fprintln(stderr, "spliced:", err)
		return 1
	}
	fmt.Fprintln(stdout, h)
	return 0
}

// checkSourceNAT prints, for -check, the transparent services whose
// upstream connections would miss the router's source NAT (see
// gateway.SourceNATConflicts).
func checkSourceNAT(stdout io.Writer, cfg *config.Config, spec rules.Spec) {
	if len(gateway.TransparentServices(cfg)) == 0 {
		fmt.Fprintf(stdout, "# source NAT: nothing to check, no service connects upstream from its clients' addresses (upstream: transparent)\n")
		return
	}
	m := rules.NewManager(spec)
	defer m.Close()
	found, err := gateway.SourceNATConflicts(cfg, m)
	switch {
	case err != nil:
		fmt.Fprintf(stdout, "# source NAT: not checked (%v)\n", err)
	case len(found) == 0:
		fmt.Fprintf(stdout, "# source NAT: no masquerade or snat rule of another table applies where transparent services' connections leave\n")
	}
	for _, c := range found {
		fmt.Fprintf(stdout, "# source NAT: %s\n", c)
	}
}

// checkMarkRouting prints, for spliced -check, what routing by firewall
// mark changes for spliced flows (see gateway.MarkRouting).
func checkMarkRouting(stdout io.Writer, cfg *config.Config, spec rules.Spec) {
	m := rules.NewManager(spec)
	defer m.Close()
	lines, err := gateway.MarkRouting(cfg, m)
	if err != nil {
		fmt.Fprintf(stdout, "# mark routing: not checked (%v)\n", err)
		return
	}
	for _, l := range lines {
		fmt.Fprintf(stdout, "# mark routing: %s\n", l)
	}
}

// checkForwarding prints, for spliced -check, the interfaces that do not
// forward: splices of flows whose packets arrive there are refused.
func checkForwarding(stdout io.Writer) {
	off4, off6 := gateway.NotForwarding()
	if len(off4) == 0 && len(off6) == 0 {
		fmt.Fprintf(stdout, "# forwarding: on for IPv4 and IPv6 on every interface (spliced flows' packets are forwarded)\n")
		return
	}
	names := func(m map[int]string) string {
		var n []string
		for _, name := range m {
			n = append(n, name)
		}
		slices.Sort(n)
		return strings.Join(n, ", ")
	}
	if len(off4) > 0 {
		fmt.Fprintf(stdout, "# forwarding: IPv4 off on %s: flows whose packets arrive there stay proxied (their splices are refused); fix: sysctl -w net.ipv4.ip_forward=1\n", names(off4))
	}
	if len(off6) > 0 {
		fmt.Fprintf(stdout, "# forwarding: IPv6 off on %s: flows whose packets arrive there stay proxied (their splices are refused); fix: sysctl -w net.ipv6.conf.all.forwarding=1\n", names(off6))
	}
}

// stackInterfaces reports whether an interface has a classic tc ingress
// qdisc (or it cannot tell): the bpf datapath's redirect leaves what
// arrives there to the stack, its forward hook included.
func stackInterfaces() bool {
	ifs, err := gateway.IngressQdiscs()
	return err != nil || len(ifs) > 0
}

// checkFirewall prints, for -check, the forward chains of other tables
// that would drop spliced flows' packets (see rules.UntrackedDrops).
func checkFirewall(stdout io.Writer, spec rules.Spec) {
	m := rules.NewManager(spec)
	defer m.Close()
	drops, err := m.UntrackedDrops()
	switch {
	case err != nil:
		fmt.Fprintf(stdout, "# firewall: not checked (%v)\n", err)
	case len(drops) == 0:
		fmt.Fprintf(stdout, "# firewall: no forward chain of another table drops spliced flows' packets (untracked once spliced)\n")
	}
	for _, d := range drops {
		fmt.Fprintf(stdout, "# firewall: %s drops spliced flows' packets (untracked once spliced), so they would stall after their splice; fix: %s\n", d, d.Fix())
	}
}
