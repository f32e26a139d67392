package ftp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"spliced/config"
	"spliced/logging"
	"spliced/proxy"
)

// Kinds of proxy a flow of this package shows.
const (
	KindControl = "ftp"
	KindData    = "ftp-data"
)

// Proxy is the FTP proxy of one service.
type Proxy struct {
	Service *config.Service
	Flows   *proxy.FlowTable
	Log     *slog.Logger
	// Events, if set, is told of what happens to flows (proxy.Event*).
	Events func(kind string, f *proxy.Flow, detail string)

	splicer     atomic.Pointer[proxy.Splicer]
	once        sync.Once
	limiter     *logging.Limiter
	flowCtx     context.Context
	cancelFlows context.CancelFunc
	wg          sync.WaitGroup
	sessions    atomic.Int32
	nextPort    atomic.Uint32
}

// SetSplicer lets the proxy splice data connections (nil: relay them).
func (p *Proxy) SetSplicer(s proxy.Splicer) {
	if s == nil {
		p.splicer.Store(nil)
		return
	}
	p.splicer.Store(&s)
}

func (p *Proxy) getSplicer() proxy.Splicer {
	if s := p.splicer.Load(); s != nil && p.Service.Splice.Mode != config.SpliceNever {
		return *s
	}
	return nil
}

func (p *Proxy) init() {
	p.once.Do(func() {
		p.limiter = logging.NewLimiter(10 * time.Second)
		p.flowCtx, p.cancelFlows = context.WithCancel(context.Background())
		if p.Log == nil {
			p.Log = slog.New(slog.DiscardHandler)
		}
	})
}

// Serve accepts control connections on the listeners until ctx is done.
// Sessions already open keep running; CloseFlows ends them.
func (p *Proxy) Serve(ctx context.Context, listeners ...*net.TCPListener) error {
	p.init()
	return proxy.ServeListeners(ctx, listeners, &p.wg, p.handle, func(err error) {
		p.logLimited("accept", slog.LevelWarn, "accept failed", logging.Err(err))
	})
}

// CloseFlows ends every session and relayed data connection, and waits
// for them.
func (p *Proxy) CloseFlows() {
	p.init()
	p.cancelFlows()
	p.wg.Wait()
}

func (p *Proxy) logLimited(key string, level slog.Level, msg string, attrs ...any) {
	if ok, n := p.limiter.Allow(key); ok {
		if n > 0 {
			attrs = append(attrs, "suppressed", n)
		}
		p.Log.Log(context.Background(), level, msg, attrs...)
	}
}

func (p *Proxy) event(kind string, f *proxy.Flow, detail string) {
	if p.Events != nil {
		p.Events(kind, f, detail)
	}
}

// handle runs one control connection.
func (p *Proxy) handle(c *net.TCPConn) {
	svc := p.Service
	flow := proxy.NewFlow(svc.Name, KindControl, proxy.AddrPort(c.RemoteAddr()), proxy.AddrPort(c.LocalAddr()))
	if n := p.sessions.Add(1); int(n) > svc.FTP.MaxSessions {
		p.sessions.Add(-1)
		c.Write([]byte("421 Too many FTP sessions through this gateway, try later.\r\n"))
		proxy.Reset(c)
		p.logLimited("sessions", slog.LevelWarn, "ftp session cap reached, refusing new sessions",
			"max_sessions", svc.FTP.MaxSessions, logging.KeyClient, flow.Client, "fix", "raise ftp.max_sessions of the service")
		return
	}
	defer p.sessions.Add(-1)
	if !p.Flows.Admit(flow) {
		proxy.Reset(c)
		p.logLimited("cap", slog.LevelWarn, "flow cap reached, refusing new flows with a reset",
			"max_flows", p.Flows.Max(), logging.KeyClient, flow.Client, logging.KeyServer, flow.Server,
			"fix", "raise limits.max_flows or add gateways")
		return
	}
	log := p.Log.With(logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server)
	if svc.Access.Decide(flow.Client.Addr(), flow.Server) == config.Deny {
		proxy.Reset(c)
		p.Flows.Remove(flow)
		log.Info("flow denied by access policy")
		p.event(proxy.EventDenied, flow, "access policy")
		return
	}
	ctx, cancel := context.WithTimeout(p.flowCtx, svc.ConnectTimeout.D())
	up, err := proxy.DialUpstream(ctx, false, flow.Client, flow.Server, svc.ConnectTimeout.D())
	cancel()
	if err != nil {
		c.Write([]byte("421 The gateway cannot reach the FTP server.\r\n"))
		proxy.Reset(c)
		p.Flows.Remove(flow)
		p.logLimited("dial "+flow.Server.String(), slog.LevelWarn, "upstream connect failed",
			logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server, logging.Err(err))
		return
	}
	flow.Upstream = proxy.AddrPort(up.LocalAddr())
	s := newSession(p, flow, c, up, log)
	log.Info("ftp session opened", logging.KeyUpstream, flow.Upstream, "internal", s.internal, "external", s.external)
	p.event(proxy.EventOpened, flow, "ftp")
	reason := s.run()
	flow.SetState(proxy.StateClosing)
	log.Info("ftp session closed", logging.KeyReason, reason, "transfers", s.transfers.Load(),
		logging.KeyDuration, time.Since(flow.Started).Round(time.Millisecond))
	p.event(proxy.EventClosed, flow, reason)
	p.Flows.Remove(flow)
}

// dataAddr is an address a data listener binds, transparently when it
// may not be the gateway's own.
type dataAddr struct {
	addr        netip.Addr
	transparent bool
}

// listenData opens data listeners, one per address, all on one port of
// the service's data range, trying the ports in turn from where the last
// search ended.
func (p *Proxy) listenData(addrs ...dataAddr) ([]*net.TCPListener, error) {
	r := p.Service.FTP.DataPorts
	n := uint32(r.Last) - uint32(r.First) + 1
	start := p.nextPort.Add(1)
	var lastErr error
	for i := range min(n, 256) {
		port := r.First + uint16((start+i)%n)
		lns, err := listenAll(p.flowCtx, port, addrs)
		if err == nil {
			p.nextPort.Store(start + i)
			return lns, nil
		}
		lastErr = err
		if !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
	}
	return nil, fmt.Errorf("no free data port in %s: %w", r, lastErr)
}

func listenAll(ctx context.Context, port uint16, addrs []dataAddr) ([]*net.TCPListener, error) {
	var lns []*net.TCPListener
	for _, a := range addrs {
		ln, err := proxy.ListenAt(ctx, netip.AddrPortFrom(a.addr, port), a.transparent)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// localAddrTowards returns the gateway's source address on the route to
// dst: connecting a UDP socket looks the route up and sends nothing.
func localAddrTowards(dst netip.Addr) (netip.Addr, error) {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9)))
	if err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}
