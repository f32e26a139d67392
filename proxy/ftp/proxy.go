package ftp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
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
	proxy.Base
	sessions atomic.Int32
	nextPort atomic.Uint32
}

// splicing returns the splicer for data connections, or nil when the
// service relays them (splice.mode never).
func (p *Proxy) splicing() proxy.Splicer {
	if p.Service.Splice.Mode == config.SpliceNever {
		return nil
	}
	return p.Splicer()
}

// Serve accepts control connections on the listeners until ctx is done.
// Sessions already open keep running; CloseFlows ends them.
func (p *Proxy) Serve(ctx context.Context, listeners ...*net.TCPListener) error {
	return p.ServeWith(ctx, listeners, p.handle)
}

// handle runs one control connection.
func (p *Proxy) handle(c *net.TCPConn) {
	svc := p.Service
	flow := proxy.NewFlow(svc.Name, KindControl, proxy.AddrPort(c.RemoteAddr()), proxy.AddrPort(c.LocalAddr()))
	if n := p.sessions.Add(1); int(n) > p.conf().MaxSessions {
		p.sessions.Add(-1)
		c.Write([]byte("421 Too many FTP sessions through this gateway, try later.\r\n"))
		proxy.Reset(c)
		p.LogLimited("sessions", slog.LevelWarn, "ftp session cap reached, refusing new sessions",
			"max_sessions", p.conf().MaxSessions, logging.KeyClient, flow.Client, "fix", "raise ftp.max_sessions of the service")
		return
	}
	defer p.sessions.Add(-1)
	log, ok := p.Admit(c, flow)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(p.FlowContext(), svc.ConnectTimeout.D())
	up, err := proxy.DialUpstream(ctx, false, flow.Client, flow.Server, svc.ConnectTimeout.D(), p.AvoidPort)
	cancel()
	if err != nil {
		c.Write([]byte("421 The gateway cannot reach the FTP server.\r\n"))
		proxy.Reset(c)
		p.Flows.Remove(flow)
		// One key for every server: the client picks it (see the
		// forwarder's).
		p.LogLimited("upstream connect", slog.LevelWarn, "upstream connect failed",
			logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server, logging.Err(err))
		return
	}
	flow.SetServerLeg(proxy.AddrPort(up.LocalAddr()), flow.Backend)
	s := newSession(p, flow, c, up, log)
	log.Info("ftp session opened", logging.KeyUpstream, flow.Upstream, "internal", s.internal, "external", s.external)
	p.Event(proxy.EventOpened, flow, "ftp")
	reason := s.run()
	flow.SetState(proxy.StateClosing)
	log.Info("ftp session closed", logging.KeyReason, reason, "transfers", s.transfers.Load(),
		logging.KeyDuration, time.Since(flow.Started).Round(time.Millisecond))
	p.Event(proxy.EventClosed, flow, reason)
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
	r := p.conf().DataPorts
	n := uint32(r.Last) - uint32(r.First) + 1
	start := p.nextPort.Add(1)
	var lastErr error
	for i := range min(n, 256) {
		port := r.First + uint16((start+i)%n)
		lns, err := listenAll(p.FlowContext(), port, addrs)
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
