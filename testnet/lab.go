// Package testnet builds network-namespace labs for tests, the demo and the
// benchmarks: client hosts, one gateway and server hosts, each in its own
// namespace, joined by veth pairs with IPv4 and IPv6 addresses. The gateway
// forwards between them, so a lab is a small routed network that the host's
// own network never sees.
//
// Every client and server has its own point-to-point subnet to the gateway:
//
//	client k: 10.1.k.2/24 via 10.1.k.1, fd00:1:k::2/64 via fd00:1:k::1
//	server k: 10.2.k.2/24 via 10.2.k.1, fd00:2:k::2/64 via fd00:2:k::1
//
// Namespace names carry the process ID and a counter so that parallel test
// binaries never collide; Close removes them, and New sweeps namespaces
// left behind by processes that no longer exist.
//
// Creating a lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
package testnet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Prefix starts every namespace name a lab creates.
const Prefix = "spl-"

var labCounter atomic.Int64

// Options describe a lab. The zero value is one client, one server, default
// sysctls.
type Options struct {
	Clients int // client hosts; 0 means 1
	Servers int // server hosts; 0 means 1

	// Sysctls per role, applied after the links are up. Use them to force
	// differences between the legs, e.g. a different net.ipv4.tcp_rmem on
	// the client and the server so their window scales differ.
	ClientSysctls  map[string]string
	ServerSysctls  map[string]string
	GatewaySysctls map[string]string

	// MTU of the client-side and server-side links; 0 means 1500.
	ClientMTU, ServerMTU int

	// OffloadsOff turns the veth offloads off on every lab interface
	// (ethtool -K: segmentation, receive aggregation, checksums), so each
	// packet is one wire-sized segment with a complete checksum, as on
	// many routers' NICs, instead of 64 KB GSO packets with partial ones.
	OffloadsOff bool
}

// Host is one namespace of a lab with its addresses on its link to the
// gateway (for the gateway: its addresses towards the first client).
type Host struct {
	NS
	IPv4 netip.Addr
	IPv6 netip.Addr
	// Dev is the host's interface towards its peer (the gateway, or for the
	// gateway its first client-side interface).
	Dev string
}

// Addr returns the host's IPv4 or IPv6 address.
func (h *Host) Addr(v6 bool) netip.Addr {
	if v6 {
		return h.IPv6
	}
	return h.IPv4
}

// Lab is a running lab. Close removes every namespace it created.
type Lab struct {
	ID      string
	Clients []*Host
	Servers []*Host
	Gateway *Host

	// GatewayClientSide[k] and GatewayServerSide[k] are the gateway's
	// addresses and interface names on the link to client k and server k.
	GatewayClientSide []*Host
	GatewayServerSide []*Host

	all []*NS

	// softnet is /proc/net/softnet_stat's dropped and time_squeeze per
	// CPU when the lab was built: DropReport shows what changed since.
	softnet [][2]uint64
}

// Client is the first client host.
func (l *Lab) Client() *Host { return l.Clients[0] }

// Server is the first server host.
func (l *Lab) Server() *Host { return l.Servers[0] }

// New builds a lab. On error, everything it created is removed and the
// error says what failed; a missing tool (iproute2's ip) is reported
// before anything is created.
func New(opt Options) (*Lab, error) {
	if err := CheckTools("ip"); err != nil {
		return nil, fmt.Errorf("testnet: %w", err)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("testnet: building a lab needs root")
	}
	SweepStale()
	if opt.Clients == 0 {
		opt.Clients = 1
	}
	if opt.Servers == 0 {
		opt.Servers = 1
	}
	lab := &Lab{ID: fmt.Sprintf("%s%d-%d", Prefix, os.Getpid(), labCounter.Add(1)), softnet: softnetStat()}
	if err := lab.build(opt); err != nil {
		if cerr := lab.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove the partial lab: %w", cerr))
		}
		return nil, fmt.Errorf("testnet: build lab %s: %w", lab.ID, err)
	}
	return lab, nil
}

// build creates the lab's namespaces and links. On error, the namespaces
// created so far are in l.all for Close.
func (l *Lab) build(opt Options) error {
	gw, err := l.addNS(l.ID + "-gw")
	if err != nil {
		return err
	}
	l.Gateway = &Host{NS: *gw}
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv6.conf.all.forwarding", "1"},
		{"net.ipv6.conf.default.accept_dad", "0"},
		{"net.ipv6.conf.all.accept_dad", "0"},
	} {
		if err := gw.Sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	if _, err := gw.Run("ip", "link", "set", "lo", "up"); err != nil {
		return err
	}

	for k := 0; k < opt.Clients; k++ {
		h, gwSide, err := l.addHost(fmt.Sprintf("%s-c%d", l.ID, k), 1, k, opt.ClientMTU)
		if err != nil {
			return err
		}
		l.Clients = append(l.Clients, h)
		l.GatewayClientSide = append(l.GatewayClientSide, gwSide)
	}
	for k := 0; k < opt.Servers; k++ {
		h, gwSide, err := l.addHost(fmt.Sprintf("%s-s%d", l.ID, k), 2, k, opt.ServerMTU)
		if err != nil {
			return err
		}
		l.Servers = append(l.Servers, h)
		l.GatewayServerSide = append(l.GatewayServerSide, gwSide)
	}
	l.Gateway.IPv4 = l.GatewayClientSide[0].IPv4
	l.Gateway.IPv6 = l.GatewayClientSide[0].IPv6
	l.Gateway.Dev = l.GatewayClientSide[0].Dev

	apply := func(hosts []*Host, sysctls map[string]string) error {
		for _, h := range hosts {
			for k, v := range sysctls {
				if err := h.Sysctl(k, v); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if opt.OffloadsOff {
		if err := l.offloadsOff(); err != nil {
			return err
		}
	}
	if err := apply(l.Clients, opt.ClientSysctls); err != nil {
		return err
	}
	if err := apply(l.Servers, opt.ServerSysctls); err != nil {
		return err
	}
	return apply([]*Host{l.Gateway}, opt.GatewaySysctls)
}

// offloadsOff turns off segmentation, aggregation and checksum offloads
// at both ends of every lab link.
func (l *Lab) offloadsOff() error {
	var hosts []*Host
	hosts = append(hosts, l.Clients...)
	hosts = append(hosts, l.Servers...)
	hosts = append(hosts, l.GatewayClientSide...)
	hosts = append(hosts, l.GatewayServerSide...)
	for _, h := range hosts {
		if out, err := h.Run("ethtool", "-K", h.Dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off"); err != nil {
			return fmt.Errorf("offloads off on %s %s: %w: %s", h.Name, h.Dev, err, out)
		}
	}
	return nil
}

func (l *Lab) addNS(name string) (*NS, error) {
	ns := &NS{Name: name}
	if out, err := runHost("ip", "netns", "add", name); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, out)
	}
	l.all = append(l.all, ns)
	return ns, nil
}

// addHost creates a namespace joined to the gateway by a veth pair on the
// subnet 10.<side>.<k>.0/24 and fd00:<side>:<k>::/64.
func (l *Lab) addHost(name string, side, k, mtu int) (*Host, *Host, error) {
	ns, err := l.addNS(name)
	if err != nil {
		return nil, nil, err
	}
	if mtu == 0 {
		mtu = 1500
	}
	role := map[int]string{1: "c", 2: "s"}[side]
	gwDev := fmt.Sprintf("%s%d", role, k)
	host := &Host{NS: *ns, Dev: "eth0",
		IPv4: netip.MustParseAddr(fmt.Sprintf("10.%d.%d.2", side, k)),
		IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:%d:%x::2", side, k)),
	}
	gwSide := &Host{NS: l.Gateway.NS, Dev: gwDev,
		IPv4: netip.MustParseAddr(fmt.Sprintf("10.%d.%d.1", side, k)),
		IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:%d:%x::1", side, k)),
	}
	for _, kv := range [][2]string{
		{"net.ipv6.conf.default.accept_dad", "0"},
		{"net.ipv6.conf.all.accept_dad", "0"},
	} {
		if err := ns.Sysctl(kv[0], kv[1]); err != nil {
			return nil, nil, err
		}
	}
	mtuS := strconv.Itoa(mtu)
	steps := []struct {
		ns   *NS
		args []string
	}{
		{ns, []string{"ip", "link", "add", "eth0", "mtu", mtuS, "type", "veth", "peer", "name", gwDev, "mtu", mtuS, "netns", l.Gateway.Name}},
		{ns, []string{"ip", "link", "set", "lo", "up"}},
		{ns, []string{"ip", "link", "set", "eth0", "up"}},
		{ns, []string{"ip", "addr", "add", host.IPv4.String() + "/24", "dev", "eth0"}},
		{ns, []string{"ip", "-6", "addr", "add", host.IPv6.String() + "/64", "dev", "eth0", "nodad"}},
		{ns, []string{"ip", "route", "add", "default", "via", gwSide.IPv4.String()}},
		{ns, []string{"ip", "-6", "route", "add", "default", "via", gwSide.IPv6.String()}},
		{&l.Gateway.NS, []string{"ip", "link", "set", gwDev, "up"}},
		{&l.Gateway.NS, []string{"ip", "addr", "add", gwSide.IPv4.String() + "/24", "dev", gwDev}},
		{&l.Gateway.NS, []string{"ip", "-6", "addr", "add", gwSide.IPv6.String() + "/64", "dev", gwDev, "nodad"}},
	}
	for _, s := range steps {
		if _, err := s.ns.Run(s.args[0], s.args[1:]...); err != nil {
			return nil, nil, err
		}
	}
	return host, gwSide, nil
}

// Close removes every namespace of the lab. It is safe to call twice.
func (l *Lab) Close() error {
	var errs []error
	for i := len(l.all) - 1; i >= 0; i-- {
		if out, err := runHost("ip", "netns", "del", l.all[i].Name); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", l.all[i].Name, err, out))
		}
	}
	l.all = nil
	return errors.Join(errs...)
}

// DropReport lists, per namespace, the protocol counters whose names say
// a packet was lost or refused (drops, overflows, prunes, retransmitted
// SYNs, timeouts) and are not zero, then the kernel's per-CPU backlog
// drops (/proc/net/softnet_stat, shared by every namespace).
func (l *Lab) DropReport() string {
	var b strings.Builder
	for _, ns := range l.all {
		c, err := ns.Counters()
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", ns.Name, err)
			continue
		}
		var lost []string
		for name, v := range c {
			if v != 0 && isLossCounter(name) {
				lost = append(lost, fmt.Sprintf("%s=%d", name, v))
			}
		}
		slices.Sort(lost)
		fmt.Fprintf(&b, "%s: %s\n", ns.Name, strings.Join(lost, " "))
	}
	for cpu, now := range softnetStat() {
		var then [2]uint64
		if cpu < len(l.softnet) {
			then = l.softnet[cpu]
		}
		fmt.Fprintf(&b, "softnet cpu%d since the lab was built: dropped=%d time_squeeze=%d\n", cpu, now[0]-then[0], now[1]-then[1])
	}
	return b.String()
}

// softnetStat reads the dropped and time_squeeze columns of
// /proc/net/softnet_stat, one pair per CPU: packets the per-CPU backlog
// had no room for (net.core.netdev_max_backlog, host-wide), and receive
// runs cut short by their budget.
func softnetStat() [][2]uint64 {
	s, err := os.ReadFile("/proc/net/softnet_stat")
	if err != nil {
		return nil
	}
	var out [][2]uint64
	for _, line := range strings.Split(strings.TrimSpace(string(s)), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		dropped, _ := strconv.ParseUint(f[1], 16, 64)
		squeezed, _ := strconv.ParseUint(f[2], 16, 64)
		out = append(out, [2]uint64{dropped, squeezed})
	}
	return out
}

func isLossCounter(name string) bool {
	for _, w := range []string{"Drop", "Overflow", "Prune", "Collapse", "Timeout", "SynRetrans", "Fail", "Err", "Reset", "Abort", "Cookies", "Challenge"} {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// SweepStale removes lab namespaces whose creating process no longer
// exists (a test binary killed by a timeout cannot run its cleanups).
func SweepStale() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, Prefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(name, Prefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
			continue // still running
		}
		runHost("ip", "netns", "del", name)
	}
}

// Capture starts tshark in a namespace, writing what passes dev to file
// (a pcap), and returns a function that stops it. For debugging tests.
func (n *NS) Capture(dev, file, filter string) (stop func(), err error) {
	args := []string{"-q", "-s", "128", "-i", dev, "-w", file}
	if filter != "" {
		args = append(args, "-f", filter)
	}
	cmd := n.Command(context.Background(), "tshark", args...)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	// tshark writes the file's header once it captures; under load
	// (the race detector, a loaded machine) that takes seconds, and a
	// fixed pause loses the start of what a test wants to see.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if fi, err := os.Stat(file); err == nil && fi.Size() > 0 {
			break
		}
	}
	time.Sleep(200 * time.Millisecond)
	return func() {
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
	}, nil
}
