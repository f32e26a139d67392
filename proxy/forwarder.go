// Package proxy holds spliced's control-mode proxies. They run on real
// kernel TCP sockets: a TPROXY listener accepts the client's connection
// (whose local address is the original destination), the proxy opens its
// own connection upstream, and relays.
//
// The Forwarder is the plain forwarder, the paper's class 1 proxy: it only
// decides at connection setup (access policy, upstream mode) and then
// copies bytes, through splice(2) pipes so they stay in the kernel. It
// costs two sockets and their buffers per flow; splicing (package gateway)
// removes both.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/internal/workpool"
	"spliced/logging"
)

// Splicer hands a flow to the splice engine; the gateway implements it.
// The caller has stopped reading and writing both connections and holds no
// bytes of its own. On success the connections are gone (closed silently)
// and the flow belongs to the splicer; on error they are intact and the
// caller keeps relaying.
type Splicer interface {
	Splice(ctx context.Context, f *Flow, client, upstream *net.TCPConn) error
}

// TransitionCosts are what a splicer measured its recent completed
// transitions to take on this machine: moving averages of the time from
// the start of a splice to the flow spliced, and from the start of an
// unsplice (for a flow watched for client data, the client's next data)
// to the sockets handed back to the proxy. The counts are of the
// transitions measured; a zero count means no estimate yet.
type TransitionCosts struct {
	Splice, Unsplice   time.Duration
	Splices, Unsplices uint64
	// QueuedBytes: spliced flows' packets pass through the daemon
	// (NFQUEUE), which costs the gateway more CPU per byte than relaying.
	QueuedBytes bool
}

// CostReporter is implemented by splicers that measure their
// transitions (the gateway): a proxy weighs a splice against relaying
// with it.
type CostReporter interface {
	TransitionCosts() TransitionCosts
}

// Forwarder is the plain forwarding proxy of one service. Its splicer,
// once set, splices flows when the service's splice policy says so, or
// when someone calls Flow.RequestSplice.
type Forwarder struct {
	Base
	poolOnce sync.Once
	pool     *Pool // direct mode: the backends
}

// backends returns the pool of a direct forwarder.
func (f *Forwarder) backends() *Pool {
	f.poolOnce.Do(func() {
		fw, _ := f.Service.Section().(*config.Forward)
		if fw == nil {
			fw = &config.Forward{BackendDownFor: config.Duration(config.DefaultBackendDownFor)}
		}
		var addrs []netip.AddrPort
		for _, b := range fw.Backends {
			addrs = append(addrs, b.AddrPort)
		}
		f.pool = NewPool(addrs, fw.Balance, fw.BackendDownFor.D())
	})
	return f.pool
}

// Metrics reports a direct forwarder's flows, failed connects and state
// per backend (MetricsSource); a transparent forwarder has none. The
// state is what an operator asks first of a load balancer (HAProxy's
// status and scur): from the counters alone a backend skipped for
// backend_down_for could not be told from one that got no flows.
func (f *Forwarder) Metrics() []Metric {
	if f.Service.ListenMode != config.ListenDirect {
		return nil
	}
	var out []Metric
	labels := []string{"backend"}
	for _, b := range f.backends().Stats() {
		up := 1.0
		if b.Down {
			up = 0
		}
		out = append(out,
			Metric{Name: "spliced_forward_backend_flows_total", Help: "Flows a direct forwarder sent to each backend.", Counter: true, Labels: labels, Values: []string{b.Backend}, Value: float64(b.Flows)},
			Metric{Name: "spliced_forward_backend_failures_total", Help: "Connects to a direct forwarder's backend that failed.", Counter: true, Labels: labels, Values: []string{b.Backend}, Value: float64(b.Failures)},
			Metric{Name: "spliced_forward_backend_relayed_flows", Help: "A direct forwarder's flows to each backend that the proxy relays now (spliced ones are not counted; least_conn compares these).", Labels: labels, Values: []string{b.Backend}, Value: float64(b.Active)},
			Metric{Name: "spliced_forward_backend_up", Help: "1 if a direct forwarder sends flows to the backend, 0 while it is skipped after a failed connect (forward.backend_down_for).", Labels: labels, Values: []string{b.Backend}, Value: up})
	}
	return out
}

// Serve accepts flows on the listeners until ctx is done, then closes them
// and returns. Flows already accepted keep running (a reload must not cut
// them); CloseFlows ends them.
func (f *Forwarder) Serve(ctx context.Context, listeners ...*net.TCPListener) error {
	return f.ServeWith(ctx, listeners, f.handle)
}

// ServeListeners accepts connections on the listeners until ctx is done,
// then closes them and returns. Each connection is handled in a goroutine
// counted in wg. acceptFailed hears of accept errors other than the
// listener closing (EMFILE and friends), after which the loop backs off
// instead of spinning, and of connections refused as not intercepted
// (NotInterceptedError), from the handlers' goroutines: it must be safe
// for concurrent use.
func ServeListeners(ctx context.Context, listeners []*net.TCPListener, wg *sync.WaitGroup, handle func(*net.TCPConn), acceptFailed func(error)) error {
	var loops sync.WaitGroup
	errc := make(chan error, len(listeners))
	for _, ln := range listeners {
		loops.Add(1)
		go func() {
			defer loops.Done()
			errc <- acceptLoop(ctx, ln, wg, handle, acceptFailed)
		}()
	}
	stop := context.AfterFunc(ctx, func() {
		for _, ln := range listeners {
			ln.Close()
		}
	})
	defer stop()
	loops.Wait()
	close(errc)
	var errs []error
	for err := range errc {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// handlerIdle is how long a goroutine that handled a connection waits
// for the next one before it ends.
const handlerIdle = 2 * time.Second

// handlersIdleMax is how many such goroutines wait at most, per
// listener: enough for the connections a busy service accepts while
// others end, few enough that a burst of connections (each handed to the
// gateway at once by a splice) leaves no crowd of idle stacks.
const handlersIdleMax = 64

// acceptLoop accepts connections on ln and runs handle on each in a
// goroutine that wg counts while it handles it. A goroutine that is done
// with its connection takes the next one accepted within handlerIdle
// (see workpool): a new goroutine grows its stack by copying it, several
// times before it gets to an HTTP request's deepest calls, which was 5%
// of the CPU a short connection cost the HTTP proxy (pprof, one request
// per connection).
func acceptLoop(ctx context.Context, ln *net.TCPListener, wg *sync.WaitGroup, handle func(*net.TCPConn), acceptFailed func(error)) error {
	handlers := workpool.New(handlerIdle, handlersIdleMax)
	defer handlers.Close() // the loop ended: idle handlers end
	listenPort := addrPort(ln.Addr()).Port()
	transparent := isTransparent(ln)
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			acceptFailed(err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		wg.Add(1)
		handlers.Go(func() {
			defer wg.Done()
			// The check looks at the gateway's addresses (a netlink
			// dump): in the handler, so that a client that connects
			// to the listen port again and again does not hold up
			// the accepts of every other connection.
			if transparent && addrPort(c.LocalAddr()).Port() == listenPort && ownAddress(addrPort(c.LocalAddr()).Addr()) {
				// Not intercepted: a client connected to the TPROXY
				// listener itself (the gateway's address and the
				// listen port). Its destination is the listener, so
				// the proxy would connect to itself, again and again:
				// one such connection to a NAT service made 5,000
				// flows. (A service may intercept its own listen port
				// on other hosts.)
				acceptFailed(&NotInterceptedError{Client: addrPort(c.RemoteAddr()), Listener: addrPort(c.LocalAddr())})
				reset(c)
				return
			}
			handle(c)
		})
	}
}

// isOwnAddress reports whether a is an address of the gateway's (of one
// of its interfaces, or loopback). It reads the interfaces' addresses,
// so it is for the rare case only.
func isOwnAddress(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // cannot tell: refuse rather than loop
	}
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == a {
				return true
			}
		}
	}
	return false
}

// ownAddress is isOwnAddress; tests replace it.
var ownAddress = isOwnAddress

// NotInterceptedError is a connection a transparent service's listener
// refused: one made to the listener itself, not intercepted.
type NotInterceptedError struct{ Client, Listener netip.AddrPort }

func (e *NotInterceptedError) Error() string {
	return fmt.Sprintf("refused a connection from %s to the TPROXY listener %s itself: clients reach a transparent service through the ports it intercepts, not its listen port", e.Client, e.Listener)
}

func (f *Forwarder) handle(c *net.TCPConn) {
	svc := f.Service
	flow := NewFlow(svc.Name, "forward", addrPort(c.RemoteAddr()), addrPort(c.LocalAddr()))
	log, ok := f.Admit(c, flow)
	if !ok {
		return
	}
	if svc.ListenMode == config.ListenDirect {
		f.handleDirect(c, flow)
		return
	}
	ctx, cancel := context.WithTimeout(f.FlowContext(), svc.ConnectTimeout.D())
	from := flow.Client
	if svc.Upstream == config.Transparent && f.AvoidPort != nil && f.AvoidPort(flow.Client, flow.Server) != AvoidNot {
		from = netip.AddrPortFrom(from.Addr(), 0)
	}
	up, err := DialUpstream(ctx, svc.Upstream == config.Transparent, from, flow.Server, svc.ConnectTimeout.D(), f.AvoidPort)
	cancel()
	if err != nil {
		reset(c)
		f.Flows.Remove(flow)
		// One key for every destination: the client picks it, and a
		// scanner sweeping dead addresses got a line for each.
		f.LogLimited("upstream connect", slog.LevelWarn, "upstream connect failed",
			logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server, logging.Err(err))
		return
	}
	flow.SetServerLeg(addrPort(up.LocalAddr()), flow.Backend)
	log.Info("flow opened", logging.KeyUpstream, flow.Upstream, logging.KeyMode, string(svc.Upstream))
	f.Event(EventOpened, flow, string(svc.Upstream))

	f.serve(flow, c, up, log, true, nil)
}

// Forward relays a flow whose upstream connection another proxy opened
// (a SOCKS5 proxy after its handshake), splicing it when the service's
// splice policy says so, until it ends or the gateway took it; then it
// removes the flow from the table. It reports nothing: the flow's end is
// logged and sent as an event, as for the forwarder's own flows.
func (f *Forwarder) Forward(flow *Flow, client, upstream *net.TCPConn, log *slog.Logger) {
	f.serve(flow, client, upstream, log, true, nil)
}

// handleDirect connects a direct flow to a backend of the pool, trying
// the next one when a connect fails, and forwards it. Each connect has
// connect_timeout of its own: with one for all, a backend that never
// answered used it up, and the next ones, left no time, failed at once
// and were marked down although they were up.
func (f *Forwarder) handleDirect(c *net.TCPConn, flow *Flow) {
	svc, pool := f.Service, f.backends()
	var errs []error
	var up *net.TCPConn
	var backend *Backend
	for _, b := range pool.Pick(time.Now()) {
		if l, self := f.ownListener(b.Addr); self {
			pool.Failed(b, time.Now())
			f.LogLimited("backend is listener "+b.Addr.String(), slog.LevelError, "backend is this service's own listener, skipping it",
				"backend", b.Addr, "listen_on", l, logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client,
				"fix", "list the servers behind the gateway in forward.backends; a server on the gateway itself needs a port the service does not listen on")
			errs = append(errs, fmt.Errorf("backend %s is this service's own listener %s", b.Addr, l))
			continue
		}
		ctx, cancel := context.WithTimeout(f.FlowContext(), svc.ConnectTimeout.D())
		c, err := DialUpstream(ctx, false, flow.Client, b.Addr, svc.ConnectTimeout.D(), f.AvoidPort)
		cancel()
		if err != nil {
			if f.FlowContext().Err() != nil {
				// The service is stopping: the backend is not to blame.
				errs = append(errs, err)
				break
			}
			pool.Failed(b, time.Now())
			f.LogLimited("backend failed "+b.Addr.String(), slog.LevelWarn, "backend failed, skipping it for a while",
				"backend", b.Addr, "for", pool.downFor, logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.Err(err))
			errs = append(errs, err)
			continue
		}
		pool.Succeeded(b)
		up, backend = c, b
		break
	}
	if up == nil {
		reset(c)
		f.Flows.Remove(flow)
		f.LogLimited("no backend", slog.LevelWarn, "no backend reachable, flow reset",
			logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.Err(errors.Join(errs...)))
		return
	}
	backend.Opened()
	flow.SetDestination(flow.Server, backend.Addr) // Local: the listen address the client connected to
	flow.SetServerLeg(addrPort(up.LocalAddr()), backend.Addr)
	log := f.Log.With(logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server)
	log.Info("flow opened", logging.KeyUpstream, flow.Upstream, logging.KeyMode, string(svc.Upstream), "listen", addrPort(c.LocalAddr()))
	f.Event(EventOpened, flow, string(svc.Upstream))
	f.serve(flow, c, up, log, true, backend)
}

// ownListener reports whether a connect to backend would reach one of
// the service's own listeners (a backend on the gateway, on a port it
// listens on for every address), and which. The configuration refuses
// the cases it can tell without the gateway's addresses; a flow sent
// there would connect to the service again, and again, until the flow
// table was full. Only a backend on a listen port costs a lookup.
func (f *Forwarder) ownListener(backend netip.AddrPort) (netip.AddrPort, bool) {
	l, ok := config.OwnListener(f.Service.ListenOn, backend, false)
	if ok {
		return l, true
	}
	if _, wild := config.OwnListener(f.Service.ListenOn, backend, true); wild && IsGatewayAddress(backend.Addr()) {
		return config.OwnListener(f.Service.ListenOn, backend, true)
	}
	return netip.AddrPort{}, false
}

// serve relays a flow until it ends or is spliced. policy says whether
// the service's splice policy applies (a flow given back by an unsplice
// is spliced again only on request). Once spliced, the gateway may give
// the flow back (Flow.Resume): it is then served again. A direct flow's
// backend counts it while it is relayed, here, so that it counts again
// after an unsplice.
func (f *Forwarder) serve(flow *Flow, client, upstream *net.TCPConn, log *slog.Logger, policy bool, backend *Backend) {
	if backend != nil {
		done := backend.Relaying()
		defer done()
	}
	if size := int(f.Service.Splice.SocketBuffer); size > 0 {
		// Before any byte is relayed: a smaller buffer set later would
		// not bound what the sockets already hold.
		for _, c := range []*net.TCPConn{client, upstream} {
			if err := setSocketBuffers(c, size); err != nil {
				log.Debug("set the socket buffers (splice.socket_buffer)", logging.Err(err))
			}
		}
	}
	relay := &Relay{Client: client, Upstream: upstream, Flow: flow, IdleTimeout: f.Service.IdleTimeout.D()}
	stop := context.AfterFunc(f.FlowContext(), relay.Close)
	defer stop()
	// The resume function outlives a splice: it captures no logger (a
	// spliced flow keeps as little as it can), the flow's is made again.
	flow.SetResume(func(client, upstream *net.TCPConn) {
		f.Go(func() { f.serve(flow, client, upstream, f.flowLog(flow), false, backend) })
	})
	if f.relayAndSplice(flow, relay, log, policy) {
		return // the gateway owns the flow now, and logs its end
	}
	flow.SetResume(nil)
	flow.SetState(StateClosing)
	f.Event(EventClosed, flow, "")
	f.Flows.Remove(flow)
}

// flowLog is the logger of a flow given back by an unsplice: the
// service's, with the attributes Admit gives a flow's logger (and the
// SOCKS5 user).
func (f *Forwarder) flowLog(flow *Flow) *slog.Logger {
	log := f.Log.With(logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server)
	if flow.User != "" {
		log = log.With("user", flow.User)
	}
	return log
}

// relayAndSplice relays the flow, splicing it when the service's policy
// (if policy) or an operator asks. It reports whether the flow was
// spliced.
func (f *Forwarder) relayAndSplice(flow *Flow, relay *Relay, log *slog.Logger, policy bool) (spliced bool) {
	pol := f.Service.Splice
	if !policy {
		pol.Mode = config.SpliceNever
	}
	if f.Splicer() != nil {
		// Splice at once before anything else runs for the flow (no
		// goroutine waits for an operator's request meanwhile: thousands
		// of flows may be splicing at once).
		if pol.Mode == config.SpliceImmediate && f.trySplice(flow, relay, log) {
			return true
		}
		done := make(chan struct{})
		defer close(done)
		go func() {
			for {
				select {
				case <-flow.SpliceRequested():
					relay.Pause()
				case <-done:
					return
				}
			}
		}()
		switch pol.Mode {
		case config.SpliceBytes:
			relay.PauseAfter = int64(pol.Bytes)
		case config.SpliceTime:
			t := time.AfterFunc(time.Until(flow.Started.Add(pol.After.D())), relay.Pause)
			defer t.Stop()
		}
	}
	for {
		outcome, err := relay.Run()
		if outcome == Paused {
			if f.trySplice(flow, relay, log) {
				return true
			}
			relay.PauseAfter = 0 // splice once; a failed attempt is not retried
			continue
		}
		attrs := []any{logging.KeyBytesC2S, flow.C2S.Load(), logging.KeyBytesS2C, flow.S2C.Load(),
			logging.KeyDuration, time.Since(flow.Started).Round(time.Millisecond), logging.KeyReason, outcome.String(), logging.KeyMode, "proxied"}
		if err != nil {
			attrs = append(attrs, logging.Err(err))
		}
		log.Info("flow closed", attrs...)
		return false
	}
}

// trySplice asks the splicer to take the flow. A half-closed flow stays
// proxied.
func (f *Forwarder) trySplice(flow *Flow, relay *Relay, log *slog.Logger) bool {
	sp := f.Splicer()
	if sp == nil {
		return false
	}
	if relay.HalfClosed() {
		flow.SetSpliceError(errHalfClosed)
		log.Debug("not splicing a half-closed flow")
		return false
	}
	if TwoFamilies(relay.Client, relay.Upstream) {
		// The engine cannot translate IPv4 to IPv6. The gateway found
		// out only after diverting the flow's packets and capturing
		// both sockets, and the warning came for every flow: a client
		// of a direct service whose backends are of the other family
		// wrote one into the log per connection.
		flow.SetSpliceError(ErrTwoFamilies)
		attrs := []any{logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server, logging.Err(ErrTwoFamilies)}
		if f.Service.ListenMode == config.ListenDirect {
			attrs = append(attrs, "fix", "give each family a direct service of its own, whose forward.backends are of its listen_on addresses' family")
		}
		f.LogLimited("splice families", slog.LevelWarn, "flow stays proxied", attrs...)
		f.Event(EventSpliceFailed, flow, ErrTwoFamilies.Error())
		return false
	}
	err := sp.Splice(f.FlowContext(), flow, relay.Client, relay.Upstream)
	if err == nil {
		return true
	}
	flow.SetSpliceError(err)
	level := slog.LevelWarn
	if errors.Is(err, ErrSpliceRuledOut) {
		level = slog.LevelDebug // the splicer says why, once in a while
	}
	log.Log(context.Background(), level, "flow stays proxied", logging.Err(err))
	f.Event(EventSpliceFailed, flow, err.Error())
	return false
}

// ErrSpliceRuledOut is in the error of a splice the gateway's settings
// rule out for every flow like this one (such as strict reverse path
// filtering for a NAT flow): the splicer logs why, rate-limited, and the
// proxies log each flow that stays proxied at debug level only, not as a
// warning per flow.
var ErrSpliceRuledOut = errors.New("ruled out for such flows")

var errHalfClosed = errors.New("splice abandoned: the flow is half-closed")

// ErrTwoFamilies is the splice error of a flow whose two connections are
// of different address families (see TwoFamilies).
var ErrTwoFamilies = errors.New("splice abandoned: the client's and the server's connections are of different address families (IPv4 and IPv6), which the engine does not translate")

// TwoFamilies reports whether a flow's connections to its client and to
// its server are of different address families: the splice engine does
// not translate IPv4 to IPv6. (An IPv4 connection on an IPv6 socket has
// mapped addresses: IPv4.)
func TwoFamilies(client, upstream *net.TCPConn) bool {
	c, u := addrPort(client.LocalAddr()).Addr(), addrPort(upstream.LocalAddr()).Addr()
	return c.Is4() != u.Is4()
}

// Kinds of flow events (the API's names).
const (
	EventOpened       = "opened"
	EventDenied       = "denied"
	EventSpliceFailed = "splice_failed"
	EventClosed       = "closed"
)

// ListenService opens the service's listeners: its IPv4 and IPv6 TPROXY
// listeners, or in direct mode a plain listener on each listen_on address.
func ListenService(ctx context.Context, svc *config.Service) ([]*net.TCPListener, error) {
	return ListenServiceReusing(ctx, svc, nil)
}

// ListenServiceReusing is ListenService for a reload: where one of held
// (the listeners of a service being replaced) already listens on an
// address the service needs, the service gets a duplicate of that socket
// instead of a new one, which could not bind the address while the old
// one holds it; the connections in its accept queue are kept. The held
// listeners stay open: their service closes them when it stops.
func ListenServiceReusing(ctx context.Context, svc *config.Service, held []*net.TCPListener) ([]*net.TCPListener, error) {
	var lns []*net.TCPListener
	fail := func(err error) ([]*net.TCPListener, error) {
		for _, l := range lns {
			l.Close()
		}
		return nil, err
	}
	open := func(addr netip.AddrPort, transparent bool) (*net.TCPListener, error) {
		for _, h := range held {
			if addrPort(h.Addr()) == addr && isTransparent(h) == transparent {
				return dupListener(h, svc.Backlog)
			}
		}
		if transparent {
			network := "tcp4"
			if addr.Addr().Is6() {
				network = "tcp6"
			}
			return ListenTransparent(ctx, network, addr.Port(), svc.Backlog)
		}
		ln, err := ListenAt(ctx, addr, false)
		if err == nil && svc.Backlog > 0 {
			if err = setBacklog(ln, svc.Backlog); err != nil {
				ln.Close()
			}
		}
		return ln, err
	}
	if svc.ListenMode == config.ListenDirect {
		for j, a := range svc.ListenOn {
			ln, err := open(a.AddrPort, false)
			if err != nil {
				return fail(listenOnError(svc.Name, j, a.AddrPort, err, held))
			}
			lns = append(lns, ln)
		}
		return lns, nil
	}
	for _, a := range []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()} {
		addr := netip.AddrPortFrom(a, uint16(svc.Listen))
		ln, err := open(addr, true)
		if err != nil {
			return fail(fmt.Errorf("service %s: listen %s port %d: %w%s", svc.Name, family(a), svc.Listen, err, heldHint(err, addr, held)))
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// listenOnError says why a direct service could not listen on its
// listen_on[j] address a, and what fixes it where the cause is usual.
// held are the listeners of the configuration a reload replaces.
func listenOnError(service string, j int, a netip.AddrPort, err error, held []*net.TCPListener) error {
	hint := heldHint(err, a, held)
	switch {
	case hint != "":
	case errors.Is(err, unix.EADDRNOTAVAIL):
		sysctl := "net.ipv4.ip_nonlocal_bind"
		if a.Addr().Is6() {
			sysctl = "net.ipv6.ip_nonlocal_bind"
		}
		hint = fmt.Sprintf(": %v is no address of the gateway's interfaces; use one of them, or for an address that comes later (a VRRP address on a backup) set %s=1", a.Addr(), sysctl)
	case errors.Is(err, unix.EADDRINUSE):
		hint = fmt.Sprintf(": another socket listens there (ss -ltnp 'sport = :%d' shows which); stop it or use another port", a.Port())
	}
	return fmt.Errorf("service %s: listen_on[%d] %s: %w%s", service, j, a, err, hint)
}

// heldHint explains a reload's EADDRINUSE on a when the socket in the
// way is one of held, the running configuration's listeners: a listen
// address changed between a wildcard (0.0.0.0, [::], or a transparent
// service's listeners) and one address on the same port. Linux lets no
// socket listen on both while the other does, and the old one is closed
// only once the reload succeeded. Told "another socket listens there",
// an operator found spliced itself in ss, and nothing to stop.
func heldHint(err error, a netip.AddrPort, held []*net.TCPListener) string {
	if !errors.Is(err, unix.EADDRINUSE) {
		return ""
	}
	for _, h := range held {
		ha := addrPort(h.Addr())
		if ha.Port() != a.Port() || ha.Addr().Is4() != a.Addr().Is4() || ha == a {
			continue
		}
		if ha.Addr().IsUnspecified() || a.Addr().IsUnspecified() {
			return fmt.Sprintf(": the running configuration's listener on %s holds that port until the reload is done, and no socket can take one port on every address and on one of them at once; reload once without the old listener (its flows keep running; connections meanwhile are refused), then with the new one, or restart spliced", ha)
		}
	}
	return ""
}

// dupListener returns a listener on a duplicate of ln's socket, with the
// accept queue length backlog (0: unchanged).
func dupListener(ln *net.TCPListener, backlog int) (*net.TCPListener, error) {
	f, err := ln.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	return withBacklog(l.(*net.TCPListener), backlog)
}

// isTransparent reports whether a listener has IP_TRANSPARENT (or
// IPV6_TRANSPARENT) set.
func isTransparent(ln *net.TCPListener) bool {
	raw, err := ln.SyscallConn()
	if err != nil {
		return false
	}
	v := 0
	raw.Control(func(fd uintptr) {
		level, opt := transparentOption(!addrPort(ln.Addr()).Addr().Is4())
		v, _ = unix.GetsockoptInt(int(fd), level, opt)
	})
	return v == 1
}
