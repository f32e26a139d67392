package config

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// valueError is a bad scalar found while decoding; Load adds the file and
// the key path.
type valueError struct {
	line   int
	column int
	value  string
	msg    string // what is wrong and what would be valid
}

func (e *valueError) Error() string { return fmt.Sprintf("line %d: %q: %s", e.line, e.value, e.msg) }

func scalar(n *yaml.Node, want string) (string, error) {
	if n.Kind != yaml.ScalarNode {
		return "", &valueError{line: n.Line, column: n.Column, value: kindName(n), msg: "expected " + want}
	}
	return n.Value, nil
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	return n.Value
}

// Port is a TCP port, 1-65535.
type Port uint16

func (p *Port) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "a port number 1-65535")
	if err != nil {
		return err
	}
	v, err := parsePort(s)
	if err != nil {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: err.Error()}
	}
	*p = Port(v)
	return nil
}

func parsePort(s string) (uint16, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil || v == 0 || v > 65535 {
		return 0, fmt.Errorf("not a port; use 1-65535")
	}
	return uint16(v), nil
}

// PortRange is an inclusive range of ports, written "80" or "8000-8100".
type PortRange struct{ First, Last uint16 }

func (r PortRange) Contains(p uint16) bool { return p >= r.First && p <= r.Last }

func (r PortRange) Overlaps(o PortRange) bool { return r.First <= o.Last && o.First <= r.Last }

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

func (r *PortRange) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, `a port ("80") or a range ("8000-8100")`)
	if err != nil {
		return err
	}
	v, err := ParsePortRange(s)
	if err != nil {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: err.Error()}
	}
	*r = v
	return nil
}

// ParsePortRange parses "80" or "8000-8100".
func ParsePortRange(s string) (PortRange, error) {
	first, last, isRange := strings.Cut(s, "-")
	a, err := parsePort(first)
	if err != nil {
		return PortRange{}, fmt.Errorf(`not a port or port range; use 1-65535 or a range such as "8000-8100"`)
	}
	b := a
	if isRange {
		if b, err = parsePort(last); err != nil || b < a {
			return PortRange{}, fmt.Errorf(`not a port range; use "first-last" with 1 <= first <= last <= 65535`)
		}
	}
	return PortRange{a, b}, nil
}

// Prefix is an IPv4 or IPv6 prefix; a bare address means a host prefix.
type Prefix struct{ netip.Prefix }

func (p *Prefix) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "an address prefix such as 10.2.0.0/16 or fd00::/8")
	if err != nil {
		return err
	}
	v, err := ParsePrefix(s)
	if err != nil {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: err.Error()}
	}
	*p = v
	return nil
}

// ParsePrefix parses "10.2.0.0/16", "fd00::/8" or a bare address.
func ParsePrefix(s string) (Prefix, error) {
	s = strings.TrimSpace(s)
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return Prefix{}, fmt.Errorf("not an address or prefix; use e.g. 10.2.0.0/16, 10.2.0.7 or fd00::/8")
		}
		a = a.Unmap()
		return Prefix{netip.PrefixFrom(a, a.BitLen())}, nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return Prefix{}, fmt.Errorf("not an address prefix; use e.g. 10.2.0.0/16 or fd00::/8")
	}
	if p.Masked() != p {
		return Prefix{}, fmt.Errorf("has host bits set; write the network address %s", p.Masked())
	}
	if p.Addr().Is4In6() {
		// Flows have IPv4 addresses (a bare mapped address is unmapped
		// too): an IPv4-mapped prefix would match none of them.
		if p.Bits() < 96 {
			return Prefix{}, fmt.Errorf("mixes IPv4-mapped and other IPv6 addresses; write the IPv4 and IPv6 parts as separate prefixes")
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return Prefix{p}, nil
}

// Duration is a time.Duration written as "5s", "2m30s".
type Duration time.Duration

func (d Duration) D() time.Duration { return time.Duration(d) }

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, `a duration such as "5s" or "2m"`)
	if err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: `not a duration; use a positive value with a unit, such as "500ms", "5s" or "2m"`}
	}
	*d = Duration(v)
	return nil
}

// Hex32 is a 32-bit number, written in decimal or 0x hexadecimal.
type Hex32 uint32

func (h *Hex32) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "a 32-bit number such as 0x5c1")
	if err != nil {
		return err
	}
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v == 0 {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: "not a non-zero 32-bit number; use e.g. 0x5c1"}
	}
	*h = Hex32(v)
	return nil
}

// ByteSize is a number of bytes, written plainly or with a unit: "64KiB",
// "10MB", "1GiB".
type ByteSize int64

func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, `a size such as "1MiB"`)
	if err != nil {
		return err
	}
	v, err := ParseByteSize(s)
	if err != nil {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: err.Error()}
	}
	*b = ByteSize(v)
	return nil
}

// ParseByteSize parses "4096", "64KiB", "10MB", "1GiB".
func ParseByteSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	num, unit := s[:i], strings.TrimSpace(s[i:])
	mult := map[string]int64{"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || mult == 0 || v < 0 {
		return 0, fmt.Errorf(`not a size; use bytes or a number with B, KB, MB, GB, KiB, MiB or GiB, such as "1MiB"`)
	}
	if v > math.MaxInt64/mult {
		return 0, fmt.Errorf(`is too large a size; use at most 8EB`)
	}
	return v * mult, nil
}

func (m *UpstreamMode) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "transparent or nat")
	if err != nil {
		return err
	}
	switch UpstreamMode(s) {
	case Transparent, NAT:
		*m = UpstreamMode(s)
		return nil
	}
	return &valueError{line: n.Line, column: n.Column, value: s, msg: "not an upstream mode; use transparent (the server sees the client's address) or nat (the server sees the gateway's)"}
}

func (a *Action) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "allow or deny")
	if err != nil {
		return err
	}
	switch Action(s) {
	case Allow, Deny:
		*a = Action(s)
		return nil
	}
	return &valueError{line: n.Line, column: n.Column, value: s, msg: "not an action; use allow or deny"}
}

func (m *SpliceMode) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "never, immediate, bytes or time")
	if err != nil {
		return err
	}
	switch SpliceMode(s) {
	case SpliceNever, SpliceImmediate, SpliceBytes, SpliceTime:
		*m = SpliceMode(s)
		return nil
	}
	return &valueError{line: n.Line, column: n.Column, value: s, msg: "not a splice mode; use never, immediate (right after connect), bytes (after splice.bytes) or time (after splice.after)"}
}

// Addr is an IPv4 or IPv6 address; the zero value means unset.
type Addr struct{ netip.Addr }

func (a *Addr) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "an address such as 10.2.0.1 or fd00::1")
	if err != nil {
		return err
	}
	if strings.TrimSpace(s) == "" {
		*a = Addr{} // unset: the default applies
		return nil
	}
	v, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil || v.Zone() != "" {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: "not an address; use e.g. 10.2.0.1 or fd00::1"}
	}
	a.Addr = v.Unmap()
	return nil
}

func (k *ProxyKind) UnmarshalYAML(n *yaml.Node) error {
	kinds := orList(ProxyKinds())
	s, err := scalar(n, kinds)
	if err != nil {
		return err
	}
	if LookupProxy(ProxyKind(s)) == nil {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: "is not a proxy; use " + kinds}
	}
	*k = ProxyKind(s)
	return nil
}

func (m *ListenMode) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "transparent or direct")
	if err != nil {
		return err
	}
	switch ListenMode(s) {
	case ListenTransparent, ListenDirect:
		*m = ListenMode(s)
		return nil
	}
	return &valueError{line: n.Line, column: n.Column, value: s, msg: "is not a listen mode; use transparent (intercept the service's ports with TPROXY) or direct (listen on listen_on like any server)"}
}

// AddrPort is "address:port", such as 10.2.0.2:8080 or [fd00::2]:8080.
type AddrPort struct{ netip.AddrPort }

func (a *AddrPort) UnmarshalYAML(n *yaml.Node) error {
	s, err := scalar(n, "an address and port such as 10.2.0.2:8080 or [fd00::2]:8080")
	if err != nil {
		return err
	}
	v, err := netip.ParseAddrPort(strings.TrimSpace(s))
	if err != nil || v.Port() == 0 || v.Addr().Zone() != "" {
		return &valueError{line: n.Line, column: n.Column, value: s, msg: "not an address and port; use e.g. 10.2.0.2:8080 or [fd00::2]:8080"}
	}
	a.AddrPort = netip.AddrPortFrom(v.Addr().Unmap(), v.Port())
	return nil
}
