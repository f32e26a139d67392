package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/logging"
	"spliced/rules"
)

// Bridged LANs and br_netfilter. With net.bridge.bridge-nf-call-iptables
// (or -ip6tables) at 1, which Docker turns on, or a bridge's own
// nf_call_iptables (nf_call_ip6tables) option on, netfilter's IP hooks
// run for packets that arrive through the bridge while the bridge
// handles them (br_nf_pre_routing runs them when either is set, and only
// with the br_netfilter module loaded). TPROXY then gives a client's SYN
// the service's listener there, the IP layer drops that assignment when
// it takes the packet over (ip_rcv's skb_orphan), and br_netfilter keeps
// the IP hooks from running a second time (ip_sabotage_in): the SYN
// meets no socket, and the client's connects are refused or time out
// (TestLabBridgedLAN: none got through, copy and spliced alike). The
// daemon cannot fix it without changing what other software relies on,
// so it says what to change.

// brnfDir holds br_netfilter's sysctls of the namespace; it exists only
// while the module is loaded.
var brnfDir = "/proc/sys/net/bridge"

// brnfState is br_netfilter's state in the namespace: loaded (its
// sysctls exist: without the module no bridge runs the IP hooks, whatever
// the bridges' own options say), and net.bridge.bridge-nf-call-iptables
// and -ip6tables.
type brnfState struct {
	loaded       bool
	call4, call6 bool
}

// readBrnf reads br_netfilter's state from dir.
func readBrnf(dir string) brnfState {
	var st brnfState
	if _, err := os.Stat(dir); err != nil {
		return st
	}
	st.loaded = true
	read := func(name string) bool {
		b, err := os.ReadFile(filepath.Join(dir, name))
		return err == nil && strings.TrimSpace(string(b)) == "1"
	}
	st.call4, st.call6 = read("bridge-nf-call-iptables"), read("bridge-nf-call-ip6tables")
	return st
}

// linkFacts is what the choice of the bpf datapath's interfaces and the
// br_netfilter check need of a link.
type linkFacts struct {
	index    uint32
	name     string
	loopback bool
	kind     string // IFLA_INFO_KIND: "bridge", "bond", "vrf", ... ("" for a plain device)
	master   uint32 // IFLA_MASTER, 0 for none
	// nfCall4, nfCall6: a bridge's own nf_call_iptables and
	// nf_call_ip6tables (ip link set BR type bridge nf_call_iptables 1)
	nfCall4, nfCall6 bool
}

// listLinks lists the namespace's links.
func listLinks() ([]linkFacts, error) {
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("list the links: %w", err)
	}
	defer c.Close()
	msgs, err := c.Link.List()
	if err != nil {
		return nil, fmt.Errorf("list the links: %w", err)
	}
	out := make([]linkFacts, 0, len(msgs))
	for _, m := range msgs {
		out = append(out, linkFactsOf(m))
	}
	return out, nil
}

// linkFactsOf extracts a link's facts from its rtnetlink message.
func linkFactsOf(m rtnetlink.LinkMessage) linkFacts {
	l := linkFacts{index: m.Index, loopback: m.Flags&unix.IFF_LOOPBACK != 0}
	a := m.Attributes
	if a == nil {
		return l
	}
	l.name = a.Name
	if a.Master != nil {
		l.master = *a.Master
	}
	if a.Info == nil {
		return l
	}
	l.kind = a.Info.Kind
	// No driver for bridges is registered (package rtnetlink/driver
	// would register its drivers for every user of the library): the
	// bridge's attributes are the raw IFLA_INFO_DATA.
	if d, ok := a.Info.Data.(*rtnetlink.LinkData); ok && l.kind == "bridge" {
		if ad, err := netlink.NewAttributeDecoder(d.Data); err == nil {
			for ad.Next() {
				switch ad.Type() {
				case unix.IFLA_BR_NF_CALL_IPTABLES:
					l.nfCall4 = ad.Uint8() != 0
				case unix.IFLA_BR_NF_CALL_IP6TABLES:
					l.nfCall6 = ad.Uint8() != 0
				}
			}
		}
	}
	return l
}

// bridgeNF is a bridge that has ports and runs the IP hooks for a family
// the transparent services intercept, and why.
type bridgeNF struct {
	name string
	// own4, own6: by its own nf_call_iptables, nf_call_ip6tables
	own4, own6 bool
}

// netfilterBridges finds, among links, the bridges br_netfilter runs the
// IP hooks for (by st, or by the bridge's own option) in a family of
// v4 and v6. A bridge without ports is left out: no client's packet
// enters it (docker0 while no container runs).
func netfilterBridges(links []linkFacts, st brnfState, v4, v6 bool) (out []bridgeNF, global4, global6 bool) {
	if !st.loaded {
		return nil, false, false
	}
	global4, global6 = v4 && st.call4, v6 && st.call6
	for _, br := range links {
		if br.kind != "bridge" || !slices.ContainsFunc(links, func(p linkFacts) bool { return p.master == br.index }) {
			continue
		}
		b := bridgeNF{name: br.name, own4: v4 && br.nfCall4, own6: v6 && br.nfCall6}
		if global4 || global6 || b.own4 || b.own6 {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return nil, false, false
	}
	return out, global4, global6
}

// transparentFamilies reports which families cfg's transparent (TPROXY)
// services intercept.
func transparentFamilies(cfg *config.Config) (v4, v6 bool) {
	for _, s := range rules.FromConfig(cfg).Services {
		f4, f6 := s.Families()
		v4, v6 = v4 || f4, v6 || f6
	}
	return v4, v6
}

// BridgeNetfilterProblem describes why transparent interception fails
// through this namespace's bridges, or is "" when it does not (no
// bridge with ports, no transparent service, br_netfilter not loaded,
// or neither the sysctls nor the bridges' own options on for the
// families the services intercept).
func BridgeNetfilterProblem(cfg *config.Config) (string, error) {
	v4, v6 := transparentFamilies(cfg)
	if !v4 && !v6 {
		return "", nil
	}
	st := readBrnf(brnfDir)
	if !st.loaded {
		return "", nil
	}
	links, err := listLinks()
	if err != nil {
		return "", err
	}
	return bridgeNetfilterProblem(netfilterBridges(links, st, v4, v6)), nil
}

// bridgeNetfilterProblem words what netfilterBridges found ("" nothing).
func bridgeNetfilterProblem(bridges []bridgeNF, global4, global6 bool) string {
	const effect = "the kernel drops the listener TPROXY gives a client's SYN, and its connects are refused or time out"
	var parts []string
	if global4 || global6 {
		var names, on, set []string
		for _, b := range bridges {
			names = append(names, b.name)
		}
		for _, k := range []struct {
			on   bool
			name string
		}{{global4, "net.bridge.bridge-nf-call-iptables"}, {global6, "net.bridge.bridge-nf-call-ip6tables"}} {
			if k.on {
				on, set = append(on, k.name), append(set, k.name+"=0")
			}
		}
		parts = append(parts, fmt.Sprintf("transparent interception fails through bridge %s while %s=1 (br_netfilter, which Docker turns on): %s. Set sysctl -w %s (Docker's filtering between containers on one bridge relies on them), or bring the clients in on an interface that is no bridge's port",
			strings.Join(names, ", "), strings.Join(on, "=1 and "), effect, strings.Join(set, " ")))
	}
	// A bridge's own option keeps the hooks running whatever the
	// sysctls say.
	for _, b := range bridges {
		var on, set []string
		if b.own4 {
			on, set = append(on, "nf_call_iptables"), append(set, "nf_call_iptables 0")
		}
		if b.own6 {
			on, set = append(on, "nf_call_ip6tables"), append(set, "nf_call_ip6tables 0")
		}
		if len(on) == 0 {
			continue
		}
		parts = append(parts, fmt.Sprintf("transparent interception fails through bridge %s while its own option %s=1 (br_netfilter, whatever the net.bridge sysctls say): %s. Set ip link set %s type bridge %s, or bring the clients in on an interface that is no bridge's port",
			b.name, strings.Join(on, "=1 and "), effect, b.name, strings.Join(set, " ")))
	}
	return strings.Join(parts, "; ")
}

// checkBridgeNetfilter reports what BridgeNetfilterProblem finds (see
// problemState); statusWarnings lists it. Under rulesMu, as
// checkFirewall.
func (g *Gateway) checkBridgeNetfilter() {
	problem, err := BridgeNetfilterProblem(g.config())
	if err != nil {
		g.log.Debug("cannot check the bridges against br_netfilter", logging.Err(err))
		return
	}
	g.bridgeNF.update(g.log, problem, slog.LevelWarn, "transparent interception fails through a bridge with br_netfilter on",
		"transparent interception no longer meets br_netfilter on a bridge")
}

// problemState is the problem a periodic check of the gateway's settings
// last found ("" none): a new or different one is logged at level with
// its detail, its end once, and the status lists it while it lasts.
type problemState struct{ last atomic.Pointer[string] }

// update records problem, logging what changed.
func (s *problemState) update(log *slog.Logger, problem string, level slog.Level, found, gone string) {
	was := ""
	if p := s.last.Load(); p != nil {
		was = *p
	}
	switch {
	case problem != "" && problem != was:
		log.Log(context.Background(), level, found, "detail", problem)
	case problem == "" && was != "":
		log.Info(gone)
	}
	s.last.Store(&problem)
}

// warnings is the status's line for the problem, if any.
func (s *problemState) warnings() []string {
	if p := s.last.Load(); p != nil && *p != "" {
		return []string{*p}
	}
	return nil
}
