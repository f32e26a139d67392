package gateway

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/logging"
)

// Classic tc ingress filters and the bpf datapath's redirect. The program
// runs at tcx ingress, before an interface's classic tc ingress filters
// (an ingress or clsact qdisc's), and its redirect sends a rewritten
// packet straight to its egress device: those filters never saw it. An
// ingress shaper, as OpenWrt's SQM sets up on the WAN (an ingress qdisc
// whose filter redirects everything to an ifb device that shapes it),
// then shaped a spliced flow's downloads no more: in the lab 32 MiB came
// through an 80 Mbit/s shaper at 4.8 Gbit/s, and the ifb device saw 402
// bytes of it. On an interface with a classic ingress qdisc the program
// leaves what it rewrote to the stack (its filters run, then the kernel
// forwards it) and redirects elsewhere; the interfaces are followed as
// qdiscs come and go (TestLabIngressShaping).

// tcHIngress is TC_H_INGRESS: the parent of ingress and clsact qdiscs.
const tcHIngress = 0xFFFFFFF1

// IngressQdiscs lists the interfaces that have a classic tc ingress qdisc
// (ingress or clsact), by index.
func IngressQdiscs() ([]int, error) {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	// struct tcmsg: family, padding, ifindex, handle, parent, info; all
	// zero asks for every qdisc.
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETQDISC, Flags: netlink.Request | netlink.Dump},
		Data:   make([]byte, 20),
	})
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	var out []int
	for _, m := range msgs {
		if len(m.Data) < 20 {
			continue
		}
		if binary.NativeEndian.Uint32(m.Data[12:16]) == tcHIngress {
			out = append(out, int(int32(binary.NativeEndian.Uint32(m.Data[4:8]))))
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// followIngressQdiscs keeps the program's list of interfaces with a
// classic ingress qdisc (see above) as qdiscs come and go: at once, on
// every tc notification of rtnetlink, and every tcRecheck. It returns the
// function that stops it; a failure to listen is logged, and the list of
// the start stays.
func (g *Gateway) followIngressQdiscs(k *kernelPath) (stop func()) {
	update := func() {
		ifs, err := IngressQdiscs()
		if err != nil {
			g.log.Warn("datapath: could not list tc ingress qdiscs; spliced packets are redirected past any ingress filters", logging.Err(err))
			return
		}
		k.stackMu.Lock()
		k.qdiscs = ifs
		k.stackMu.Unlock()
		g.applyStackInterfaces(k)
	}
	stop, err := followRtnetlink(unix.RTMGRP_TC, tcRecheck, func() bool { return true }, update)
	if err != nil {
		g.log.Warn("datapath: tc ingress qdiscs added later will not be followed", logging.Err(err))
	}
	return stop
}

// applyStackInterfaces gives the program the interfaces where it leaves
// what it rewrote to the stack: those with a classic tc ingress qdisc,
// those without a link-layer header (where it does anyway), and every
// attached one while marks set at prerouting route packets
// (markroute.go). Where the program leaves packets to the stack, the
// stack's reverse path filter and forward hook see them: the checks that
// the redirect skips (reversePathRefusal, checkFirewall) apply there, to
// the interfaces listed even if the map could not take them all.
func (g *Gateway) applyStackInterfaces(k *kernelPath) {
	k.stackMu.Lock()
	defer k.stackMu.Unlock()
	ifs := g.stackSet(k.qdiscs, k.at.Interfaces())
	changed := !slices.Equal(k.stackInterfaces(), ifs)
	if changed {
		k.stack.Store(&ifs)
		select {
		case g.firewallPoke <- struct{}{}:
		default:
		}
	}
	if _, err := k.dp.SetStackInterfaces(ifs); err != nil {
		g.log.Warn("datapath: could not update the interfaces where spliced packets go through the stack", logging.Err(err))
		return
	}
	if changed {
		g.log.Info("datapath: spliced packets go through the stack where an interface has a tc ingress qdisc (its filters, an ingress shaper say, would be skipped by the redirect) or no link-layer header (a tun device, WireGuard, PPP), or everywhere while marks set at prerouting route them, and are redirected elsewhere",
			"stack_interfaces", ifaceNames(ifs), "qdisc_interfaces", ifaceNames(k.qdiscs))
	}
}

// stackSet returns the interfaces where the program leaves what it
// rewrote to the stack: qdiscs, those with a classic tc ingress qdisc;
// those of attached without a link-layer header (a tun device, WireGuard,
// PPP: the program never redirects what arrives there, bpf_redirect_neigh
// has no link-layer header to replace); and, while marks set at
// prerouting route packets, every one of attached.
func (g *Gateway) stackSet(qdiscs []int, attached []string) []int {
	ifs := slices.Clone(qdiscs)
	byName := interfaceIndexes()
	_, marks := g.markRoute.Load().active("prerouting", false)
	types := linkTypes()
	for _, name := range attached {
		if i, ok := byName[name]; ok && (marks || noLinkHeader[types[i]]) {
			ifs = append(ifs, i)
		}
	}
	slices.Sort(ifs)
	return slices.Compact(ifs)
}

// Link types of devices whose packets start with their IP header, no
// link-layer header before it.
var noLinkHeader = map[uint16]bool{
	unix.ARPHRD_NONE:    true, // tun devices (IFF_TUN), WireGuard
	unix.ARPHRD_PPP:     true, // PPP, PPPoE sessions
	unix.ARPHRD_RAWIP:   true, // cellular modems (qmi, rmnet)
	unix.ARPHRD_TUNNEL:  true, // ipip
	unix.ARPHRD_TUNNEL6: true, // ip6tnl
	unix.ARPHRD_SIT:     true,
	unix.ARPHRD_IPGRE:   true, // gre (gretap is Ethernet)
	unix.ARPHRD_IP6GRE:  true,
}

// linkTypes returns every interface's link type (ARPHRD_*) by index; an
// empty map when it cannot list them (every interface is then taken for
// one with a link-layer header, as before there was this check).
func linkTypes() map[int]uint16 {
	types := map[int]uint16{}
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETLINK, syscall.AF_UNSPEC)
	if err != nil {
		return types
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return types
	}
	for _, m := range msgs {
		if m.Header.Type == syscall.RTM_NEWLINK && len(m.Data) >= syscall.SizeofIfInfomsg {
			types[int(int32(binary.NativeEndian.Uint32(m.Data[4:8])))] = binary.NativeEndian.Uint16(m.Data[2:4])
		}
	}
	return types
}

// interfaceIndexes maps the interfaces' names to their indexes.
func interfaceIndexes() map[string]int {
	m := map[string]int{}
	if ifs, err := net.Interfaces(); err == nil {
		for _, ifc := range ifs {
			m[ifc.Name] = ifc.Index
		}
	}
	return m
}

// tcRecheck is how often followIngressQdiscs lists the qdiscs between tc
// notifications (which a busy tc configuration can overrun).
const tcRecheck = 10 * time.Second

// ifaceNames names interfaces by index, for the log.
func ifaceNames(ifindexes []int) string {
	var names []string
	for _, i := range ifindexes {
		if ifc, err := net.InterfaceByIndex(i); err == nil {
			names = append(names, ifc.Name)
		} else {
			names = append(names, fmt.Sprint(i))
		}
	}
	return strings.Join(names, ",")
}
