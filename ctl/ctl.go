// Package ctl is splicectl: the operator's command line for a running
// spliced, in the manner of nft, ip and ss. Every command prints a table
// for people, or with -j the API's JSON (package api) for programs; it
// exits 0 on success, 1 on failure (the daemon not running included, with
// a message that says so) and 2 on a usage error.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"spliced/api"
	"spliced/config"
	"spliced/internal/version"
	_ "spliced/proxy/all" // config check knows every proxy section
)

const usage = `usage: splicectl [-s SOCKET] [-j] COMMAND [ARGS]

commands:
  status                      version, uptime, engines, queue counters, flows by state
  flows [FILTERS]             list flows; filters: -proxy NAME -state STATE -addr IP -port N
  flow ID                     one flow in detail
  splice ID                   splice a proxied flow now
  unsplice ID                 give a spliced flow back to its proxy
  ruleset [-diff]             spliced's nftables table as the kernel has it; -diff: against
                              what spliced installed (exit 1 on drift)
  watch                       follow flow and daemon events (also: events)
  config check FILE           validate a configuration file as the daemon would
  completion bash             print the bash completion script
  version                     print splicectl's version (the Debian package's) and build

flags (anywhere before the command's arguments):
  -s SOCKET   the daemon's control socket (default $SPLICED_SOCKET or /run/spliced/spliced.sock)
  -j          print JSON (the API's types) instead of tables
`

// Usage is splicectl's usage text (its man page's commands and flags).
func Usage() string { return usage }

// Run executes splicectl with args and returns the exit code.
func Run(args []string, stdout, stderr io.Writer) int {
	c := &cli{out: stdout, err: stderr, socket: os.Getenv("SPLICED_SOCKET")}
	if c.socket == "" {
		c.socket = api.DefaultSocket
	}
	args, err := c.globalFlags(args)
	if err != nil {
		fmt.Fprintln(stderr, "splicectl:", err)
		fmt.Fprint(stderr, usage)
		return 2
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	c.client = api.NewClient(c.socket)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var run func(context.Context, []string) error
	switch cmd {
	case "status":
		run = c.status
	case "flows":
		run = c.flows
	case "flow":
		run = c.flow
	case "splice":
		run = c.splice
	case "unsplice":
		run = c.unsplice
	case "ruleset":
		run = c.ruleset
	case "watch", "events":
		run = c.watch
	case "config":
		run = c.config
	case "completion":
		run = c.completion
	case "version":
		run = func(_ context.Context, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("takes no arguments")}
			}
			v := version.Get()
			_, err := fmt.Fprintf(c.out, "splicectl %s\n%s\n", v, v.Details())
			return err
		}
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "splicectl: unknown command %q\n", cmd)
		fmt.Fprint(stderr, usage)
		return 2
	}
	err = run(ctx, rest)
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "splicectl %s: %v\n", cmd, err)
		fmt.Fprint(stderr, usage)
		return 2
	case errors.Is(err, errDrift):
		return 1
	default:
		fmt.Fprintf(stderr, "splicectl %s: %v\n", cmd, err)
		return 1
	}
}

type usageError struct{ error }

var errDrift = errors.New("drift")

type cli struct {
	out, err io.Writer
	socket   string
	json     bool
	client   *api.Client
}

// globalFlags takes -s and -j from anywhere in args.
func (c *cli) globalFlags(args []string) ([]string, error) {
	var rest []string
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "-j" || a == "--json":
			c.json = true
		case a == "-s" || a == "--socket":
			if i+1 == len(args) {
				return nil, errors.New("-s needs the path of the control socket")
			}
			c.socket = args[i+1]
			i++
		case strings.HasPrefix(a, "-s="), strings.HasPrefix(a, "--socket="):
			c.socket = a[strings.Index(a, "=")+1:]
		default:
			rest = append(rest, a)
		}
	}
	return rest, nil
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) table() *tabwriter.Writer { return tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0) }

func (c *cli) status(ctx context.Context, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("takes no arguments")}
	}
	st, err := c.client.Status(ctx)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(st)
	}
	fmt.Fprintf(c.out, "spliced %s, up %s (since %s)\n", st.Version, time.Duration(st.UptimeSec*float64(time.Second)).Round(time.Second), st.Started.Format(time.RFC3339))
	fmt.Fprintf(c.out, "config %s; table %s; services %s\n", st.ConfigFile, st.Table, strings.Join(st.Services, ", "))
	fmt.Fprintf(c.out, "flows: %d proxied, %d splicing, %d spliced, %d closing\n",
		st.Flows[api.StateProxied], st.Flows[api.StateSplicing], st.Flows[api.StateSpliced], st.Flows[api.StateClosing])
	fmt.Fprintf(c.out, "reloads %d, ruleset repairs %d\n", st.Reloads, st.Repairs)
	for _, w := range st.Warnings {
		fmt.Fprintf(c.out, "WARNING: %s\n", w)
	}
	fmt.Fprintln(c.out)
	w := c.table()
	fmt.Fprintln(w, "ENGINE\tBYTES C->S\tBYTES S->C\tPACKETS C->S\tPACKETS S->C\tSPLICES\tABORTS\tSPLICE p50/p99")
	for _, e := range st.Engines {
		lat := "-"
		if e.Name == "splice" {
			lat = fmt.Sprintf("%dµs/%dµs", e.SpliceP50Us, e.SpliceP99Us)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", e.Name, bytesStr(e.BytesC2S), bytesStr(e.BytesS2C), e.PacketsC2S, e.PacketsS2C, e.Splices, e.SpliceAborts, lat)
	}
	w.Flush()
	for _, e := range st.Engines {
		if len(e.Queues) == 0 {
			continue
		}
		fmt.Fprintf(c.out, "\nqueues (%s):\n", e.QueueBackend)
		w := c.table()
		fmt.Fprintln(w, "QUEUE\tRECEIVED\tMODIFIED\tACCEPTED\tDROPPED\tHELD\tERRORS\tWAITING\tKERNEL QUEUE_DROPPED\tKERNEL USER_DROPPED")
		for _, q := range e.Queues {
			fmt.Fprintf(w, "%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", q.Number, q.Received, q.Modified, q.Accepted, q.Dropped, q.Held, q.Errors, q.KernelWaiting, q.KernelQueueDropped, q.KernelUserDropped)
		}
		w.Flush()
		if len(e.Verdicts) > 0 {
			var parts []string
			for k, v := range e.Verdicts {
				parts = append(parts, fmt.Sprintf("%s %d", k, v))
			}
			sort.Strings(parts)
			fmt.Fprintf(c.out, "engine verdicts: %s\n", strings.Join(parts, ", "))
		}
		if e.HeldDropped > 0 {
			fmt.Fprintf(c.out, "client data dropped during unsplices beyond what one holds: %d packets (sent again by TCP)\n", e.HeldDropped)
		}
		if e.DivertByCommand+e.DivertByNetlink > 0 {
			fmt.Fprintf(c.out, "divert entries added: %d by command packet, %d by netlink\n", e.DivertByCommand, e.DivertByNetlink)
		}
		if len(e.PMTUErrors) > 0 {
			fmt.Fprintf(c.out, "path MTU errors about spliced flows: %d translated, %d for no spliced flow, %d with a bad checksum, %d not translatable\n",
				e.PMTUErrors["translated"], e.PMTUErrors["no_flow"], e.PMTUErrors["bad_checksum"], e.PMTUErrors["unparsed"])
		}
		if len(e.Phases) > 0 {
			fmt.Fprintf(c.out, "\ntransition phases (recent completed transitions):\n")
			w := c.table()
			fmt.Fprintln(w, "TRANSITION\tPHASE\tCOUNT\tp50\tp99")
			for _, p := range e.Phases {
				fmt.Fprintf(w, "%s\t%s\t%d\t%dµs\t%dµs\n", p.Transition, p.Name, p.Count, p.P50Us, p.P99Us)
			}
			w.Flush()
		}
	}
	for _, e := range st.Engines {
		if e.Datapath == "" {
			continue
		}
		fmt.Fprintf(c.out, "\ndatapath: %s", e.Datapath)
		if len(e.BPFInterfaces) > 0 {
			fmt.Fprintf(c.out, " (tcx ingress of %s)", strings.Join(e.BPFInterfaces, ", "))
		}
		fmt.Fprintln(c.out)
		if e.Datapath == "bpf" {
			var parts []string
			for k, v := range e.BPFVerdicts {
				if v > 0 {
					parts = append(parts, fmt.Sprintf("%s %d", k, v))
				}
			}
			sort.Strings(parts)
			fmt.Fprintf(c.out, "bpf verdicts: %s\n", strings.Join(parts, ", "))
			fmt.Fprintf(c.out, "bpf flows: %d promoted, %d promotions failed, %d not promoted (unspliced first), %d demoted, %d stragglers dropped\n",
				e.BPFPromotions, e.BPFPromoteFails, e.BPFPromoteSkipped, e.BPFDemotions, e.BPFStragglers)
		}
	}
	return nil
}

func (c *cli) flows(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("flows", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f api.FlowFilter
	var port uint
	fs.StringVar(&f.Proxy, "proxy", "", "proxy kind or service name")
	fs.StringVar(&f.State, "state", "", "proxied, splicing, spliced or closing")
	fs.StringVar(&f.Addr, "addr", "", "an address of either leg")
	fs.UintVar(&port, "port", 0, "a port of either leg")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected %q", fs.Arg(0))}
	}
	if port > 65535 {
		return usageError{fmt.Errorf("-port %d is not a port", port)}
	}
	if f.State != "" && !slices.Contains(api.FlowStates, f.State) {
		return usageError{fmt.Errorf("-state %q: use %s", f.State, strings.Join(api.FlowStates, ", "))}
	}
	f.Port = uint16(port)
	list, err := c.client.Flows(ctx, f)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(list)
	}
	w := c.table()
	fmt.Fprintln(w, "ID\tSERVICE\tSTATE\tCLIENT\tSERVER\tUPSTREAM\tBYTES C->S\tBYTES S->C\tAGE\tUSER")
	for _, fl := range list {
		user := fl.User
		if user == "" {
			user = "-"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", fl.ID, fl.Service, fl.State, fl.ClientLeg.Remote, fl.ClientLeg.Local,
			fl.ServerLeg.Local, bytesStr(fl.BytesC2S), bytesStr(fl.BytesS2C), time.Duration(fl.AgeSec*float64(time.Second)).Round(time.Second), user)
	}
	return w.Flush()
}

func parseID(args []string) (uint64, error) {
	if len(args) != 1 {
		return 0, usageError{fmt.Errorf("needs one flow ID (see splicectl flows)")}
	}
	id, err := strconv.ParseUint(args[0], 10, 64)
	if err != nil {
		return 0, usageError{fmt.Errorf("%q is not a flow ID", args[0])}
	}
	return id, nil
}

func (c *cli) flow(ctx context.Context, args []string) error {
	id, err := parseID(args)
	if err != nil {
		return err
	}
	f, err := c.client.Flow(ctx, id)
	if err != nil {
		return err
	}
	return c.printFlow(f)
}

func (c *cli) printFlow(f *api.Flow) error {
	if c.json {
		return c.printJSON(f)
	}
	w := c.table()
	fmt.Fprintf(w, "flow\t%d\n", f.ID)
	fmt.Fprintf(w, "service\t%s (%s)\n", f.Service, f.Proxy)
	if f.User != "" {
		fmt.Fprintf(w, "user\t%s\n", f.User)
	}
	fmt.Fprintf(w, "state\t%s\n", f.State)
	fmt.Fprintf(w, "client leg\t%s -> %s\n", f.ClientLeg.Remote, f.ClientLeg.Local)
	fmt.Fprintf(w, "server leg\t%s -> %s\n", f.ServerLeg.Local, f.ServerLeg.Remote)
	fmt.Fprintf(w, "bytes\t%s client->server, %s server->client\n", bytesStr(f.BytesC2S), bytesStr(f.BytesS2C))
	if f.Datapath != "" {
		fmt.Fprintf(w, "datapath\t%s\n", f.Datapath)
	}
	if f.Adopted {
		fmt.Fprintf(w, "adopted\tafter a restart, from the bpf datapath's pins (no proxy owns it: it cannot be unspliced)\n")
	}
	fmt.Fprintf(w, "packets since splice\t%d client->server, %d server->client\n", f.PacketsC2S, f.PacketsS2C)
	fmt.Fprintf(w, "age\t%s (since %s)\n", time.Duration(f.AgeSec*float64(time.Second)).Round(time.Millisecond), f.Started.Format(time.RFC3339))
	if f.SplicedAt != nil {
		fmt.Fprintf(w, "spliced at\t%s (%s after it started)\n", f.SplicedAt.Format(time.RFC3339Nano), f.SplicedAt.Sub(f.Started).Round(time.Millisecond))
	}
	for _, d := range f.Engine {
		name := map[string]string{"c2s": "client->server", "s2c": "server->client"}[d.Name]
		state := "moving"
		switch {
		case d.Stalled:
			state = "STALLED"
		case d.Unacknowledged == 0:
			state = "all acknowledged"
		}
		fmt.Fprintf(w, "%s\t%s: %d bytes unacknowledged, last progress %s ago; seq %d ack %d (offset %+d), window %d%s\n",
			name, state, d.Unacknowledged, time.Duration(d.ProgressAgeSec*float64(time.Second)).Round(time.Millisecond),
			d.HighestSeq, d.HighestAck, int32(d.SeqOffset), d.Window, map[bool]string{true: ", FIN sent"}[d.FIN])
		drops := ""
		if d.Dropped > 0 {
			drops = fmt.Sprintf(", last dropped: %s", d.LastDrop)
		}
		fmt.Fprintf(w, "\t%d packets, %d dropped; last verdict %s%s\n", d.Packets, d.Dropped, d.LastVerdict, drops)
	}
	return w.Flush()
}

func (c *cli) splice(ctx context.Context, args []string) error {
	id, err := parseID(args)
	if err != nil {
		return err
	}
	f, err := c.client.Splice(ctx, id)
	if err != nil {
		return err
	}
	return c.printFlow(f)
}

func (c *cli) unsplice(ctx context.Context, args []string) error {
	id, err := parseID(args)
	if err != nil {
		return err
	}
	f, err := c.client.Unsplice(ctx, id)
	if err != nil {
		return err
	}
	return c.printFlow(f)
}

func (c *cli) ruleset(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ruleset", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	diff := fs.Bool("diff", false, "show the difference to what spliced installed")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	rs, err := c.client.Ruleset(ctx)
	if err != nil {
		return err
	}
	if c.json {
		if err := c.printJSON(rs); err != nil {
			return err
		}
	} else if *diff {
		if rs.Drift {
			fmt.Fprint(c.out, rs.Diff)
		} else {
			fmt.Fprintf(c.out, "table %s is as spliced installed it\n", strings.TrimPrefix(rs.Table, "inet "))
		}
	} else {
		fmt.Fprint(c.out, rs.Kernel)
	}
	if *diff && rs.Drift {
		return errDrift
	}
	return nil
}

func (c *cli) watch(ctx context.Context, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("takes no arguments")}
	}
	return c.client.Events(ctx, func(e api.Event) error {
		if c.json {
			return json.NewEncoder(c.out).Encode(e)
		}
		line := fmt.Sprintf("%s  %-13s", e.Time.Format("15:04:05.000"), e.Kind)
		if f := e.Flow; f != nil {
			line += fmt.Sprintf(" flow %d %s %s -> %s", f.ID, f.Service, f.ClientLeg.Remote, f.ClientLeg.Local)
			if e.Kind == api.EventClosed {
				line += fmt.Sprintf(" (%s / %s)", bytesStr(f.BytesC2S), bytesStr(f.BytesS2C))
			}
		}
		if e.Detail != "" {
			line += "  " + strings.ReplaceAll(e.Detail, "\n", "; ")
		}
		_, err := fmt.Fprintln(c.out, line)
		return err
	})
}

func (c *cli) config(_ context.Context, args []string) error {
	if len(args) != 2 || args[0] != "check" {
		return usageError{fmt.Errorf("use: splicectl config check FILE")}
	}
	cfg, err := config.LoadFile(args[1])
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(map[string]any{"file": args[1], "valid": true, "services": len(cfg.Services)})
	}
	fmt.Fprintf(c.out, "%s: valid (%d services)\n", args[1], len(cfg.Services))
	return nil
}

func bytesStr(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fK", float64(n)/(1<<10))
	}
	return strconv.FormatUint(n, 10)
}
