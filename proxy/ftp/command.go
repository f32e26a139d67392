package ftp

import (
	"bytes"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Telnet commands a client may send on the control connection (RFC 854).
const (
	telnetIAC  = 0xff
	telnetWILL = 0xfb // WILL, WONT, DO, DONT: 0xfb-0xfe, each with an option byte
	telnetDONT = 0xfe
	telnetIP   = 0xf4 // Interrupt Process
	telnetDM   = 0xf2 // Data Mark: the urgent byte of a Synch
)

// synchABOR is the Telnet IP and Synch that RFC 959 4.1.3 puts before an
// ABOR, as lftp, BSD and inetutils ftp send them: its last byte, the DM,
// goes as TCP urgent data. vsftpd reads an ABOR during a transfer only
// on the SIGURG of that byte, and drops exactly these four bytes in front
// of it; outside a transfer it takes "\xff\xf4\xff\xf2ABOR" as ABOR too.
var synchABOR = []byte{telnetIAC, telnetIP, telnetIAC, telnetDM}

// hasSynch reports whether a client's command line carries the Telnet
// IP or the Synch's DM: the client interrupts the transfer with it.
func hasSynch(line []byte) bool {
	return bytes.Contains(line, []byte{telnetIAC, telnetIP}) || bytes.Contains(line, []byte{telnetIAC, telnetDM})
}

// cleanCommand returns a command line as the gateway reads it and passes
// it on: Telnet commands removed (servers such as ProFTPD remove them
// before they parse; IAC IAC, a literal 0xff, stays) and ending in CRLF.
// A CR anywhere else (a line end to some servers, to others not) makes it
// unusable: ok is false.
func cleanCommand(line []byte) (clean []byte, ok bool) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, false
	}
	if bytes.IndexByte(line, telnetIAC) < 0 {
		return append(line, '\r', '\n'), true
	}
	return append(stripTelnet(line), '\r', '\n'), true
}

// stripTelnet returns a copy of line without its Telnet commands (IAC
// and what follows it; an escaped 0xff, IAC IAC, stays).
func stripTelnet(line []byte) []byte {
	clean := make([]byte, 0, len(line)+2)
	for i := 0; i < len(line); i++ {
		if line[i] != telnetIAC {
			clean = append(clean, line[i])
			continue
		}
		switch {
		case i+1 < len(line) && line[i+1] == telnetIAC:
			clean = append(clean, telnetIAC, telnetIAC)
			i++
		case i+1 < len(line) && line[i+1] >= telnetWILL && line[i+1] <= telnetDONT:
			i += 2 // and the option
		default:
			i++
		}
	}
	return clean
}

// cleanReply makes a server's reply line read alike by every client: its
// Telnet commands removed (a Telnet-aware client strips them before it
// reads the code: "IAC NOP 227 ..." is a 227 to it, and would pass the
// gateway unrewritten) and a CR inside it made a space (a client that
// ends lines at a CR would read a second line). An escaped 0xff (IAC
// IAC) stays in the text, but not where the code is: BSD and inetutils
// ftp drop IAC IAC too, and read "IAC IAC 227 ..." as a 227. line ends
// in LF; the result may be line itself.
func cleanReply(line []byte) []byte {
	body := bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
	if bytes.IndexByte(body, telnetIAC) < 0 && bytes.IndexByte(body, '\r') < 0 {
		return line
	}
	clean := stripTelnet(body)
	// After stripTelnet every 0xff is the first of an IAC IAC pair.
	for {
		i := bytes.IndexByte(clean[:min(len(clean), 4)], telnetIAC)
		if i < 0 {
			break
		}
		clean = append(clean[:i], clean[i+2:]...)
	}
	for i, c := range clean {
		if c == '\r' {
			clean[i] = ' '
		}
	}
	return append(clean, '\r', '\n')
}

// isSpace is what servers take for white space between words (C's
// isspace; ProFTPD splits commands with it).
func isSpace(r rune) bool {
	return r == ' ' || r == '\t' || r == '\v' || r == '\f' || r == '\r' || r == '\n'
}

// splitCommand returns the verb of a command line (from cleanCommand),
// upper-cased, and its argument without the line ending. Leading white
// space is skipped and any white space ends the verb, as servers read
// it: a command the server takes for PORT is PORT to the gateway too.
func splitCommand(line []byte) (verb, arg string) {
	s := strings.TrimFunc(string(line), isSpace)
	i := strings.IndexFunc(s, isSpace)
	if i < 0 {
		return strings.ToUpper(s), ""
	}
	return strings.ToUpper(s[:i]), strings.TrimLeftFunc(s[i:], isSpace)
}

// parsePORT parses the argument of PORT (RFC 959): h1,h2,h3,h4,p1,p2.
func parsePORT(arg string) (netip.AddrPort, error) {
	f := strings.Split(strings.TrimSpace(arg), ",")
	if len(f) != 6 {
		return netip.AddrPort{}, fmt.Errorf("PORT %q: want h1,h2,h3,h4,p1,p2", arg)
	}
	var b [6]byte
	for i, s := range f {
		v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 8)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("PORT %q: %q is not a number 0-255", arg, s)
		}
		b[i] = byte(v)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[:4])), uint16(b[4])<<8|uint16(b[5])), nil
}

// formatPORT formats an IPv4 address and port as PORT's argument.
func formatPORT(ap netip.AddrPort) string {
	a := ap.Addr().Unmap().As4()
	return fmt.Sprintf("%d,%d,%d,%d,%d,%d", a[0], a[1], a[2], a[3], ap.Port()>>8, ap.Port()&0xff)
}

// parseEPRT parses the argument of EPRT (RFC 2428): <d>proto<d>addr<d>port<d>
// with any printable delimiter, proto 1 (IPv4) or 2 (IPv6).
func parseEPRT(arg string) (netip.AddrPort, error) {
	arg = strings.TrimSpace(arg)
	if len(arg) < 2 || arg[0] < 33 || arg[0] > 126 {
		return netip.AddrPort{}, fmt.Errorf("EPRT %q: want |proto|address|port|", arg)
	}
	f := strings.Split(arg, arg[:1])
	if len(f) != 5 || f[0] != "" || f[4] != "" {
		return netip.AddrPort{}, fmt.Errorf("EPRT %q: want |proto|address|port|", arg)
	}
	addr, err := netip.ParseAddr(f[2])
	if err != nil || addr.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("EPRT %q: %q is not an address", arg, f[2])
	}
	switch {
	case f[1] == "1" && addr.Is4():
	case f[1] == "2" && addr.Is6() && !addr.Is4In6():
	default:
		return netip.AddrPort{}, fmt.Errorf("EPRT %q: protocol %q does not match the address (1 is IPv4, 2 is IPv6)", arg, f[1])
	}
	port, err := strconv.ParseUint(f[3], 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("EPRT %q: %q is not a port", arg, f[3])
	}
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// formatEPRT formats an address and port as EPRT's argument.
func formatEPRT(ap netip.AddrPort) string {
	a := ap.Addr().Unmap()
	proto := 1
	if a.Is6() {
		proto = 2
	}
	return fmt.Sprintf("|%d|%s|%d|", proto, a, ap.Port())
}

// parse227 finds the address and port in a 227 reply (RFC 959 leaves its
// text free; the six numbers are what every client looks for). The
// address is returned only to be logged: a session never uses it.
func parse227(text string) (netip.AddrPort, error) {
	// The first run of digits and commas with six numbers, after the
	// reply code of a line ("227 10,1,0,2,156,64" has no text between
	// them, and spaces may be inside a run).
	for i := 0; i < len(text); i++ {
		if text[i] < '0' || text[i] > '9' {
			continue
		}
		if (i == 0 || text[i-1] == '\n') && i+3 < len(text) && isDigit(text[i+1]) && isDigit(text[i+2]) && (text[i+3] == ' ' || text[i+3] == '-') {
			i += 3 // the reply code
			continue
		}
		j := i
		for j < len(text) && (text[j] >= '0' && text[j] <= '9' || text[j] == ',' || text[j] == ' ') {
			j++
		}
		if ap, err := parsePORT(strings.TrimRight(text[i:j], ", ")); err == nil {
			return ap, nil
		}
		i = j
	}
	return netip.AddrPort{}, fmt.Errorf("227 reply %q: no h1,h2,h3,h4,p1,p2 in it", text)
}

// format227 is the 227 reply a session gives its client.
func format227(ap netip.AddrPort) string {
	return "227 Entering Passive Mode (" + formatPORT(ap) + ").\r\n"
}

// parse229 finds the port of a 229 reply (RFC 2428): "(<d><d><d>port<d>)".
func parse229(text string) (uint16, error) {
	open := strings.IndexByte(text, '(')
	end := strings.LastIndexByte(text, ')')
	if open < 0 || end < open+5 {
		return 0, fmt.Errorf("229 reply %q: no (|||port|) in it", text)
	}
	in := text[open+1 : end]
	d := in[:1]
	if !strings.HasPrefix(in, d+d+d) || !strings.HasSuffix(in, d) {
		return 0, fmt.Errorf("229 reply %q: no (|||port|) in it", text)
	}
	port, err := strconv.ParseUint(in[3:len(in)-1], 10, 16)
	if err != nil || port == 0 {
		return 0, fmt.Errorf("229 reply %q: %q is not a port", text, in[3:len(in)-1])
	}
	return uint16(port), nil
}

// format229 is the 229 reply a session gives its client.
func format229(port uint16) string {
	return fmt.Sprintf("229 Entering Extended Passive Mode (|||%d|).\r\n", port)
}

// replyCode returns the code of a reply line and whether the line ends
// the reply: "123 text" is a final line, "123-text" opens a multi-line
// reply, and a line without a code at its start continues one.
func replyCode(line []byte) (code int, final bool) {
	if len(line) < 4 || !isDigit(line[0]) || !isDigit(line[1]) || !isDigit(line[2]) {
		return 0, false
	}
	code = int(line[0]-'0')*100 + int(line[1]-'0')*10 + int(line[2]-'0')
	return code, line[3] == ' ' || line[3] == '\r' || line[3] == '\n'
}

func isDigit(b byte) bool { return b >= '0' && b <= '9' }
