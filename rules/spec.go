// Package rules programs what spliced needs in the kernel: its own nftables
// table (family inet, "spliced" by default) and policy routing. It never
// touches another table, and removes exactly what it installed.
//
// The table, as `nft list table inet spliced` shows it:
//
//	set <service>_ports, _dst4, _dst6, _src4, _src6   (interval sets)
//	chain prerouting  (filter, prerouting, priority mangle)
//	    first packet of a handshake at our socket: clear the ct mark bit
//	    SYNs: jump services
//	    packets of our transparent sockets: set the mark, accept
//	    packets with the ct mark bit (a SYN cookie's ACK): jump services
//	chain services    (per service and family: TPROXY of SYNs, setting the
//	                   ct mark bit; TPROXY of plain ACKs with that bit)
//	chain input       (filter, input, priority mangle)
//	    packets with the mark, routed to our sockets: clear the mark
//
// Intercepting on SYN only matters: a packet of a flow whose sockets are
// being torn down must never be handed to a listener (it would answer with
// a reset). The one exception is the ACK completing a handshake that the
// listener answered with a SYN cookie: no socket claims it, and the
// conntrack mark bit (Spec.CtMark) says that the listener should, until a
// socket of ours has seen a packet of the connection. Policy routing (`ip rule fwmark M/M lookup T` and a local
// default route in table T, IPv4 and IPv6) delivers marked packets to the
// local sockets. Routes and rules carry protocol RouteProtocol so a cleanup
// after a crash finds exactly ours.
//
// Everything is built from a Spec, once as netlink messages
// (google/nftables) and once as nft text (Render); a kernel round-trip test
// proves the two agree, so Render is what `spliced -check` prints.
package rules

import (
	"cmp"
	"net/netip"
	"slices"

	"spliced/config"
)

// RouteProtocol marks routes and rules installed by spliced ("proto 92" in
// `ip rule` and `ip route` output).
const RouteProtocol = 92

// Spec is the desired kernel state.
type Spec struct {
	Table        string
	Mark         uint32
	CtMark       uint32 // conntrack mark of handshakes not yet at a socket
	RouteTable   uint32
	RulePriority uint32
	Services     []Service
	Divert       Divert
	// OwnTable: the table belongs to the daemon's netlink socket (see
	// owner), so that no other process changes or deletes it.
	OwnTable bool
}

// Service is one intercepted service as the kernel sees it.
type Service struct {
	Name   string
	Listen uint16
	Ports  []config.PortRange // sorted, merged
	Dst4   []netip.Prefix     // sorted, merged; empty means any
	Dst6   []netip.Prefix
	Src4   []netip.Prefix
	Src6   []netip.Prefix
	// AnyDst/AnySrc: no destination/source restriction in the config.
	AnyDst, AnySrc bool
}

// Families reports which address families the service intercepts: a
// service restricted to IPv4 destinations has no IPv6 rule, and so on.
func (s *Service) Families() (v4, v6 bool) {
	v4 = (s.AnyDst || len(s.Dst4) > 0) && (s.AnySrc || len(s.Src4) > 0)
	v6 = (s.AnyDst || len(s.Dst6) > 0) && (s.AnySrc || len(s.Src6) > 0)
	return v4, v6
}

// FromConfig derives the kernel state a configuration asks for.
func FromConfig(cfg *config.Config) Spec {
	spec := Spec{
		Table:        cfg.Kernel.Table,
		Mark:         uint32(cfg.Kernel.Mark),
		CtMark:       uint32(cfg.Kernel.CtMark),
		RouteTable:   cfg.Kernel.RouteTable,
		RulePriority: cfg.Kernel.RulePriority,
		OwnTable:     cfg.Kernel.OwnTable == "on",
		Divert: Divert{
			Queue:   cfg.Kernel.Queue,
			Queues:  uint16(cfg.Kernel.Queues),
			Timeout: cfg.Kernel.DivertTimeout.D(),
		},
	}
	for _, s := range cfg.Services {
		if s.Splice.Mode != config.SpliceNever {
			spec.Divert.Enabled = true
		}
		if s.ListenMode == config.ListenDirect {
			continue // a plain listener: nothing to intercept
		}
		svc := Service{
			Name:   s.Name,
			Listen: uint16(s.Listen),
			Ports:  mergePorts(s.Ports),
			AnyDst: len(s.Destinations) == 0,
			AnySrc: len(s.Sources) == 0,
		}
		svc.Dst4, svc.Dst6 = splitPrefixes(s.Destinations)
		svc.Src4, svc.Src6 = splitPrefixes(s.Sources)
		spec.Services = append(spec.Services, svc)
	}
	return spec
}

func mergePorts(in []config.PortRange) []config.PortRange {
	rs := slices.Clone(in)
	slices.SortFunc(rs, func(a, b config.PortRange) int { return cmp.Compare(a.First, b.First) })
	var out []config.PortRange
	for _, r := range rs {
		if n := len(out); n > 0 && uint32(r.First) <= uint32(out[n-1].Last)+1 {
			out[n-1].Last = max(out[n-1].Last, r.Last)
			continue
		}
		out = append(out, r)
	}
	return out
}

func splitPrefixes(in []config.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range in {
		if p.Addr().Is4() {
			v4 = append(v4, p.Prefix)
		} else {
			v6 = append(v6, p.Prefix)
		}
	}
	return mergePrefixes(v4), mergePrefixes(v6)
}

// mergePrefixes sorts prefixes and drops those inside another, so that the
// interval set gets no overlapping elements.
func mergePrefixes(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	var out []netip.Prefix
	for _, p := range ps {
		if n := len(out); n > 0 && out[n-1].Overlaps(p) {
			continue // sorted: the earlier, shorter prefix contains p
		}
		out = append(out, p)
	}
	return out
}
