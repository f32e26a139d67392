package gateway

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/testnet"
)

// TestBridgeNetfilterProblem: which bridges the br_netfilter warning
// names, and what it says to change. br_nf_pre_routing runs the IP hooks
// when the sysctl or the bridge's own nf_call_iptables option is on: a
// bridge with its option on still breaks interception after the sysctls
// the warning named were set to 0 (the warning was withdrawn while
// nothing got through). A bridge without ports carries no client's
// packets (docker0 on a host with no container running) and is not
// named; nor is a family no transparent service intercepts; nor
// anything while br_netfilter is not loaded (its sysctls absent).
func TestBridgeNetfilterProblem(t *testing.T) {
	links := []linkFacts{
		{index: 1, name: "lo", loopback: true},
		{index: 2, name: "wan"},
		{index: 3, name: "br-lan", kind: "bridge"},
		{index: 4, name: "lan1", master: 3},
		{index: 5, name: "docker0", kind: "bridge", nfCall4: true}, // no port
		{index: 6, name: "br-guest", kind: "bridge", nfCall4: true, nfCall6: true},
		{index: 7, name: "guest1", master: 6},
	}
	on := brnfState{loaded: true, call4: true, call6: true}
	off := brnfState{loaded: true}
	for _, tc := range []struct {
		name   string
		st     brnfState
		v4, v6 bool
		want   []string // substrings, in order; none: no problem
	}{
		{"sysctls on", on, true, true, []string{
			"transparent interception fails through bridge br-lan, br-guest while net.bridge.bridge-nf-call-iptables=1 and net.bridge.bridge-nf-call-ip6tables=1 (br_netfilter",
			"Set sysctl -w net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 (",
			"; transparent interception fails through bridge br-guest while its own option nf_call_iptables=1 and nf_call_ip6tables=1",
			"Set ip link set br-guest type bridge nf_call_iptables 0 nf_call_ip6tables 0,",
		}},
		{"sysctls at 0, a bridge's own option on", off, true, true, []string{
			"transparent interception fails through bridge br-guest while its own option nf_call_iptables=1 and nf_call_ip6tables=1 (br_netfilter, whatever",
		}},
		{"IPv6 services only, the IPv4 sysctl on", brnfState{loaded: true, call4: true}, false, true, []string{
			"through bridge br-guest while its own option nf_call_ip6tables=1 (",
			"type bridge nf_call_ip6tables 0,",
		}},
		{"IPv4 services only, the IPv6 sysctl on", brnfState{loaded: true, call6: true}, true, false, []string{
			"through bridge br-guest while its own option nf_call_iptables=1 (",
		}},
		{"br_netfilter not loaded", brnfState{}, true, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := bridgeNetfilterProblem(netfilterBridges(links, tc.st, tc.v4, tc.v6))
			if len(tc.want) == 0 {
				if got != "" {
					t.Fatalf("problem %q, want none", got)
				}
				return
			}
			rest := got
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("problem %q\nlacks (in order) %q", got, w)
				}
				rest = rest[i+len(w):]
			}
			if strings.Contains(got, "docker0") {
				t.Errorf("problem %q names a bridge without ports", got)
			}
			if !tc.v4 && (strings.Contains(got, "nf_call_iptables") || strings.Contains(got, "nf-call-iptables")) {
				t.Errorf("problem %q names IPv4 for IPv6 services", got)
			}
		})
	}
	// Only the families of the services' own set are counted.
	if _, g4, g6 := netfilterBridges(links, brnfState{loaded: true, call6: true}, true, false); g4 || g6 {
		t.Errorf("the IPv6 sysctl counted for IPv4 services (%v %v)", g4, g6)
	}
}

// TestTransparentFamilies: the families a configuration's transparent
// services intercept; direct services intercept nothing.
func TestTransparentFamilies(t *testing.T) {
	v4src := config.Service{Name: "a", Sources: []config.Prefix{{Prefix: netip.MustParsePrefix("192.168.1.0/24")}}}
	direct := config.Service{Name: "s", ListenMode: config.ListenDirect}
	anyFam := config.Service{Name: "b"}
	for _, tc := range []struct {
		svcs   []config.Service
		v4, v6 bool
	}{
		{[]config.Service{v4src}, true, false},
		{[]config.Service{direct}, false, false},
		{[]config.Service{v4src, anyFam}, true, true},
	} {
		if v4, v6 := transparentFamilies(&config.Config{Services: tc.svcs}); v4 != tc.v4 || v6 != tc.v6 {
			t.Errorf("%v: families %v %v, want %v %v", tc.svcs, v4, v6, tc.v4, tc.v6)
		}
	}
}

// TestReadBrnf: br_netfilter counts as loaded when its sysctls exist.
func TestReadBrnf(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "bridge")
	if st := readBrnf(dir); st != (brnfState{}) {
		t.Fatalf("absent: %+v", st)
	}
	os.Mkdir(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "bridge-nf-call-iptables"), []byte("0\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "bridge-nf-call-ip6tables"), []byte("1\n"), 0o644)
	if st := readBrnf(dir); st != (brnfState{loaded: true, call6: true}) {
		t.Fatalf("present: %+v", st)
	}
}

// TestLinkFactsOf: a bridge's own nf_call options come from its raw
// IFLA_INFO_DATA (no bridge driver is registered with rtnetlink).
func TestLinkFactsOf(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(unix.IFLA_BR_FORWARD_DELAY, 1500)
	ae.Uint8(unix.IFLA_BR_NF_CALL_IPTABLES, 0)
	ae.Uint8(unix.IFLA_BR_NF_CALL_IP6TABLES, 1)
	data, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	master := uint32(9)
	l := linkFactsOf(rtnetlink.LinkMessage{Index: 3, Attributes: &rtnetlink.LinkAttributes{
		Name: "br0", Master: &master, Info: &rtnetlink.LinkInfo{Kind: "bridge", Data: &rtnetlink.LinkData{Name: "bridge", Data: data}}}})
	if want := (linkFacts{index: 3, name: "br0", kind: "bridge", master: 9, nfCall6: true}); l != want {
		t.Errorf("facts %+v, want %+v", l, want)
	}
}

// TestListLinksBridge: the kernel's own listing, in a scratch namespace:
// a bridge with nf_call_iptables on and its port.
func TestListLinksBridge(t *testing.T) {
	ns := testnet.Scratch(t)
	for _, c := range [][]string{
		{"link", "add", "br9", "type", "bridge", "nf_call_iptables", "1"},
		{"link", "add", "p9", "type", "veth", "peer", "name", "q9"},
		{"link", "set", "p9", "master", "br9"},
	} {
		ns.MustRun("ip", c...)
	}
	var links []linkFacts
	if err := ns.Do(func() (err error) { links, err = listLinks(); return err }); err != nil {
		t.Fatal(err)
	}
	by := map[string]linkFacts{}
	for _, l := range links {
		by[l.name] = l
	}
	br, p, q := by["br9"], by["p9"], by["q9"]
	if br.kind != "bridge" || !br.nfCall4 || br.nfCall6 || p.master != br.index || q.master != 0 || q.kind != "veth" || !by["lo"].loopback {
		t.Errorf("links %+v", links)
	}
}

// TestBridgeNetfilterProblemLive: BridgeNetfilterProblem in a scratch
// namespace. With the sysctls at 0 (what the warning says to set), a
// bridge whose own nf_call_iptables is on still runs the IP hooks: the
// warning must stay, with the ip link command. With the sysctls at 1, a
// bridge without ports (docker0 before any container) is not named.
func TestBridgeNetfilterProblemLive(t *testing.T) {
	if _, err := os.Stat(brnfDir); err != nil {
		t.Skip("br_netfilter is not loaded")
	}
	ns := testnet.Scratch(t)
	cfg := &config.Config{Services: []config.Service{{Name: "web", Ports: []config.PortRange{{First: 80, Last: 80}}}}}
	problem := func() string {
		var p string
		if err := ns.Do(func() (err error) { p, err = BridgeNetfilterProblem(cfg); return err }); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ns.MustRun("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
	for _, c := range [][]string{
		{"link", "add", "br9", "type", "bridge", "nf_call_iptables", "1"},
		{"link", "add", "p9", "type", "veth", "peer", "name", "q9"},
		{"link", "set", "p9", "master", "br9"},
	} {
		ns.MustRun("ip", c...)
	}
	if p := problem(); !strings.Contains(p, "through bridge br9 while its own option nf_call_iptables=1") || !strings.Contains(p, "ip link set br9 type bridge nf_call_iptables 0") {
		t.Errorf("sysctls at 0, br9's own option on: problem %q", p)
	}
	ns.MustRun("ip", "link", "set", "br9", "type", "bridge", "nf_call_iptables", "0")
	if p := problem(); p != "" {
		t.Errorf("all off: problem %q", p)
	}
	ns.MustRun("ip", "link", "add", "docker9", "type", "bridge")
	ns.MustRun("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
	if p := problem(); !strings.Contains(p, "through bridge br9 while net.bridge.bridge-nf-call-iptables=1 (") {
		t.Errorf("the IPv4 sysctl on: problem %q, want br9 alone", p)
	}
}

// TestDefaultInterfaces: the bpf datapath's default interfaces. A
// bridge's port is left out (the program sits at the bridge), except
// where br_netfilter runs the IP hooks for the bridge: they run inside
// the bridge, before its ingress, and the divert chain among them would
// queue every packet of a promoted flow. A bond's slave is left out
// (its bond sees its packets first), a bond that is a bridge's port too;
// a VRF's slave stays (the VRF's ingress never sees its packets).
func TestDefaultInterfaces(t *testing.T) {
	links := []linkFacts{
		{index: 1, name: "lo", loopback: true},
		{index: 2, name: "wan"},
		{index: 3, name: "br-lan", kind: "bridge"},
		{index: 4, name: "lan1", master: 3},
		{index: 5, name: "bond0", kind: "bond", master: 3},
		{index: 6, name: "eth2", master: 5},
		{index: 7, name: "eth3", master: 5},
		{index: 8, name: "vrf-blue", kind: "vrf"},
		{index: 9, name: "eth4", master: 8},
		{index: 10, name: "br-own", kind: "bridge", nfCall6: true},
		{index: 11, name: "own1", master: 10},
		{index: 12, name: "team0", kind: "team"},
		{index: 13, name: "eth5", master: 12},
	}
	for _, tc := range []struct {
		name string
		st   brnfState
		want string
	}{
		{"no br_netfilter", brnfState{}, "wan br-lan vrf-blue eth4 br-own team0"},
		{"sysctls at 0, one bridge's own option on", brnfState{loaded: true}, "wan br-lan vrf-blue eth4 br-own own1 team0"},
		{"the IPv4 sysctl on", brnfState{loaded: true, call4: true}, "wan br-lan lan1 bond0 vrf-blue eth4 br-own own1 team0"},
	} {
		if got := strings.Join(defaultInterfaces(links, tc.st), " "); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestWaitLinks: followInterfaces' wait ends on a link notification, on
// a change only a periodic look finds (br_netfilter's sysctls), and with
// an error when the connection is closed.
func TestWaitLinks(t *testing.T) {
	ns := testnet.Scratch(t)
	var conn *netlink.Conn
	if err := ns.Do(func() (err error) {
		conn, err = netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{Groups: unix.RTMGRP_LINK})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	wait := func(changed func() bool) <-chan error {
		ch := make(chan error, 1)
		go func() { ch <- waitLinks(conn, 20*time.Millisecond, changed) }()
		return ch
	}
	never := func() bool { return false }
	ch := wait(never)
	time.Sleep(100 * time.Millisecond)
	ns.MustRun("ip", "link", "add", "d9", "type", "bridge")
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("a link notification: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a link notification did not end the wait")
	}
	// Drain what else the new link sent.
	for {
		conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := conn.Receive(); err != nil {
			break
		}
	}
	var asked atomic.Int32
	ch = wait(func() bool { return asked.Add(1) == 3 })
	select {
	case err := <-ch:
		if err != nil || asked.Load() != 3 {
			t.Fatalf("a change: %v after %d looks", err, asked.Load())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a change did not end the wait")
	}
	ch = wait(never)
	time.Sleep(50 * time.Millisecond)
	conn.Close()
	select {
	case err := <-ch:
		if err == nil {
			t.Fatal("no error after the connection closed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("closing the connection did not end the wait")
	}
}

// TestInterfacesBridgeNetfilterLive: Interfaces in a scratch namespace.
// A bridge's port is left out while br_netfilter does not run for the
// bridge, and attached to once it does (here by the bridge's own
// nf_call_iptables, then by the sysctl).
func TestInterfacesBridgeNetfilterLive(t *testing.T) {
	if _, err := os.Stat(brnfDir); err != nil {
		t.Skip("br_netfilter is not loaded")
	}
	ns := testnet.Scratch(t)
	ns.MustRun("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
	for _, c := range [][]string{
		{"link", "add", "br9", "type", "bridge"},
		{"link", "add", "p9", "type", "veth", "peer", "name", "q9"},
		{"link", "set", "p9", "master", "br9"},
	} {
		ns.MustRun("ip", c...)
	}
	ifaces := func() string {
		var out []string
		if err := ns.Do(func() (err error) { out, err = Interfaces(&config.Config{}); return err }); err != nil {
			t.Fatal(err)
		}
		return strings.Join(out, " ")
	}
	if got, want := ifaces(), "br9 q9"; got != want {
		t.Errorf("br_netfilter off: %q, want %q", got, want)
	}
	ns.MustRun("ip", "link", "set", "br9", "type", "bridge", "nf_call_iptables", "1")
	if got, want := ifaces(), "br9 q9 p9"; got != want {
		t.Errorf("br9's own nf_call_iptables on: %q, want %q", got, want)
	}
	ns.MustRun("ip", "link", "set", "br9", "type", "bridge", "nf_call_iptables", "0")
	ns.MustRun("sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=1")
	if got, want := ifaces(), "br9 q9 p9"; got != want {
		t.Errorf("the IPv6 sysctl on: %q, want %q", got, want)
	}
}
