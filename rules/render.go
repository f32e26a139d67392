package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"spliced/config"
)

// Set names of a service. Service names are restricted by config to
// [a-z][a-z0-9_]*, so these are valid nft identifiers.
func portsSet(svc string) string { return svc + "_ports" }
func addrSet(svc, dir string, v6 bool) string {
	if v6 {
		return svc + "_" + dir + "6"
	}
	return svc + "_" + dir + "4"
}

// setDef is one named set of the table, shared by Render and the netlink
// builder so the two cannot disagree on what exists.
type setDef struct {
	name  string
	ports []config.PortRange // for inet_service sets
	addrs []netip.Prefix     // for address sets
	v6    bool
}

func (d setDef) typ() string {
	switch {
	case d.ports != nil:
		return "inet_service"
	case d.v6:
		return "ipv6_addr"
	}
	return "ipv4_addr"
}

// sets lists the sets of a service in the order they are created.
func (s *Service) sets() []setDef {
	out := []setDef{{name: portsSet(s.Name), ports: s.Ports}}
	v4, v6 := s.Families()
	add := func(dir string, p4, p6 []netip.Prefix, any bool) {
		if any {
			return
		}
		if v4 {
			out = append(out, setDef{name: addrSet(s.Name, dir, false), addrs: p4})
		}
		if v6 {
			out = append(out, setDef{name: addrSet(s.Name, dir, true), addrs: p6, v6: true})
		}
	}
	add("src", s.Src4, s.Src6, s.AnySrc)
	add("dst", s.Dst4, s.Dst6, s.AnyDst)
	return out
}

// Chain names in our table.
const (
	ChainPrerouting = "prerouting"
	ChainServices   = "services"
	ChainSockets    = "sockets"
	ChainInput      = "input"
)

// Render returns the table as `nft list table inet NAME` prints it, with
// one exception: where the kernel lacks the nft queue expression the
// divert rules end in the xtables NFQUEUE target, which Render shows as the
// equivalent queue statement but an nft built without xtables support
// lists as nothing (see Listing).
func Render(spec Spec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", spec.Table)
	var blocks, divertChains []string
	if spec.Divert.Enabled {
		var sets []string
		sets, divertChains = renderDivert(&spec.Divert)
		blocks = append(blocks, sets...)
	}
	for i := range spec.Services {
		for _, d := range spec.Services[i].sets() {
			blocks = append(blocks, renderSet(d))
		}
	}
	blocks = append(blocks, divertChains...)
	var pre []string
	if spec.Divert.Enabled && spec.Divert.SkipMark != 0 {
		pre = append(pre, fmt.Sprintf("meta mark & 0x%08x == 0x%08x accept", spec.Divert.SkipMark, spec.Divert.SkipMark))
	}
	blocks = append(blocks, renderChain(ChainPrerouting, "type filter hook prerouting priority mangle; policy accept;", append(pre,
		fmt.Sprintf("meta l4proto tcp %s socket transparent 1 socket wildcard 0 ct mark set ct mark & 0x%08x", ctMarkMatch(spec.CtMark), ^spec.CtMark),
		"tcp flags syn / syn,ack jump "+ChainServices,
		"meta l4proto tcp socket transparent 1 jump "+ChainSockets,
		fmt.Sprintf("meta l4proto icmp socket transparent 1 socket wildcard 0 %s accept", markSet(spec.Mark)),
		fmt.Sprintf("meta l4proto ipv6-icmp socket transparent 1 socket wildcard 0 %s accept", markSet(spec.Mark)),
		fmt.Sprintf("%s jump %s", ctMarkMatch(spec.CtMark), ChainServices),
	)))
	var svcRules []string
	for i := range spec.Services {
		svcRules = append(svcRules, serviceRuleText(spec, &spec.Services[i])...)
	}
	blocks = append(blocks, renderChain(ChainServices, "", svcRules))
	blocks = append(blocks, renderChain(ChainSockets, "", []string{
		"socket wildcard 1 return",
		fmt.Sprintf("%s accept", markSet(spec.Mark)),
	}))
	blocks = append(blocks, renderChain(ChainInput, "type filter hook input priority mangle; policy accept;", []string{
		fmt.Sprintf("meta mark & 0x%08x == 0x%08x meta mark set meta mark & 0x%08x", spec.Mark, spec.Mark, ^spec.Mark),
	}))
	b.WriteString(strings.Join(blocks, "\n"))
	b.WriteString("}\n")
	return b.String()
}

// Listing is Render as this machine's nft lists the installed table: the
// xtables NFQUEUE target of the divert rules is invisible to it.
func Listing(spec Spec) string {
	out := Render(spec)
	if spec.Divert.Enabled && !spec.Divert.NativeQueue {
		for i := range spec.Divert.Queues {
			q := queueStatement(spec.Divert.Queue + i)
			out = strings.ReplaceAll(out, " notrack "+q+"\n", " notrack \n")
			out = strings.ReplaceAll(out, " notrack "+q+" bypass\n", " notrack \n")
		}
	}
	return out
}

func renderSet(d setDef) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags interval\n", d.name, d.typ())
	var elems []string
	for _, r := range d.ports {
		elems = append(elems, r.String())
	}
	for _, p := range d.addrs {
		if p.IsSingleIP() {
			elems = append(elems, nftAddr(p.Addr()))
		} else {
			elems = append(elems, fmt.Sprintf("%s/%d", nftAddr(p.Addr()), p.Bits()))
		}
	}
	if len(elems) > 0 {
		fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
	}
	b.WriteString("\t}\n")
	return b.String()
}

// nftAddr formats an address as nft lists it. nft writes IPv6 addresses
// with inet_ntop, which (glibc's) writes the last 32 bits of an
// IPv4-compatible address (the first 96 bits zero, the next 16 not) as
// an IPv4 address: ::10.1.0.0 where Go writes ::a01:0. Without this a
// service with such a prefix differed from its expected listing for
// good, and every drift check reinstalled the table. (IPv4-mapped
// addresses, which both write alike, never get here: config reads them
// as IPv4.)
func nftAddr(a netip.Addr) string {
	if b := a.As16(); a.Is6() && [12]byte(b[:12]) == [12]byte{} && (b[12] != 0 || b[13] != 0) {
		return "::" + netip.AddrFrom4([4]byte(b[12:])).String()
	}
	return a.String()
}

func renderChain(name, hook string, rules []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\tchain %s {\n", name)
	if hook != "" {
		fmt.Fprintf(&b, "\t\t%s\n", hook)
	}
	for _, r := range rules {
		fmt.Fprintf(&b, "\t\t%s\n", r)
	}
	b.WriteString("\t}\n")
	return b.String()
}

func ctMarkMatch(mark uint32) string {
	return fmt.Sprintf("ct mark & 0x%08x == 0x%08x", mark, mark)
}

func markSet(mark uint32) string {
	return fmt.Sprintf("meta mark set meta mark | 0x%08x", mark)
}

// serviceRuleText renders the TPROXY rules of one service, IPv4 first.
func serviceRuleText(spec Spec, s *Service) []string {
	var out []string
	v4, v6 := s.Families()
	for _, fam := range []struct {
		on        bool
		v6        bool
		ip, proto string
	}{{v4, false, "ip", "ipv4"}, {v6, true, "ip6", "ipv6"}} {
		if !fam.on {
			continue
		}
		var r []string
		if s.AnySrc && s.AnyDst {
			// With an address match nft infers the family; without, it
			// shows the explicit dependency.
			r = append(r, "meta nfproto "+fam.proto)
		}
		r = append(r, "tcp dport @"+portsSet(s.Name))
		if !s.AnySrc {
			r = append(r, fmt.Sprintf("%s saddr @%s", fam.ip, addrSet(s.Name, "src", fam.v6)))
		}
		if !s.AnyDst {
			r = append(r, fmt.Sprintf("%s daddr @%s", fam.ip, addrSet(s.Name, "dst", fam.v6)))
		}
		comment := fmt.Sprintf("comment %q", ruleComment(s))
		tproxy := fmt.Sprintf("tproxy %s to :%d accept %s", fam.ip, s.Listen, comment)
		ct := append(slices.Clip(r), "tcp flags syn / syn,ack", fmt.Sprintf("ct mark set ct mark | 0x%08x", spec.CtMark), comment)
		syn := append(slices.Clip(r), "tcp flags syn / syn,ack", markSet(spec.Mark), tproxy)
		ack := append(slices.Clip(r), ctMarkMatch(spec.CtMark), "tcp flags ack / syn,rst,ack", markSet(spec.Mark), tproxy)
		out = append(out, strings.Join(ct, " "), strings.Join(syn, " "), strings.Join(ack, " "))
	}
	return out
}

func ruleComment(s *Service) string { return "service " + s.Name }
