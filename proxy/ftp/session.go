package ftp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"spliced/logging"
	"spliced/proxy"
)

// maxReplyLine bounds a line of a server reply. Servers send long lines
// legitimately (HELP, FEAT, long paths in 257), so the bound is looser
// than the client's.
const maxReplyLine = 4096

// session is one FTP control connection: the client's, accepted by the
// gateway, and the gateway's own to the server.
type session struct {
	p              *Proxy
	flow           *proxy.Flow
	client, server *net.TCPConn
	log            *slog.Logger

	// external is the gateway's address the server sees; internal the
	// one clients get in 227 replies; clientView the address the client
	// sent its control connection to (the server's, when intercepted),
	// where EPSV data connections arrive and active ones come from.
	external, internal, clientView netip.Addr

	clientMu sync.Mutex // both loops write to the client
	// order keeps the gateway's own replies in their place: a server
	// reply's turn is taken and the reply written under it, and answer
	// holds it while it decides to write at once (else a reply of the
	// gateway's, to a command read while the server's reply to the one
	// before was being written, could overtake it).
	order sync.Mutex
	// told is set when the gateway told the client it closes the session
	// (a 421): the close must then not lose that reply to a RST.
	told atomic.Bool

	mu sync.Mutex
	// turns are the replies the client is owed, in the order of its
	// commands (it may send several before reading a reply): the
	// server's, to a command passed on, and the gateway's own, to one it
	// answered itself, which waits behind the server's replies to
	// earlier commands. The first is always the server's: a reply of the
	// gateway's that comes first is written at once.
	turns     []turn
	dataLns   []*net.TCPListener // listeners of the data connection set up last, not yet connected
	dataFlows []*proxy.Flow      // data connections that may still be open
	// dataSetUp counts data connections accepted and not yet in
	// dataFlows (their other leg is being dialled): they count against
	// maxDataFlows too.
	dataSetUp int
	transfers atomic.Int64
}

func newSession(p *Proxy, flow *proxy.Flow, client, server *net.TCPConn, log *slog.Logger) *session {
	// The server's greeting is the first reply the client is owed.
	s := &session{p: p, flow: flow, client: client, server: server, log: log, turns: []turn{{verb: greeting}}}
	for _, c := range []*net.TCPConn{client, server} {
		if err := proxy.KeepUrgentInline(c); err != nil {
			log.Warn("ftp control connection: urgent data would be lost", logging.Err(err))
		}
	}
	s.clientView = flow.Server.Addr()
	s.external = p.conf().External.Addr
	if !s.external.IsValid() {
		s.external = flow.Upstream.Addr()
	}
	s.internal = p.conf().Internal.Addr
	if !s.internal.IsValid() {
		if a, err := localAddrTowards(flow.Client.Addr()); err == nil {
			s.internal = a
		} else {
			s.internal = s.clientView
		}
	}
	return s
}

// run relays the session until one side ends it, a bad line ends it, or
// a timeout; it returns why it ended. Data connections already set up
// live on.
func (s *session) run() string {
	reasons := make(chan string, 2)
	go func() { reasons <- s.guard(s.clientLoop) }()
	go func() { reasons <- s.guard(s.serverLoop) }()
	timeout := time.NewTimer(s.p.conf().SessionTimeout.D())
	defer timeout.Stop()
	var reason string
	waiting := 2
	for reason == "" {
		select {
		case reason = <-reasons:
			waiting--
		case <-timeout.C:
			s.tell("Session time limit reached")
			reason = "session timeout"
		case <-s.p.FlowContext().Done():
			reason = "shutdown"
		case <-s.flow.SpliceRequested():
			s.flow.SetSpliceError(errors.New("an FTP control connection stays proxied: the proxy reads its commands; its data connections are spliced"))
		}
	}
	s.server.Close()
	if s.told.Load() {
		lingerClose(s.client)
	} else {
		s.client.Close()
	}
	for ; waiting > 0; waiting-- {
		<-reasons
	}
	// After both loops ended: a 227 handled while the session closed may
	// have opened listeners just now.
	s.mu.Lock()
	closeAll(s.dataLns)
	s.mu.Unlock()
	return reason
}

// guard runs a loop of the session and turns a panic (a bug, met on
// input nobody foresaw) into the end of this session only, with the stack
// in the log, instead of the end of the daemon and every flow.
func (s *session) guard(loop func() string) (reason string) {
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("ftp session failed: internal error", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			reason = "internal error"
		}
	}()
	return loop()
}

// end closes the session for a bad line: the client is told why, and the
// reason is logged by the caller of run.
func (s *session) end(reply, reason string, attrs ...any) string {
	s.tell(reply)
	s.p.LogLimitedTo(s.log, "ftp end "+reason, slog.LevelWarn, "ftp session ended: "+reason, attrs...)
	return reason
}

// tellTimeout bounds the 421 that ends a session: a client that does not
// read must not keep its session open.
const tellTimeout = 2 * time.Second

// tell sends the client the 421 reply that announces the end of the
// session. The write deadline bounds it, and a write of the other loop
// blocked on a client that does not read, which holds clientMu.
func (s *session) tell(why string) {
	s.told.Store(true)
	s.client.SetWriteDeadline(time.Now().Add(tellTimeout))
	s.writeClient([]byte("421 " + why + ", closing control connection.\r\n"))
}

// lingerClose closes c after its peer read what was sent: closing a socket
// with unread input (the rest of an overlong line) would send a RST, and
// the peer could lose the reply that says why.
func lingerClose(c *net.TCPConn) {
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(time.Second))
	io.CopyN(io.Discard, c, 1<<20)
	c.Close()
}

// writeClient writes to the client. A write that the client does not
// read for the idle timeout fails: a client that stopped reading while
// the server's replies kept coming blocked the server loop, which holds
// order, for ever; the client loop then waited for order in answer (a
// command the gateway answers, such as AUTH) and read no more, so its
// idle deadline never fired and the session held its slot for the whole
// session_timeout. The 421 of tell keeps its own, shorter deadline.
func (s *session) writeClient(b []byte) error {
	s.clientMu.Lock()
	defer s.clientMu.Unlock()
	if idle := s.p.Service.IdleTimeout.D(); idle > 0 && !s.told.Load() {
		s.client.SetWriteDeadline(time.Now().Add(idle))
	}
	_, err := s.client.Write(b)
	return err
}

func (s *session) writeServer(b []byte) error {
	_, err := s.server.Write(b)
	return err
}

// turn is a reply the client is owed (see session.turns).
type turn struct {
	verb  string // the client's command passed on to the server
	reply []byte // the gateway's own reply (verb is then "")
}

// greeting is the turn of the server's greeting, which the client is
// owed before any reply to its commands.
const greeting = "(greeting)"

// emptyCommand is the turn of a command line with no verb.
const emptyCommand = "(empty)"

// maxTurns bounds the replies a client may be owed: a client pipelining
// without end, to a server that does not answer, must not grow them for
// ever.
const maxTurns = 128

var errTooManyTurns = errors.New("more than 128 commands without a reply")

// maxDataFlows bounds the data connections of a session open at once.
// FTP moves one file at a time; a few more leave room for one a client
// aborted and that is still closing. Unbounded, one client with a
// server that accepts every data connection and keeps it filled
// limits.max_flows, which every service shares.
const maxDataFlows = 8

// forward passes a client's command (verb, as the client sent it) on to
// the server, whose next final reply answers it.
func (s *session) forward(verb string, b []byte) error {
	return s.forwardUrgent(verb, nil, b)
}

// forwardUrgent passes a command on as forward does, behind urgent (if
// any): a Telnet sequence whose last byte goes to the server as TCP
// urgent data.
func (s *session) forwardUrgent(verb string, urgent, b []byte) error {
	if verb == "" {
		// An empty (or blank) line, which servers answer too: a turn
		// without a verb is a reply of the gateway's own, and the
		// replies after it would be paired with the wrong commands.
		verb = emptyCommand
	}
	s.mu.Lock()
	if len(s.turns) >= maxTurns {
		s.mu.Unlock()
		return errTooManyTurns
	}
	s.turns = append(s.turns, turn{verb: verb})
	s.mu.Unlock()
	if len(urgent) > 0 {
		if err := sendUrgent(s.server, urgent); err != nil {
			return err
		}
	}
	return s.writeServer(b)
}

// sendUrgent writes b to c with MSG_OOB: its last byte is urgent data,
// the byte the urgent pointer names.
func sendUrgent(c *net.TCPConn, b []byte) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Write(func(fd uintptr) bool {
		for len(b) > 0 {
			var n int
			n, serr = unix.SendmsgN(int(fd), b, nil, nil, unix.MSG_OOB)
			if serr == unix.EAGAIN {
				serr = nil
				return false // wait until writable
			}
			if serr == unix.EINTR {
				continue
			}
			if serr != nil {
				return true
			}
			b = b[n:]
		}
		return true
	}); err != nil {
		return err
	}
	return serr
}

// answer gives the client the gateway's own reply to its command: now, or
// after the server's replies to the client's earlier commands.
func (s *session) answer(reply string) error {
	s.order.Lock()
	defer s.order.Unlock()
	s.mu.Lock()
	if len(s.turns) == 0 {
		s.mu.Unlock()
		return s.writeClient([]byte(reply))
	}
	if len(s.turns) >= maxTurns {
		s.mu.Unlock()
		return errTooManyTurns
	}
	s.turns = append(s.turns, turn{reply: []byte(reply)})
	s.mu.Unlock()
	return nil
}

// answered takes the turn a final reply of the server answers: the verb
// of the client's command (empty for a reply nobody asked for, such as
// the greeting), and the gateway's replies that were waiting behind it.
func (s *session) answered() (verb string, then [][]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.turns) == 0 {
		return "", nil
	}
	verb = s.turns[0].verb
	s.turns = s.turns[1:]
	for len(s.turns) > 0 && s.turns[0].verb == "" {
		then = append(then, s.turns[0].reply)
		s.turns = s.turns[1:]
	}
	if len(s.turns) == 0 {
		s.turns = nil // let go of the array
	}
	return verb, then
}

// clientLoop reads the client's commands, complete lines only, and passes
// them on, rewritten where they carry addresses.
func (s *session) clientLoop() string {
	svc := s.p.Service
	maxLine := s.p.conf().MaxLine
	r := bufio.NewReaderSize(s.client, maxLine)
	// partial is the start of a command line that an idle deadline cut
	// (ReadSlice hands back, and takes, what it read so far).
	var partial []byte
	for {
		if idle := svc.IdleTimeout.D(); idle > 0 {
			s.client.SetReadDeadline(time.Now().Add(idle))
		}
		line, err := r.ReadSlice('\n')
		if len(partial) > 0 {
			partial = append(partial, line...)
			line = partial
		}
		switch {
		case errors.Is(err, bufio.ErrBufferFull) || len(line) > maxLine:
			return s.end("Command line too long", "command line longer than max_line", "max_line", maxLine)
		case errors.Is(err, os.ErrDeadlineExceeded):
			if s.dataOpen() {
				// A transfer is running: the control connection waits
				// for it, with what it read of a command kept.
				partial = append(partial[:0:0], line...)
				continue
			}
			s.tell("Idle timeout")
			return "idle timeout"
		case errors.Is(err, io.EOF):
			return "client closed"
		case err != nil:
			return "client: " + err.Error()
		}
		partial = partial[:0]
		if bytes.IndexByte(line, 0) >= 0 {
			return s.end("NUL byte in command", "NUL byte in a command line")
		}
		s.flow.C2S.Add(int64(len(line)))
		synch := hasSynch(line)
		line, ok := cleanCommand(line)
		if !ok {
			s.p.LogLimitedTo(s.log, "ftp bare CR", slog.LevelInfo, "refused a command with a CR inside")
			if err := s.answer("500 A CR inside a command line is refused by the gateway.\r\n"); err != nil {
				return s.failed(err)
			}
			continue
		}
		verb, arg := splitCommand(line)
		switch verb {
		case "PORT", "EPRT":
			err = s.active(verb, arg)
		case "PASV":
			err = s.passive(verb)
		case "EPSV":
			if arg != "" && arg != "1" && arg != "2" { // EPSV ALL
				err = s.forward("EPSV ALL", line)
				break
			}
			err = s.passive(verb)
		case "AUTH":
			s.p.LogLimitedTo(s.log, "ftp auth", slog.LevelInfo, "refused AUTH: TLS-wrapped FTP cannot be rewritten by the gateway; the client may go on in plain FTP", "mechanism", arg)
			err = s.answer("534 TLS is not available through this gateway; use plain FTP.\r\n")
		case "ABOR":
			if synch {
				// The client interrupted a transfer: the server must
				// notice it as the client meant it to, by the urgent
				// byte (a server busy sending a file to a client that
				// stopped reading may read nothing else).
				err = s.forwardUrgent(verb, synchABOR, line)
				break
			}
			err = s.forward(verb, line)
		case "LPRT", "LPSV":
			err = s.answer("502 " + verb + " is not supported by the gateway; use EPRT or EPSV.\r\n")
		default:
			err = s.forward(verb, line)
		}
		if err != nil {
			return s.failed(err)
		}
	}
}

// serverLoop reads the server's replies and passes them on, answering
// 227 and 229 with the gateway's own data listener.
func (s *session) serverLoop() string {
	r := bufio.NewReaderSize(s.server, max(maxReplyLine, s.p.conf().MaxLine))
	multi := 0      // code of the multi-line reply being read
	var held []byte // a multi-line 227 or 229 reply, held back until its final line
	for {
		line, err := r.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			return s.end("Server reply too long", "server reply line too long", "limit", r.Size())
		case errors.Is(err, io.EOF):
			return "server closed"
		case err != nil:
			return "server: " + err.Error()
		}
		if bytes.IndexByte(line, 0) >= 0 {
			return s.end("NUL byte in server reply", "NUL byte in a server reply")
		}
		s.flow.S2C.Add(int64(len(line)))
		line = cleanReply(line)
		if reason, done := s.serverLine(line, &multi, &held, r.Size()); done {
			return reason
		}
	}
}

// serverLine handles one line of the server's (see serverLoop): a turn
// is taken and the line written under order (see answer). done says the
// session ends, for reason.
func (s *session) serverLine(line []byte, multi *int, held *[]byte, limit int) (reason string, done bool) {
	s.order.Lock()
	defer s.order.Unlock() // also when a panic ends the session (guard)
	var then [][]byte      // the gateway's replies that waited for this one
	code, final := replyCode(line)
	switch {
	case *multi != 0 && (code != *multi || !final):
		if *multi == 227 || *multi == 229 {
			if len(*held)+len(line) > limit {
				return s.end("Server reply too long", "server passive reply too long", "limit", limit), true
			}
			*held = append(*held, line...)
			return "", false
		}
		if code != 0 && (final || code != *multi) {
			// A line inside the reply that reads as the last line
			// of another ("227 ..." inside a 200 reply): clients
			// such as curl end a reply at any such line, and would
			// take it for the answer. Or one that starts with
			// another code ("227-..."): BSD, inetutils and netkit
			// ftp take a passive address from the first line of a
			// reply whose code is 227, whatever follows it, and
			// accept a 200 as the answer to PASV. RFC 959 4.2 has
			// servers pad such lines; the gateway does.
			line = append([]byte{' '}, line...)
		}
	case code != 0 && !final:
		*multi = code
		if code == 227 || code == 229 {
			// The client acts on the final line, and may read an
			// address in any: the whole reply is the gateway's.
			*held = append((*held)[:0], line...)
			return "", false
		}
	case code != 0:
		if *multi != 0 { // the final line of a multi-line reply
			*multi = 0
			if len(*held) > 0 {
				line = append(*held, line...)
				*held = (*held)[:0]
			}
		}
		var asked string
		if code >= 200 {
			asked, then = s.answered()
		}
		if code == 227 || code == 229 {
			if pending := asked; pending != "PASV" && pending != "EPSV" {
				s.p.LogLimitedTo(s.log, "ftp unasked passive reply", slog.LevelWarn, "refused a passive-mode reply the client did not ask for", "reply", string(bytes.TrimSpace(line)))
				line = []byte("425 Unexpected passive-mode reply refused by the gateway.\r\n")
			} else {
				line = s.passiveReply(pending, code, line)
			}
		}
	}
	err := s.writeClient(line)
	for _, reply := range then {
		if err == nil {
			err = s.writeClient(reply)
		}
	}
	if err != nil {
		return "write: " + err.Error(), true
	}
	return "", false
}

// active handles PORT and EPRT: the client will accept the data
// connection. The gateway listens on its external address, tells the
// server that address instead, and connects to the client once the server
// connected.
func (s *session) active(verb, arg string) error {
	var want netip.AddrPort
	var err error
	if verb == "PORT" {
		want, err = parsePORT(arg)
	} else {
		want, err = parseEPRT(arg)
	}
	if err != nil {
		s.p.LogLimitedTo(s.log, "ftp malformed "+verb, slog.LevelInfo, "refused a malformed "+verb, logging.Err(err))
		return s.answer("501 Syntax error in the parameters of " + verb + ".\r\n")
	}
	want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
	// The client's address without its zone: a link-local client's
	// socket address names its interface (fe80::1%eth0), its EPRT
	// does not. The data connection goes to the zoned one.
	if want.Addr() != s.flow.Client.Addr().WithZone("") {
		s.p.LogLimitedTo(s.log, "ftp bounce "+verb, slog.LevelWarn, "refused "+verb+" naming another host than the client (FTP bounce)", "named", want)
		return s.answer("500 Illegal " + verb + " command: it must name your own address.\r\n")
	}
	want = netip.AddrPortFrom(s.flow.Client.Addr(), want.Port())
	if want.Port() < 1024 {
		s.p.LogLimitedTo(s.log, "ftp privileged "+verb, slog.LevelWarn, "refused "+verb+" naming a privileged port", "named", want)
		return s.answer("500 Illegal " + verb + " command: the port must be above 1023.\r\n")
	}
	lns, err := s.p.listenData(dataAddr{s.external, false})
	if err != nil {
		s.p.LogLimitedTo(s.log, "ftp data listener", slog.LevelError, "open a data listener", logging.Err(err))
		return s.answer("425 The gateway cannot open a data connection.\r\n")
	}
	at := netip.AddrPortFrom(s.external, proxy.AddrPort(lns[0].Addr()).Port())
	var cmd string
	if verb == "EPRT" || !s.external.Is4() {
		cmd = "EPRT " + formatEPRT(at)
	} else {
		cmd = "PORT " + formatPORT(at)
	}
	timeout := s.p.Service.ConnectTimeout.D()
	s.expectData(lns, s.flow.Server.Addr(), false, func(ctx context.Context) (*net.TCPConn, error) {
		return proxy.DialFrom(ctx, s.clientView, true, want, timeout, s.p.AvoidPort)
	})
	return s.forward(verb, []byte(cmd+"\r\n"))
}

// passive handles PASV and EPSV: the server will accept the data
// connection. The command goes on (as EPSV where PASV cannot name the
// server's family); the reply is rewritten by passiveReply.
func (s *session) passive(verb string) error {
	up := "EPSV"
	if verb == "PASV" && s.flow.Server.Addr().Is4() {
		up = "PASV"
	}
	return s.forward(verb, []byte(up+"\r\n"))
}

// passiveReply turns the server's 227 or 229 into the gateway's: a data
// listener for the client, which, once connected, is joined to the
// server's data port (above 1023) on the control connection's server
// address (never an address the reply names).
func (s *session) passiveReply(clientVerb string, code int, line []byte) []byte {
	text := string(bytes.TrimSpace(line))
	var port uint16
	if code == 227 {
		named, err := parse227(text)
		if err != nil {
			s.p.LogLimitedTo(s.log, "ftp malformed 227", slog.LevelWarn, "refused a malformed 227 reply", logging.Err(err))
			return []byte("425 The gateway could not read the server's passive reply.\r\n")
		}
		if named.Addr() != s.flow.Server.Addr() {
			s.p.LogLimitedTo(s.log, "ftp 227 address", slog.LevelWarn, "ignored the address in the server's 227 reply: data goes to the control connection's server", "named", named, "server", s.flow.Server.Addr())
		}
		port = named.Port()
	} else {
		p, err := parse229(text)
		if err != nil {
			s.p.LogLimitedTo(s.log, "ftp malformed 229", slog.LevelWarn, "refused a malformed 229 reply", logging.Err(err))
			return []byte("425 The gateway could not read the server's passive reply.\r\n")
		}
		port = p
	}
	if port < 1024 {
		// The data connection would go from the gateway's address to a
		// privileged service of the server's host (FTP bounce by the
		// server's hand), as a PORT naming such a port would.
		s.p.LogLimitedTo(s.log, fmt.Sprintf("ftp privileged %d", code), slog.LevelWarn, "refused a passive-mode reply naming a privileged port", "port", port, "server", s.flow.Server.Addr())
		return []byte("425 The server's passive reply names a privileged port; refused by the gateway.\r\n")
	}
	serverData := netip.AddrPortFrom(s.flow.Server.Addr(), port)
	// The client connects to the address of the reply (227), or to the
	// address of its control connection (229, and the many clients that
	// ignore a 227's address, as curl does by default): the proxy listens
	// on both, transparently on the second when it is the server's.
	var (
		lns   []*net.TCPListener
		err   error
		reply func(netip.AddrPort) string
	)
	view := dataAddr{s.clientView, true}
	if clientVerb == "PASV" {
		if !s.internal.Is4() {
			return []byte("425 PASV cannot name the gateway's IPv6 address; use EPSV.\r\n")
		}
		addrs := []dataAddr{{s.internal, false}}
		if s.clientView != s.internal && s.clientView.Is4() {
			addrs = append(addrs, view)
		}
		lns, err = s.p.listenData(addrs...)
		reply = format227
	} else {
		lns, err = s.p.listenData(view)
		reply = func(ap netip.AddrPort) string { return format229(ap.Port()) }
	}
	if err != nil {
		s.p.LogLimitedTo(s.log, "ftp data listener", slog.LevelError, "open a data listener", logging.Err(err))
		return []byte("425 The gateway cannot open a data connection.\r\n")
	}
	timeout := s.p.Service.ConnectTimeout.D()
	s.expectData(lns, s.flow.Client.Addr(), true, func(ctx context.Context) (*net.TCPConn, error) {
		return proxy.DialFrom(ctx, s.external, false, serverData, timeout, s.p.AvoidPort)
	})
	return []byte(reply(proxy.AddrPort(lns[0].Addr())))
}

// expectData waits (in the background) for the data connection on lns
// from peer only, then dials the other leg and splices the pair. A data
// connection set up before and not yet connected is abandoned.
// acceptedIsClient says which leg the accepted connection is.
func (s *session) expectData(lns []*net.TCPListener, peer netip.Addr, acceptedIsClient bool, dial func(context.Context) (*net.TCPConn, error)) {
	s.mu.Lock()
	closeAll(s.dataLns)
	s.dataLns = lns
	s.mu.Unlock()
	s.p.Go(func() {
		accepted := s.acceptFrom(lns, peer)
		s.mu.Lock()
		if len(s.dataLns) > 0 && s.dataLns[0] == lns[0] {
			s.dataLns = nil
		}
		s.mu.Unlock()
		if accepted == nil {
			return
		}
		s.mu.Lock()
		s.dataFlows = s.openDataLocked()
		busy := len(s.dataFlows)+s.dataSetUp >= maxDataFlows
		if !busy {
			s.dataSetUp++ // until relayData adds the flow, or the dial fails
		}
		s.mu.Unlock()
		if busy {
			s.p.LogLimitedTo(s.log, "ftp data flows", slog.LevelWarn, "refused a data connection: the session has too many open", "open", maxDataFlows)
			proxy.Reset(accepted)
			return
		}
		ctx, cancel := context.WithTimeout(s.p.FlowContext(), s.p.Service.ConnectTimeout.D())
		dialed, err := dial(ctx)
		cancel()
		if err != nil {
			s.p.LogLimitedTo(s.log, "ftp data connect", slog.LevelWarn, "data connection: connect failed", logging.Err(err))
			proxy.Reset(accepted)
			s.setUpFailed()
			return
		}
		client, server := dialed, accepted
		if acceptedIsClient {
			client, server = accepted, dialed
		}
		s.relayData(client, server)
	})
}

// acceptFrom accepts the one data connection from peer on any of lns
// within the data timeout; connections from anyone else are reset. It
// closes the listeners.
func (s *session) acceptFrom(lns []*net.TCPListener, peer netip.Addr) *net.TCPConn {
	defer closeAll(lns)
	deadline := time.Now().Add(s.p.conf().DataTimeout.D())
	got := make(chan *net.TCPConn, len(lns))
	for _, ln := range lns {
		ln.SetDeadline(deadline)
		go func() {
			for {
				c, err := ln.AcceptTCP()
				if err != nil {
					if !errors.Is(err, net.ErrClosed) {
						s.p.LogLimitedTo(s.log, "ftp data never came", slog.LevelInfo, "data connection never came", "listener", proxy.AddrPort(ln.Addr()), logging.Err(err))
					}
					got <- nil
					return
				}
				if from := proxy.AddrPort(c.RemoteAddr()); from.Addr() != peer {
					s.p.LogLimitedTo(s.log, "ftp data peer", slog.LevelWarn, "refused a data connection from an unexpected peer", "from", from, "expected", peer)
					proxy.Reset(c)
					continue
				}
				got <- c
				return
			}
		}()
	}
	var winner *net.TCPConn
	for range lns {
		c := <-got
		if c == nil {
			continue
		}
		if winner != nil { // the peer connected twice: one is enough
			proxy.Reset(c)
			continue
		}
		winner = c
		closeAll(lns) // the others stop waiting
	}
	return winner
}

func closeAll(lns []*net.TCPListener) {
	for _, ln := range lns {
		ln.Close()
	}
}

// relayData hands a connected data connection to the splicer, or relays
// it when splicing is off or fails. It ends the connection's count in
// dataSetUp.
func (s *session) relayData(client, server *net.TCPConn) {
	p := s.p
	flow := proxy.NewFlow(p.Service.Name, KindData, proxy.AddrPort(client.RemoteAddr()), proxy.AddrPort(client.LocalAddr()))
	flow.SetServerLeg(proxy.AddrPort(server.LocalAddr()), proxy.AddrPort(server.RemoteAddr()))
	if err := p.Flows.Admit(flow); err != nil {
		s.setUpFailed()
		proxy.Reset(client)
		proxy.Reset(server)
		p.LogRefusal(err, "refusing a data connection", logging.KeyClient, flow.Client)
		return
	}
	s.transfers.Add(1)
	s.mu.Lock()
	// The closed ones go first: only an idle deadline pruned them, and a
	// session busy with transfers held every flow it ever had.
	s.dataFlows = append(s.openDataLocked(), flow)
	s.dataSetUp--
	s.mu.Unlock()
	log := s.log.With("data_flow", flow.ID)
	log.Info("ftp data connection opened", "client_leg", flow.Client, "server_leg", flow.Backend, logging.KeyUpstream, flow.Upstream)
	p.Event(proxy.EventOpened, flow, "ftp data of flow "+s.flowID())
	if sp := p.splicing(); sp != nil {
		err := sp.Splice(p.FlowContext(), flow, client, server)
		if err == nil {
			return // the gateway owns the flow now, and logs its end
		}
		flow.SetSpliceError(err)
		p.LogLimitedTo(log, "ftp data stays proxied", slog.LevelWarn, "ftp data connection stays proxied", logging.Err(err))
		p.Event(proxy.EventSpliceFailed, flow, err.Error())
	}
	relay := &proxy.Relay{Client: client, Upstream: server, Flow: flow, IdleTimeout: p.Service.IdleTimeout.D()}
	stop := context.AfterFunc(p.FlowContext(), relay.Close)
	defer stop()
	outcome, err := relay.Run()
	for outcome == proxy.Paused { // an operator's splice request; data connections splice at once or never
		outcome, err = relay.Run()
	}
	attrs := []any{logging.KeyBytesC2S, flow.C2S.Load(), logging.KeyBytesS2C, flow.S2C.Load(), logging.KeyReason, outcome.String(), logging.KeyMode, "proxied"}
	if err != nil {
		attrs = append(attrs, logging.Err(err))
	}
	log.Info("ftp data connection closed", attrs...)
	flow.SetState(proxy.StateClosing)
	p.Event(proxy.EventClosed, flow, "")
	p.Flows.Remove(flow)
}

func (s *session) flowID() string { return strconv.FormatUint(s.flow.ID, 10) }

// dataOpen reports whether a data connection of the session is still
// open (relayed, or spliced and owned by the gateway, and not ended).
func (s *session) dataOpen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dataFlows = s.openDataLocked()
	return len(s.dataFlows) > 0
}

// setUpFailed ends the count in dataSetUp of a data connection that
// failed before it became a flow.
func (s *session) setUpFailed() {
	s.mu.Lock()
	s.dataSetUp--
	s.mu.Unlock()
}

// openDataLocked returns the session's data flows that are still open,
// in the array of s.dataFlows. s.mu is held.
func (s *session) openDataLocked() []*proxy.Flow {
	open := s.dataFlows[:0]
	for _, f := range s.dataFlows {
		if s.p.Flows.Live(f) {
			open = append(open, f)
		}
	}
	clear(s.dataFlows[len(open):]) // let go of the closed ones
	return open
}

// failed is the reason a loop ends on a write error or a client owed
// too many replies.
func (s *session) failed(err error) string {
	if errors.Is(err, errTooManyTurns) {
		return s.end("Too many commands without a reply", "client pipelined more than 128 commands without a reply")
	}
	return "write: " + err.Error()
}
