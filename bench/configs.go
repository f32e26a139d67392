package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"spliced/config"
	"spliced/rules"
	"spliced/splice/bpf"
	"spliced/testnet"
)

// Env is what configurations need from the run.
type Env struct {
	Spliced string // path of the spliced binary
	Dir     string // scratch directory
}

// gateway is one configuration under test, set up in a fresh lab.
type gateway struct {
	name, desc string
	// setup prepares the lab's gateway and returns the processes whose
	// CPU is the gateway's, and a teardown.
	setup func(env *Env, lab *testnet.Lab) (pids func() []int, teardown func(), err error)
}

// splicedConfig is the daemon configuration of the spliced setups.
func splicedConfig(mode, nfqueue string) string {
	return splicedDatapathConfig(mode, nfqueue, "nfqueue")
}

// splicedDatapathConfig is splicedConfig with the datapath of established
// spliced flows (kernel.datapath).
func splicedDatapathConfig(mode, nfqueue, datapath string) string {
	return fmt.Sprintf(`
log:
  level: warn
kernel:
  nfqueue: %s
  datapath: %s
limits:
  max_flows: 30000
services:
  - name: bench
    listen: 15001
    ports: ["%d", "%d"]
    splice:
      mode: %s
`, nfqueue, datapath, portRR, portIperf, mode)
}

func splicedGateway(name, desc, mode, nfqueue string) gateway {
	return splicedDatapathGateway(name, desc, mode, nfqueue, "nfqueue")
}

func splicedDatapathGateway(name, desc, mode, nfqueue, datapath string) gateway {
	return gateway{name: name, desc: desc, setup: func(env *Env, lab *testnet.Lab) (func() []int, func(), error) {
		return launchSpliced(env, lab, splicedDatapathConfig(mode, nfqueue, datapath))
	}}
}

// Gateways are the configurations, in report order.
var Gateways = []gateway{
	{name: "routing", desc: "kernel routing, no filter (the physical limit)",
		setup: func(*Env, *testnet.Lab) (func() []int, func(), error) { return nil, func() {}, nil }},
	{name: "routing-nft", desc: "kernel routing with an nftables forward filter and conntrack",
		setup: func(_ *Env, lab *testnet.Lab) (func() []int, func(), error) {
			return nil, func() {}, nftFilter(lab)
		}},
	{name: "routing-bpf-attached", desc: "routing-nft with spliced's BPF program attached at tcx ingress of the gateway's interfaces, no spliced flow (what the program costs every packet)",
		setup: bpfAttachedGateway},
	{name: "routing-past-spliced", desc: "routing-nft with a spliced daemon on the gateway (64 queues, as on a 64-CPU machine; a service that splices another port): what its divert chain costs traffic it only routes",
		setup: routedPastSplicedGateway},
	{name: "haproxy", desc: "HAProxy in TCP mode, transparent (usesrc clientip), splice-auto", setup: haproxyGateway},
	splicedGateway(BaselineCopy, "spliced, proxied: the plain forwarder relays every byte (the paper's 2-path forwarder)", "never", "lean"),
	splicedGateway("spliced-splice", "spliced, spliced at connect: NFQUEUE with the lean loop (the paper's FWD)", "immediate", "lean"),
	splicedGateway("spliced-splice-gonfq", "spliced, spliced at connect: NFQUEUE through the go-nfqueue library", "immediate", "go-nfqueue"),
	splicedDatapathGateway("spliced-splice-bpf", "spliced, spliced at connect, then rewritten in the kernel by the BPF program at tcx ingress (kernel.datapath: bpf)", "immediate", "lean", "bpf"),
}

// nftFilter installs routing-nft's forward filter: conntrack and an
// accept of the bench ports.
func nftFilter(lab *testnet.Lab) error {
	for _, c := range []string{
		"add table inet filter",
		"add chain inet filter forward { type filter hook forward priority 0; policy drop; }",
		"add rule inet filter forward ct state established,related accept",
		fmt.Sprintf("add rule inet filter forward tcp dport { %d, %d } ct state new accept", portRR, portIperf),
	} {
		if out, err := lab.Gateway.Run("nft", c); err != nil {
			return fmt.Errorf("nft %s: %w %s", c, err, out)
		}
	}
	return nil
}

// routedPastSplicedGateway is routing-nft with a spliced daemon whose
// one service splices a port the bench does not use, with
// config.MaxQueues queues: every measured packet passes its divert
// chain and nothing else of it.
func routedPastSplicedGateway(env *Env, lab *testnet.Lab) (func() []int, func(), error) {
	if err := nftFilter(lab); err != nil {
		return nil, nil, err
	}
	cfg := fmt.Sprintf(`
log:
  level: warn
kernel:
  queues: %d
services:
  - name: other
    listen: 15001
    ports: ["%d"]
    splice:
      mode: immediate
`, config.MaxQueues, portOther)
	return launchSpliced(env, lab, cfg)
}

// launchSpliced starts the daemon with configuration cfg in lab's
// gateway, as a configuration's setup returns it: its process for the
// CPU figures, and its stop.
func launchSpliced(env *Env, lab *testnet.Lab, cfg string) (func() []int, func(), error) {
	d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, cfg)
	if d == nil {
		return nil, nil, err
	}
	if err != nil {
		d.Stop()
		return nil, nil, err
	}
	return func() []int { return []int{d.Pid()} }, func() { d.Stop() }, nil
}

// portOther is a port no measurement uses.
const portOther = 6999

// bpfAttachedGateway is routing-nft with the rewrite program attached at
// tcx ingress of every gateway interface but lo, as the daemon attaches
// it, with no flow in its map: every packet runs the program's lookup
// and goes on.
func bpfAttachedGateway(_ *Env, lab *testnet.Lab) (func() []int, func(), error) {
	if err := nftFilter(lab); err != nil {
		return nil, nil, err
	}
	dp, err := bpf.Load(bpf.Options{})
	if err != nil {
		return nil, nil, fmt.Errorf("load the BPF program: %w", err)
	}
	var att *bpf.Attachment
	err = lab.Gateway.Do(func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		var names []string
		for _, ifi := range ifs {
			if ifi.Flags&net.FlagLoopback == 0 {
				names = append(names, ifi.Name)
			}
		}
		att, err = dp.Attach(names)
		return err
	})
	if err != nil {
		dp.Close()
		return nil, nil, err
	}
	return nil, func() {
		att.Close()
		dp.Close()
	}, nil
}

// maxconn stays below what the open-file limit (20,000 on some machines)
// allows: HAProxy needs two descriptors per connection and then some.
const haproxyConfig = `global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 2m
    timeout server 2m
    option splice-auto
frontend bench
    bind 0.0.0.0:15001 transparent
    default_backend servers
backend servers
    source 0.0.0.0 usesrc clientip
    server original 0.0.0.0:0
`

// haproxyGateway runs HAProxy behind the same interception rules spliced
// installs (a TPROXY rule per port, the socket rule, policy routing).
func haproxyGateway(env *Env, lab *testnet.Lab) (func() []int, func(), error) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return nil, nil, fmt.Errorf("haproxy is not installed (apt-get install haproxy)")
	}
	cfg, err := config.Parse("bench", []byte(splicedConfig("never", "lean")))
	if err != nil {
		return nil, nil, err
	}
	fd, err := lab.Gateway.Open()
	if err != nil {
		return nil, nil, err
	}
	m := rules.NewManager(rules.FromConfig(cfg), rules.WithNetNS(fd))
	if err := m.Install(nil); err != nil {
		return nil, nil, err
	}
	file := filepath.Join(env.Dir, "haproxy.cfg")
	if err := os.WriteFile(file, []byte(haproxyConfig), 0o644); err != nil {
		return nil, nil, err
	}
	cmd := lab.Gateway.Command(context.Background(), bin, "-f", file, "-db")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	teardown := func() {
		cmd.Process.Kill()
		cmd.Wait()
		m.Remove()
		m.Close()
		closeFD(fd)
	}
	// Ready when the listener is there.
	if err := testnet.Poll(5*time.Second, func() error {
		out, err := lab.Gateway.Run("ss", "-ltnH", "sport", "= :15001")
		if err != nil || !strings.Contains(out, "15001") {
			return fmt.Errorf("haproxy is not listening: %s", tailStr(stderr.String(), 300))
		}
		return nil
	}); err != nil {
		teardown()
		return nil, nil, err
	}
	pids := func() []int {
		out, _ := exec.Command("pgrep", "-f", file).Output()
		var ps []int
		for _, f := range strings.Fields(string(out)) {
			if n, err := strconv.Atoi(f); err == nil {
				ps = append(ps, n)
			}
		}
		return ps
	}
	return pids, teardown, nil
}
