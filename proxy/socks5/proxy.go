package socks5

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"spliced/config"
	"spliced/logging"
	"spliced/proxy"
)

// Proxy is the SOCKS5 proxy of one service. Once a request is granted it
// forwards like the plain forwarder (proxy.Forwarder.Forward), so the
// service's splice policy applies from the reply on.
type Proxy struct {
	proxy.Forwarder
	conf     *Config
	resolver *net.Resolver
	users    atomic.Pointer[users]
	failed   *failures
	sessions atomic.Int32 // handshakes under way

	statsMu    sync.Mutex
	results    map[string]uint64 // handshakes by result
	connects   map[string]uint64 // granted CONNECTs by destination class
	authFailed uint64
}

func newProxy(s proxy.Setup) *Proxy {
	p := &Proxy{Forwarder: proxy.Forwarder{Base: s.Base()}, results: map[string]uint64{}, connects: map[string]uint64{}}
	p.conf = s.Service.Section().(*Config)
	p.failed = newFailures(p.conf.FailedLogins, p.conf.BackOff.D())
	p.resolver = net.DefaultResolver
	if r := p.conf.Resolver; r != "" {
		p.resolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, r)
		}}
	}
	u := users{}
	if p.conf.UsersFile != "" {
		var err error
		if u, err = loadUsers(p.conf.UsersFile); err != nil {
			p.Log.Error("socks5: users file unusable, every login fails until it is fixed and spliced reloaded",
				logging.KeyFile, p.conf.UsersFile, logging.Err(err))
			u = users{}
		}
	}
	p.users.Store(&u)
	return p
}

// Reload rereads the users file (proxy.Reloader). On error the users
// in force stay.
func (p *Proxy) Reload() error {
	if p.conf.UsersFile == "" {
		return nil
	}
	u, err := loadUsers(p.conf.UsersFile)
	if err != nil {
		return fmt.Errorf("socks5 users file %s: %w", p.conf.UsersFile, err)
	}
	p.users.Store(&u)
	p.Log.Info("socks5: users file reloaded", logging.KeyFile, p.conf.UsersFile, "users", len(u.hash))
	return nil
}

// Serve accepts SOCKS5 clients on the listeners until ctx is done.
func (p *Proxy) Serve(ctx context.Context, listeners ...*net.TCPListener) error {
	return p.ServeWith(ctx, listeners, p.handle)
}

// Results of a handshake, as counted in metrics.
const (
	resultOK          = "ok"
	resultBadGreeting = "bad_greeting"
	resultNoMethod    = "no_acceptable_method"
	resultAuthFailed  = "auth_failed"
	resultBackedOff   = "backed_off"
	resultBadRequest  = "bad_request"
	resultCommand     = "command_not_supported"
	resultDenied      = "denied"
	resultResolve     = "resolve_failed"
	resultConnect     = "connect_failed"
	resultCap         = "session_cap"
	resultTimeout     = "timeout"
	resultClosed      = "closed"
)

func (p *Proxy) count(result string) {
	p.statsMu.Lock()
	p.results[result]++
	if result == resultAuthFailed || result == resultBackedOff {
		p.authFailed++
	}
	p.statsMu.Unlock()
}

// Metrics reports handshakes by result, failed logins and granted
// connects by destination class (proxy.MetricsSource).
func (p *Proxy) Metrics() []proxy.Metric {
	p.statsMu.Lock()
	defer p.statsMu.Unlock()
	var out []proxy.Metric
	for r, n := range p.results {
		out = append(out, proxy.Metric{Name: "spliced_socks5_handshakes_total", Help: "SOCKS5 handshakes by result.",
			Counter: true, Labels: []string{"result"}, Values: []string{r}, Value: float64(n)})
	}
	out = append(out, proxy.Metric{Name: "spliced_socks5_auth_failures_total", Help: "SOCKS5 logins that failed, backed-off ones included.",
		Counter: true, Value: float64(p.authFailed)})
	for c, n := range p.connects {
		out = append(out, proxy.Metric{Name: "spliced_socks5_connects_total", Help: "SOCKS5 CONNECTs granted, by destination class (ipv4, ipv6, domain).",
			Counter: true, Labels: []string{"class"}, Values: []string{c}, Value: float64(n)})
	}
	return out
}

// handle serves one client connection.
func (p *Proxy) handle(c *net.TCPConn) {
	client := proxy.AddrPort(c.RemoteAddr())
	// Sessions are the handshakes under way and the service's flows,
	// spliced ones included: a session that ended for the proxy when
	// its flow was spliced did not count, so max_sessions let a client
	// hold spliced connections up to limits.max_flows.
	if n := p.sessions.Add(1); int(n)+p.Flows.ServiceLen(p.Service.Name) > p.conf.MaxSessions {
		p.sessions.Add(-1)
		// Counted before the reset: whoever sees the reset sees the count.
		p.count(resultCap)
		proxy.Reset(c)
		p.LogLimited("socks5 sessions", slog.LevelWarn, "socks5: session cap reached, refusing new connections",
			"max_sessions", p.conf.MaxSessions, logging.KeyClient, client, "fix", "raise socks5.max_sessions of the service")
		return
	}
	// A handshake holds a place among its client's flows (with
	// limits.max_flows_per_client, or one client could hold every
	// session of max_sessions without a flow), in the table every
	// service admits its flows by: the cap is the client's over all
	// services.
	if err := p.Flows.Reserve(client.Addr()); err != nil {
		p.sessions.Add(-1)
		p.count(resultCap)
		proxy.Reset(c)
		p.LogRefusal(err, "refusing new connections", logging.KeyClient, client)
		return
	}
	h := &handshake{p: p, c: c, client: client, deadline: time.Now().Add(p.conf.HandshakeTimeout.D()), reserved: true}
	defer h.handshakeDone()
	c.SetDeadline(h.deadline)
	flow, up, result, err := h.run()
	p.count(result)
	if flow == nil {
		if err != nil {
			p.LogLimited("socks5 "+result, slog.LevelInfo, "socks5: request refused", logging.KeyClient, client,
				"user", h.user, "destination", h.dest(), logging.KeyReason, result, "reply", h.replyName(), logging.Err(err))
		}
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	log := p.Log.With(logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server, "user", h.user)
	log.Info("flow opened", logging.KeyUpstream, flow.Upstream, "destination", h.dest(), logging.KeyMode, "nat")
	p.Event(proxy.EventOpened, flow, "socks5 "+h.dest())
	p.Forward(flow, c, up, log)
}

// handshake is the state of one client's handshake.
type handshake struct {
	p      *Proxy
	c      *net.TCPConn
	client netip.AddrPort
	user   string
	req    *Request
	reply  Reply
	// replied: reply was sent (a reply to the request).
	replied bool
	// deadline bounds the client's part of the handshake; the gateway's
	// own work (a password check) does not count.
	deadline time.Time
	// done: the handshake no longer counts in Proxy.sessions (its flow
	// does, from its admission on).
	done bool
	// reserved: the handshake holds its client's place in the flow
	// table (FlowTable.Reserve), until its flow takes it
	// (FlowTable.AdmitReserved) or the handshake ends.
	reserved bool
}

// handshakeDone stops counting the handshake as a session and gives back
// its client's place if its flow did not take it, once.
func (h *handshake) handshakeDone() {
	if !h.done {
		h.done = true
		h.p.sessions.Add(-1)
	}
	if h.reserved {
		h.reserved = false
		h.p.Flows.Release(h.client.Addr())
	}
}

func (h *handshake) dest() string {
	if h.req == nil {
		return ""
	}
	return h.req.Dest()
}

// answer sends a failure reply.
func (h *handshake) answer(rep Reply) {
	h.reply, h.replied = rep, true
	h.replyDeadline()
	h.c.Write(appendReply(nil, rep, netip.AddrPort{}))
}

// replyName names the reply sent to the request, or "none": the zero
// Reply is Succeeded, which the log showed for handshakes that ended
// before any reply (a bad greeting, a failed login, a timeout).
func (h *handshake) replyName() string {
	if !h.replied {
		return "none"
	}
	return h.reply.String()
}

// replyDeadline gives the write of a reply to the request a deadline of
// its own: the handshake's was the client's, and the gateway's resolve
// and connect may have used it up.
func (h *handshake) replyDeadline() {
	h.c.SetWriteDeadline(time.Now().Add(h.p.conf.HandshakeTimeout.D()))
}

// run reads the handshake and connects. It returns the admitted flow
// and its upstream connection, after the success reply was sent; or nil
// and the result, after any failure reply was sent.
func (h *handshake) run() (*proxy.Flow, *net.TCPConn, string, error) {
	p, c := h.p, h.c
	methods, err := readGreeting(c)
	if err != nil {
		return nil, nil, failResult(err, resultBadGreeting), err
	}
	want := byte(MethodNone)
	if p.conf.method(h.client.Addr()) == Password {
		want = MethodPassword
	}
	if !containsByte(methods, want) {
		c.Write([]byte{version, MethodRefused})
		return nil, nil, resultNoMethod, fmt.Errorf("client offers methods %x, the gateway requires 0x%02x", methods, want)
	}
	if _, err := c.Write([]byte{version, want}); err != nil {
		return nil, nil, resultClosed, err
	}
	if want == MethodPassword {
		if result, ok, err := h.login(); !ok {
			return nil, nil, result, err
		}
	}
	q, err := readRequest(c)
	if err != nil {
		var re *requestError
		if errors.As(err, &re) {
			h.answer(re.reply)
			return nil, nil, resultBadRequest, err
		}
		return nil, nil, failResult(err, resultBadRequest), err
	}
	h.req = q
	// The client's part of the handshake is done. What follows is the
	// gateway's (rules, resolve, connect): it must not use up the
	// client's deadline, or a reply after a slow resolve or connect
	// could not be written, and a connected flow was thrown away.
	c.SetDeadline(time.Time{})
	if q.Cmd != CmdConnect {
		h.answer(CommandNotSupported)
		return nil, nil, resultCommand, fmt.Errorf("command 0x%02x is not served (only CONNECT)", q.Cmd)
	}
	if q.Port == 0 {
		h.answer(GeneralFailure)
		return nil, nil, resultBadRequest, errors.New("destination port 0")
	}
	return h.connect()
}

// login runs the RFC 1929 subnegotiation. Failed logins are logged
// here (rate-limited) and come back with a nil error.
func (h *handshake) login() (result string, ok bool, err error) {
	p, c := h.p, h.c
	user, pass, err := readCredentials(c)
	if err != nil {
		if errors.Is(err, errEmptyField) {
			c.Write([]byte{authVersion, 0x01})
		}
		return failResult(err, resultAuthFailed), false, err
	}
	h.user = user
	// A wait for the source's other checks counts against the
	// handshake's deadline; the check itself does not.
	if blocked, until := p.failed.begin(h.client.Addr(), h.deadline); blocked {
		if until.IsZero() {
			return resultTimeout, false, errors.New("handshake_timeout passed while the login waited for the checks of its source's other logins")
		}
		c.Write([]byte{authVersion, 0x01})
		p.LogLimited("socks5 backed off", slog.LevelWarn, "socks5: login from a backed-off source refused without a check",
			logging.KeyClient, h.client, "user", user, "until", until.Format(time.RFC3339))
		return resultBackedOff, false, nil
	}
	now := time.Now()
	ok = (*p.users.Load()).check(user, pass)
	backOff := p.failed.done(h.client.Addr(), user, ok, time.Now())
	h.deadline = h.deadline.Add(time.Since(now))
	c.SetDeadline(h.deadline)
	if !ok {
		c.Write([]byte{authVersion, 0x01})
		p.LogLimited("socks5 login failed", slog.LevelWarn, "socks5: login failed", logging.KeyClient, h.client, "user", user, "back_off", backOff)
		return resultAuthFailed, false, nil
	}
	if _, err := c.Write([]byte{authVersion, 0x00}); err != nil {
		return resultClosed, false, err
	}
	return "", true, nil
}

// connect checks the request against the rules, resolves it, connects
// and replies.
func (h *handshake) connect() (*proxy.Flow, *net.TCPConn, string, error) {
	p, q, svc := h.p, h.req, h.p.Service
	if q.Name != "" {
		if act, known := p.conf.decide(h.user, q.Name, netip.Addr{}, q.Port); known && act == config.Deny {
			h.answer(NotAllowed)
			return nil, nil, resultDenied, errors.New("destination denied by socks5 rules")
		}
	}
	addrs := []netip.Addr{q.Addr}
	if q.Name != "" {
		ctx, cancel := context.WithTimeout(p.FlowContext(), p.conf.ResolveTimeout.D())
		var err error
		addrs, err = p.resolver.LookupNetIP(ctx, "ip", rooted(q.Name))
		cancel()
		if err != nil || len(addrs) == 0 {
			rep := HostUnreachable
			var de *net.DNSError
			if errors.As(err, &de) && de.IsTimeout || errors.Is(err, context.DeadlineExceeded) {
				rep = TTLExpired
			}
			h.answer(rep)
			if err == nil {
				err = errors.New("no address")
			}
			return nil, nil, resultResolve, fmt.Errorf("resolve %s: %w", q.Name, err)
		}
	}
	var allowed []netip.AddrPort
	var gateway string // why an address was refused as the gateway's
	for _, a := range addrs {
		a = a.Unmap()
		if a.IsUnspecified() {
			// Not a destination: connect(2) takes 0.0.0.0 and :: for
			// the gateway's loopback address, which rules on
			// 127.0.0.0/8 or ::1 would not see.
			continue
		}
		// An address a NAT64 translator maps to an IPv4 one must pass
		// the rules as that address too: with DNS64, an internal
		// IPv4 host's name resolves to 64:ff9b::10.0.0.5, past a
		// deny rule for 10.0.0.0/8.
		targets := append([]netip.Addr{a}, nat64Embedded(a)...)
		refused := false
		for _, t := range targets {
			act, _, by := p.conf.decideBy(h.user, q.Name, t, q.Port)
			if act == config.Deny {
				refused = true
				break
			}
			if r, why := onGateway(t); r.IsValid() && !namedBy(by, r) {
				// The gateway's own services (debug.pprof, metrics, a
				// router's management) and its links' neighbours are
				// reached only where a rule names them.
				gateway = fmt.Sprintf("%v is %s; a socks5 rule that allows it must name it in destinations (within %v)", t, why, r)
				refused = true
				break
			}
			if svc.Access.Decide(h.client.Addr(), netip.AddrPortFrom(t, q.Port)) == config.Deny {
				refused = true
				break
			}
		}
		if !refused {
			allowed = append(allowed, netip.AddrPortFrom(a, q.Port))
		}
	}
	// Addresses of the client leg's family first: the splice engine
	// cannot translate between IPv4 and IPv6, so such a flow could only
	// be relayed.
	v6 := proxy.AddrPort(h.c.LocalAddr()).Addr().Is6()
	slices.SortStableFunc(allowed, func(a, b netip.AddrPort) int {
		return cmp.Compare(b2i(a.Addr().Is6() != v6), b2i(b.Addr().Is6() != v6))
	})
	if len(allowed) == 0 {
		h.answer(NotAllowed)
		if gateway != "" {
			return nil, nil, resultDenied, fmt.Errorf("destination %v refused: %s", addrs, gateway)
		}
		return nil, nil, resultDenied, fmt.Errorf("destination %v denied by rules", addrs)
	}
	flow := proxy.NewFlow(svc.Name, Kind, h.client, allowed[0])
	flow.User, flow.Local = h.user, proxy.AddrPort(h.c.LocalAddr())
	admitErr := p.Flows.AdmitReserved(flow) // the handshake's place is the flow's
	h.reserved = false
	h.handshakeDone() // the flow counts from now on
	if admitErr != nil {
		h.answer(GeneralFailure)
		p.LogRefusal(admitErr, "refusing new flows", logging.KeyClient, flow.Client)
		return nil, nil, resultCap, nil
	}
	// One connect timeout for all the addresses a name has, tried in turn.
	ctx, cancel := context.WithTimeout(p.FlowContext(), svc.ConnectTimeout.D())
	defer cancel()
	var errs []error
	for _, dst := range allowed {
		up, err := proxy.DialUpstream(ctx, false, h.client, dst, svc.ConnectTimeout.D(), p.AvoidPort)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		flow.SetDestination(flow.Local, dst)
		flow.SetServerLeg(proxy.AddrPort(up.LocalAddr()), dst)
		h.replyDeadline()
		if _, err := h.c.Write(appendReply(nil, Succeeded, flow.Upstream)); err != nil {
			up.Close()
			p.Flows.Remove(flow)
			return nil, nil, resultClosed, err
		}
		h.reply, h.replied = Succeeded, true
		p.statsMu.Lock()
		p.connects[destClass(q)]++
		p.statsMu.Unlock()
		return flow, up, resultOK, nil
	}
	p.Flows.Remove(flow)
	err := errors.Join(errs...)
	h.answer(dialReply(errs[len(errs)-1]))
	return nil, nil, resultConnect, err
}

// The well-known NAT64 prefixes (see nat64Embedded).
var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")
	nat64LocalUse  = netip.MustParsePrefix("64:ff9b:1::/48")
)

// nat64Embedded returns the IPv4 addresses a translator may take an
// address of a well-known NAT64 prefix for, and connect to. In
// 64:ff9b::/96 it is the last 32 bits (RFC 6052 2.2). 64:ff9b:1::/48
// (RFC 8215) is a range a network takes its own translation prefix
// from, of a length the gateway does not know: /48, /56 or /64 (the
// IPv4 address around the reserved octet u, bits 64-71), or /96 (the
// last 32 bits), the length most translators support and the one a
// reading as /48 missed (64:ff9b:1:fffe::10.0.0.5 passed a deny rule for
// 10.0.0.0/8 as 255.254.0.0). So each reading is returned. None is
// told apart by u or the suffix being zero, as RFC 6052 has them:
// translators such as Jool do not check them, so a client could set
// them to hide a reading. A reading of a.0.0.0 (0.0.0.0 too) is
// left out: it names a /8's network, no host, and is what the zero
// bits of a longer prefix read as (64:ff9b:1::/96 read as /48 gave
// 0.0.0.0, the gateway to onGateway: every destination was refused).
// Prefixes of other ranges a network chose for itself are not known
// here.
func nat64Embedded(a netip.Addr) []netip.Addr {
	if !a.Is6() || a.Is4In6() {
		return nil
	}
	b := a.As16()
	if nat64WellKnown.Contains(a) {
		return []netip.Addr{netip.AddrFrom4([4]byte(b[12:16]))}
	}
	if !nat64LocalUse.Contains(a) {
		return nil
	}
	var out []netip.Addr
	for _, v4 := range [][4]byte{
		{b[6], b[7], b[9], b[10]},   // /48
		{b[7], b[9], b[10], b[11]},  // /56
		{b[9], b[10], b[11], b[12]}, // /64
		[4]byte(b[12:16]),           // /96
	} {
		if v4[1]|v4[2]|v4[3] == 0 {
			continue
		}
		if e := netip.AddrFrom4(v4); !slices.Contains(out, e) {
			out = append(out, e)
		}
	}
	return out
}

// rooted returns name with a trailing dot: the resolver then looks up
// that name only. Without it Go's resolver appends resolv.conf's search
// domains (to a name with fewer dots than ndots, or one that does not
// resolve as it is), and the rules, which judged the name the client
// sent, let "wiki" reach wiki.internal.example past a deny rule for
// internal.example. The price: Go's resolver keys the hosts file's
// names of one label unrooted, so "printer" there is found no more as
// "printer." (a name with a dot, "printer.lan", is).
func rooted(name string) string {
	if strings.HasSuffix(name, ".") {
		return name
	}
	return name + "."
}

func destClass(q *Request) string {
	switch {
	case q.Name != "":
		return "domain"
	case q.Addr.Is4():
		return "ipv4"
	}
	return "ipv6"
}

// dialReply maps a failed connect to its reply code.
func dialReply(err error) Reply {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return ConnectionRefused
	case errors.Is(err, syscall.ENETUNREACH):
		return NetworkUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.EHOSTDOWN):
		return HostUnreachable
	case errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return TTLExpired
	}
	return GeneralFailure
}

// failResult names a handshake that ended on a read error.
func failResult(err error, otherwise string) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return resultTimeout
	}
	if err == io.EOF { // the client left between messages
		return resultClosed
	}
	return otherwise
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func containsByte(b []byte, v byte) bool {
	for _, x := range b {
		if x == v {
			return true
		}
	}
	return false
}
