package socks5

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Protocol constants (RFC 1928, RFC 1929).
const (
	version     = 0x05
	authVersion = 0x01

	MethodNone     = 0x00
	MethodPassword = 0x02
	MethodRefused  = 0xff

	CmdConnect      = 0x01
	CmdBind         = 0x02
	CmdUDPAssociate = 0x03

	AtypIPv4   = 0x01
	AtypDomain = 0x03
	AtypIPv6   = 0x04
)

// Reply is the REP field of a SOCKS5 reply.
type Reply byte

const (
	Succeeded           Reply = 0x00
	GeneralFailure      Reply = 0x01
	NotAllowed          Reply = 0x02 // connection not allowed by ruleset
	NetworkUnreachable  Reply = 0x03
	HostUnreachable     Reply = 0x04
	ConnectionRefused   Reply = 0x05
	TTLExpired          Reply = 0x06
	CommandNotSupported Reply = 0x07
	AtypNotSupported    Reply = 0x08
)

func (r Reply) String() string {
	switch r {
	case Succeeded:
		return "succeeded"
	case GeneralFailure:
		return "general_failure"
	case NotAllowed:
		return "not_allowed"
	case NetworkUnreachable:
		return "network_unreachable"
	case HostUnreachable:
		return "host_unreachable"
	case ConnectionRefused:
		return "connection_refused"
	case TTLExpired:
		return "ttl_expired"
	case CommandNotSupported:
		return "command_not_supported"
	case AtypNotSupported:
		return "address_type_not_supported"
	}
	return fmt.Sprintf("reply_0x%02x", byte(r))
}

// Errors of a handshake that end it without a reply of its own.
var (
	errVersion     = errors.New("not SOCKS version 5")
	errAuthVersion = errors.New("not username/password version 1")
	errNoMethods   = errors.New("greeting offers no method")
	errEmptyField  = errors.New("empty username or password")
)

// readGreeting reads VER NMETHODS METHODS and returns the methods.
func readGreeting(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if hdr[0] != version {
		return nil, fmt.Errorf("%w (greeting starts with 0x%02x)", errVersion, hdr[0])
	}
	if hdr[1] == 0 {
		return nil, errNoMethods
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return nil, err
	}
	return methods, nil
}

// readCredentials reads an RFC 1929 request: VER ULEN UNAME PLEN PASSWD.
// Both fields are at most 255 bytes by construction; empty ones are
// refused.
func readCredentials(r io.Reader) (user string, pass []byte, err error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "", nil, err
	}
	if hdr[0] != authVersion {
		return "", nil, fmt.Errorf("%w (0x%02x)", errAuthVersion, hdr[0])
	}
	ubuf := make([]byte, int(hdr[1])+1) // the name, then PLEN
	if _, err := io.ReadFull(r, ubuf); err != nil {
		return "", nil, err
	}
	pass = make([]byte, ubuf[len(ubuf)-1])
	if _, err := io.ReadFull(r, pass); err != nil {
		return "", nil, err
	}
	if hdr[1] == 0 || len(pass) == 0 {
		return "", nil, errEmptyField
	}
	return string(ubuf[:len(ubuf)-1]), pass, nil
}

// Request is a SOCKS5 request: a command and a destination, given as an
// address or a domain name.
type Request struct {
	Cmd  byte
	Addr netip.Addr // valid unless Name is set
	Name string
	Port uint16
}

// Dest formats the destination for logs.
func (q *Request) Dest() string {
	if q.Name != "" {
		return fmt.Sprintf("%s:%d", q.Name, q.Port)
	}
	return netip.AddrPortFrom(q.Addr, q.Port).String()
}

// requestError is a malformed request that has a reply code.
type requestError struct {
	reply Reply
	msg   string
}

func (e *requestError) Error() string { return e.msg }

// readRequest reads VER CMD RSV ATYP DST.ADDR DST.PORT. A request with
// an unknown address type gets AtypNotSupported, one with an invalid
// domain name HostUnreachable, one with another version GeneralFailure:
// the caller replies with the code of a *requestError. The command is
// returned as it is; the caller refuses what it does not serve.
func readRequest(r io.Reader) (*Request, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if hdr[0] != version {
		return nil, &requestError{GeneralFailure, fmt.Sprintf("request is not SOCKS version 5 (0x%02x)", hdr[0])}
	}
	q := &Request{Cmd: hdr[1]}
	switch hdr[3] {
	case AtypIPv4:
		var b [4 + 2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, err
		}
		q.Addr = netip.AddrFrom4([4]byte(b[:4]))
		q.Port = binary.BigEndian.Uint16(b[4:])
	case AtypIPv6:
		var b [16 + 2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, err
		}
		q.Addr = netip.AddrFrom16([16]byte(b[:16])).Unmap()
		q.Port = binary.BigEndian.Uint16(b[16:])
	case AtypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return nil, err
		}
		b := make([]byte, int(n[0])+2)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		q.Port = binary.BigEndian.Uint16(b[len(b)-2:])
		name := string(b[:len(b)-2])
		// A literal address sent as a name is used as an address.
		if a, err := netip.ParseAddr(name); err == nil && a.Zone() == "" {
			q.Addr = a.Unmap()
			break
		}
		if !validName(name) {
			return nil, &requestError{HostUnreachable, fmt.Sprintf("invalid domain name %q", name)}
		}
		q.Name = name
	default:
		return nil, &requestError{AtypNotSupported, fmt.Sprintf("address type 0x%02x", hdr[3])}
	}
	return q, nil
}

// validName reports whether s is a host name the gateway will resolve:
// letters, digits, hyphens and underscores in dot-separated labels of
// 1-63 bytes, 253 bytes at most (a trailing dot allowed).
func validName(s string) bool {
	if len(s) > 0 && s[len(s)-1] == '.' {
		s = s[:len(s)-1]
	}
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
			continue
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0
}

// appendReply appends a reply carrying the bound address (the zero
// IPv4 address when bound is not valid).
func appendReply(b []byte, rep Reply, bound netip.AddrPort) []byte {
	b = append(b, version, byte(rep), 0)
	a := bound.Addr().Unmap()
	switch {
	case a.Is4():
		b = append(b, AtypIPv4)
		b = append(b, a.AsSlice()...)
	case a.Is6():
		b = append(b, AtypIPv6)
		b = append(b, a.AsSlice()...)
	default:
		b = append(b, AtypIPv4, 0, 0, 0, 0)
	}
	return binary.BigEndian.AppendUint16(b, bound.Port())
}
