package gateway

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/jsimonetti/rtnetlink/v2"

	"spliced/config"
	"spliced/logging"
)

// Bridged LANs and br_netfilter. With net.bridge.bridge-nf-call-iptables
// (or -ip6tables) at 1, which Docker turns on, netfilter's IP hooks run
// for packets that arrive through a bridge while the bridge handles them.
// TPROXY then gives a client's SYN the service's listener there, the IP
// layer drops that assignment when it takes the packet over (ip_rcv's
// skb_orphan), and br_netfilter keeps the IP hooks from running a second
// time: the SYN meets no socket, and the client's connects are refused
// or time out (TestLabBridgedLAN: none got through, copy and spliced
// alike). The daemon cannot fix it without changing what other software
// relies on, so it says what to change.

// BridgeNetfilterProblem describes why transparent interception fails
// through this namespace's bridges, or is "" when it does not (no
// bridge, no transparent service, or the sysctls at 0).
func BridgeNetfilterProblem(cfg *config.Config) (string, error) {
	if !slices.ContainsFunc(cfg.Services, func(s config.Service) bool { return s.ListenMode != config.ListenDirect }) {
		return "", nil
	}
	var on []string
	for _, name := range []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables"} {
		if b, err := os.ReadFile("/proc/sys/net/bridge/" + name); err == nil && strings.TrimSpace(string(b)) == "1" {
			on = append(on, "net.bridge."+name)
		}
	}
	if len(on) == 0 {
		return "", nil
	}
	bridges, err := bridgeNames()
	if err != nil || len(bridges) == 0 {
		return "", err
	}
	set := make([]string, len(on))
	for i, k := range on {
		set[i] = k + "=0"
	}
	return fmt.Sprintf("transparent interception fails through bridge %s while %s=1 (br_netfilter, which Docker turns on): the kernel drops the listener TPROXY gives a client's SYN, and its connects are refused or time out. Set sysctl -w %s (Docker's filtering between containers on one bridge relies on them), or bring the clients in on an interface that is no bridge's port",
		strings.Join(bridges, ", "), strings.Join(on, "=1 and "), strings.Join(set, " ")), nil
}

// bridgeNames lists the bridge devices of the namespace.
func bridgeNames() ([]string, error) {
	bridges, _, err := bridgeLinks()
	return bridges, err
}

// bridgeLinks lists the namespace's bridges, and the names of their
// ports.
func bridgeLinks() (bridges []string, ports map[string]bool, err error) {
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return nil, nil, fmt.Errorf("list the bridges: %w", err)
	}
	defer c.Close()
	links, err := c.Link.List()
	if err != nil {
		return nil, nil, fmt.Errorf("list the bridges: %w", err)
	}
	isBridge := map[uint32]bool{}
	for _, l := range links {
		if a := l.Attributes; a != nil && a.Info != nil && a.Info.Kind == "bridge" {
			bridges = append(bridges, a.Name)
			isBridge[l.Index] = true
		}
	}
	ports = map[string]bool{}
	for _, l := range links {
		if a := l.Attributes; a != nil && a.Master != nil && isBridge[*a.Master] {
			ports[a.Name] = true
		}
	}
	return bridges, ports, nil
}

// checkBridgeNetfilter warns when BridgeNetfilterProblem finds one, or a
// different one, and says when it is gone; statusWarnings lists it.
// Under rulesMu, as checkFirewall.
func (g *Gateway) checkBridgeNetfilter() {
	problem, err := BridgeNetfilterProblem(g.config())
	if err != nil {
		g.log.Debug("cannot check the bridges against br_netfilter", logging.Err(err))
		return
	}
	was := ""
	if p := g.bridgeNF.Load(); p != nil {
		was = *p
	}
	switch {
	case problem != "" && problem != was:
		g.log.Warn("transparent interception fails through a bridge with br_netfilter on", "detail", problem)
	case problem == "" && was != "":
		g.log.Info("transparent interception no longer meets br_netfilter on a bridge")
	}
	g.bridgeNF.Store(&problem)
}

// bridgeNetfilterWarnings is the status's line for what
// checkBridgeNetfilter last found.
func (g *Gateway) bridgeNetfilterWarnings() []string {
	if p := g.bridgeNF.Load(); p != nil && *p != "" {
		return []string{*p}
	}
	return nil
}
