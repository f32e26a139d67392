package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"spliced/config"
	"spliced/rules"
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
	return fmt.Sprintf(`
log:
  level: warn
kernel:
  nfqueue: %s
limits:
  max_flows: 30000
services:
  - name: bench
    listen: 15001
    ports: ["%d", "%d"]
    splice:
      mode: %s
`, nfqueue, portRR, portIperf, mode)
}

func splicedGateway(name, desc, mode, nfqueue string) gateway {
	return gateway{name: name, desc: desc, setup: func(env *Env, lab *testnet.Lab) (func() []int, func(), error) {
		d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, splicedConfig(mode, nfqueue))
		if d == nil {
			return nil, nil, err
		}
		if err != nil {
			d.Stop()
			return nil, nil, err
		}
		return func() []int { return []int{d.Pid()} }, func() { d.Stop() }, nil
	}}
}

// Gateways are the configurations, in report order.
var Gateways = []gateway{
	{name: "routing", desc: "kernel routing, no filter (the physical limit)",
		setup: func(*Env, *testnet.Lab) (func() []int, func(), error) { return nil, func() {}, nil }},
	{name: "routing-nft", desc: "kernel routing with an nftables forward filter and conntrack",
		setup: func(_ *Env, lab *testnet.Lab) (func() []int, func(), error) {
			for _, c := range []string{
				"add table inet filter",
				"add chain inet filter forward { type filter hook forward priority 0; policy drop; }",
				"add rule inet filter forward ct state established,related accept",
				fmt.Sprintf("add rule inet filter forward tcp dport { %d, %d } ct state new accept", portRR, portIperf),
			} {
				if out, err := lab.Gateway.Run("nft", c); err != nil {
					return nil, nil, fmt.Errorf("nft %s: %w %s", c, err, out)
				}
			}
			return nil, func() {}, nil
		}},
	{name: "haproxy", desc: "HAProxy in TCP mode, transparent (usesrc clientip), splice-auto", setup: haproxyGateway},
	splicedGateway(BaselineCopy, "spliced, proxied: the plain forwarder relays every byte (the paper's 2-path forwarder)", "never", "lean"),
	splicedGateway("spliced-splice", "spliced, spliced at connect: NFQUEUE with the lean loop (the paper's FWD)", "immediate", "lean"),
	splicedGateway("spliced-splice-gonfq", "spliced, spliced at connect: NFQUEUE through the go-nfqueue library", "immediate", "go-nfqueue"),
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
