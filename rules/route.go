package rules

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// loopbackIndex is the interface index of lo in every network namespace.
const loopbackIndex = 1

var families = []uint8{unix.AF_INET, unix.AF_INET6}

func familyName(f uint8) string {
	if f == unix.AF_INET6 {
		return "IPv6"
	}
	return "IPv4"
}

// ourRule is the policy rule for one family: fwmark M/M lookup T.
func (spec *Spec) ourRule(family uint8) *rtnetlink.RuleMessage {
	mark, table, prio := spec.Mark, spec.RouteTable, spec.RulePriority
	proto := uint8(RouteProtocol)
	return &rtnetlink.RuleMessage{
		Family: family,
		Table:  unix.RT_TABLE_UNSPEC,
		Action: unix.FR_ACT_TO_TBL,
		Attributes: &rtnetlink.RuleAttributes{
			FwMark: &mark, FwMask: &mark, Table: &table, Priority: &prio, Protocol: &proto,
		},
	}
}

// ourRoute is the local default route for one family in our table:
// "local 0.0.0.0/0 dev lo table T" (and ::/0).
func (spec *Spec) ourRoute(family uint8) *rtnetlink.RouteMessage {
	dst := net.IPv4zero.To4()
	if family == unix.AF_INET6 {
		dst = net.IPv6zero
	}
	return &rtnetlink.RouteMessage{
		Family:   family,
		Table:    unix.RT_TABLE_UNSPEC,
		Protocol: RouteProtocol,
		Scope:    unix.RT_SCOPE_HOST,
		Type:     unix.RTN_LOCAL,
		Attributes: rtnetlink.RouteAttributes{
			Dst: dst, OutIface: loopbackIndex, Table: spec.RouteTable,
		},
	}
}

// isOurRule reports whether r was installed by spliced for this spec's
// mark (any table or priority: a cleanup must also find the rules of an
// earlier configuration with the same mark).
func isOurRule(r *rtnetlink.RuleMessage, mark uint32) bool {
	a := r.Attributes
	return a != nil && a.Protocol != nil && *a.Protocol == RouteProtocol &&
		a.FwMark != nil && *a.FwMark == mark
}

func installRouting(rt *rtnetlink.Conn, spec *Spec) error {
	existing, err := rt.Rule.List()
	if err != nil {
		return fmt.Errorf("list ip rules: %w", err)
	}
	for _, fam := range families {
		want := spec.ourRule(fam)
		if !hasRule(existing, want) {
			if err := rt.Rule.Add(want); err != nil {
				return fmt.Errorf("add %s rule fwmark 0x%x lookup %d: %w%s", familyName(fam), spec.Mark, spec.RouteTable, err, ipv6Off(fam, err))
			}
		}
		if err := rt.Route.Replace(spec.ourRoute(fam)); err != nil {
			return fmt.Errorf("add %s local route in table %d: %w%s", familyName(fam), spec.RouteTable, err, ipv6Off(fam, err))
		}
	}
	return nil
}

// lo's disable_ipv6 sysctl (of the network namespace of the thread that
// opens it).
const loDisableIPv6 = "/proc/sys/net/ipv6/conf/lo/disable_ipv6"

// ipv6Off explains an IPv6 routing error that comes from IPv6 being
// disabled, which alone reads as a missing permission: the kernel
// refuses a route on lo with EACCES while lo's disable_ipv6 is set (as
// net.ipv6.conf.all.disable_ipv6=1 sets it), and every IPv6 request with
// EAFNOSUPPORT when the kernel runs with ipv6.disable=1. "" otherwise.
func ipv6Off(fam uint8, err error) string {
	if fam != unix.AF_INET6 {
		return ""
	}
	switch {
	case errors.Is(err, unix.EAFNOSUPPORT):
		return " (IPv6 is disabled in this kernel, ipv6.disable=1 on its command line: spliced needs IPv6 in the kernel for its policy routing; boot without it)"
	case errors.Is(err, unix.EACCES):
		if b, rerr := os.ReadFile(loDisableIPv6); rerr == nil && strings.TrimSpace(string(b)) == "1" {
			return " (IPv6 is disabled on lo, net.ipv6.conf.lo.disable_ipv6=1, as net.ipv6.conf.all.disable_ipv6=1 sets it: spliced's local route for intercepted IPv6 packets is on lo; set net.ipv6.conf.lo.disable_ipv6=0, which enables IPv6 on no other interface)"
		}
	}
	return ""
}

func hasRule(rules []rtnetlink.RuleMessage, want *rtnetlink.RuleMessage) bool {
	w := want.Attributes
	for i := range rules {
		r := &rules[i]
		a := r.Attributes
		if r.Family == want.Family && isOurRule(r, *w.FwMark) && a.FwMask != nil && *a.FwMask == *w.FwMask &&
			a.Table != nil && *a.Table == *w.Table && a.Priority != nil && *a.Priority == *w.Priority {
			return true
		}
	}
	return false
}

// removeRouting deletes every rule of ours with the spec's mark and every
// route of ours in the spec's table. Missing ones are not an error.
func removeRouting(rt *rtnetlink.Conn, spec *Spec) error {
	var errs []error
	rules, err := rt.Rule.List()
	if err != nil {
		return fmt.Errorf("list ip rules: %w", err)
	}
	for i := range rules {
		if isOurRule(&rules[i], spec.Mark) {
			if err := rt.Rule.Delete(&rules[i]); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("delete %s rule fwmark 0x%x: %w", familyName(rules[i].Family), spec.Mark, err))
			}
		}
	}
	routes, err := rt.Route.List()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list routes: %w", err))...)
	}
	for i := range routes {
		r := &routes[i]
		if r.Protocol == RouteProtocol && r.Attributes.Table == spec.RouteTable {
			if err := rt.Route.Delete(r); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("delete %s route in table %d: %w", familyName(r.Family), spec.RouteTable, err))
			}
		}
	}
	return errors.Join(errs...)
}

// routingState lists what of ours is installed, for tests and drift checks.
func routingState(rt *rtnetlink.Conn, spec *Spec) (rules, routes int, err error) {
	rs, err := rt.Rule.List()
	if err != nil {
		return 0, 0, err
	}
	for i := range rs {
		if isOurRule(&rs[i], spec.Mark) {
			rules++
		}
	}
	rts, err := rt.Route.List()
	if err != nil {
		return 0, 0, err
	}
	for i := range rts {
		if rts[i].Protocol == RouteProtocol && rts[i].Attributes.Table == spec.RouteTable {
			routes++
		}
	}
	return rules, routes, nil
}

func isNotFound(err error) bool {
	var oe *netlink.OpError
	if errors.As(err, &oe) {
		return errors.Is(oe.Err, unix.ENOENT) || errors.Is(oe.Err, unix.ESRCH)
	}
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH)
}
