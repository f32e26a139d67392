package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"spliced/config"
	"spliced/logging"
)

// Base is what every proxy of a service shares: its configuration, the
// flow table, rate-limited logging, the events hook, the splicer, and the
// bookkeeping that lets CloseFlows end its flows. Proxies embed it.
type Base struct {
	Service *config.Service
	Flows   *FlowTable
	Log     *slog.Logger
	// Events, if set, is told of what happens to flows (Event* kinds).
	Events func(kind string, f *Flow, detail string)
	// AvoidPort, if set, tells an upstream connection to take another
	// local port (see AvoidFunc).
	AvoidPort AvoidFunc

	splicer     atomic.Pointer[Splicer]
	once        sync.Once
	limiter     *logging.Limiter
	flowCtx     context.Context
	cancelFlows context.CancelFunc
	wg          sync.WaitGroup
}

func (b *Base) init() {
	b.once.Do(func() {
		b.limiter = logging.NewLimiter(10 * time.Second)
		b.flowCtx, b.cancelFlows = context.WithCancel(context.Background())
		if b.Log == nil {
			b.Log = slog.New(slog.DiscardHandler)
		}
	})
}

// SetSplicer lets the proxy splice flows (nil: never).
func (b *Base) SetSplicer(s Splicer) {
	if s == nil {
		b.splicer.Store(nil)
		return
	}
	b.splicer.Store(&s)
}

// Splicer returns the splicer, or nil.
func (b *Base) Splicer() Splicer {
	if s := b.splicer.Load(); s != nil {
		return *s
	}
	return nil
}

// FlowContext is done when CloseFlows is called.
func (b *Base) FlowContext() context.Context {
	b.init()
	return b.flowCtx
}

// Go runs fn in a goroutine that CloseFlows waits for.
func (b *Base) Go(fn func()) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		fn()
	}()
}

// ServeWith accepts connections on the listeners until ctx is done,
// handling each in a goroutine that CloseFlows waits for. Connections
// already accepted keep running (a reload must not cut them).
func (b *Base) ServeWith(ctx context.Context, listeners []*net.TCPListener, handle func(*net.TCPConn)) error {
	b.init()
	return ServeListeners(ctx, listeners, &b.wg, handle, func(err error) {
		var ni *NotInterceptedError
		if errors.As(err, &ni) {
			b.LogLimited("not intercepted", slog.LevelWarn, "connection to the listen port refused", logging.KeyClient, ni.Client, logging.Err(err))
			return
		}
		b.LogLimited("accept", slog.LevelWarn, "accept failed", logging.Err(err))
	})
}

// CloseFlows ends every flow the proxy relays and waits for them.
func (b *Base) CloseFlows() {
	b.init()
	b.cancelFlows()
	b.wg.Wait()
}

// Wait waits until every flow has ended.
func (b *Base) Wait() { b.wg.Wait() }

// LogLimited logs at most one line per key every 10 s, counting the rest.
func (b *Base) LogLimited(key string, level slog.Level, msg string, attrs ...any) {
	b.init()
	b.LogLimitedTo(b.Log, key, level, msg, attrs...)
}

// LogLimitedTo is LogLimited writing to log (a flow's logger, with its
// attributes). Every line a client, a server or a scanner can trigger
// at will goes through it: the line that is logged carries "suppressed",
// the number of lines with its key dropped since the last one. Keys name
// a kind of event (a constant, or one per configured thing), not a peer.
func (b *Base) LogLimitedTo(log *slog.Logger, key string, level slog.Level, msg string, attrs ...any) {
	b.init()
	if !log.Enabled(context.Background(), level) {
		return
	}
	if ok, n := b.limiter.Allow(key); ok {
		if n > 0 {
			attrs = append(attrs, KeySuppressed, n)
		}
		log.Log(context.Background(), level, msg, attrs...)
	}
}

// KeySuppressed is the attribute of a rate-limited log line that counts
// the lines of its kind dropped before it.
const KeySuppressed = "suppressed"

// LogSuppressed returns how many rate-limited log lines were dropped.
func (b *Base) LogSuppressed() uint64 {
	b.init()
	return b.limiter.Suppressed()
}

// Event tells the Events hook, if any.
func (b *Base) Event(kind string, f *Flow, detail string) {
	if b.Events != nil {
		b.Events(kind, f, detail)
	}
}

// Admit takes a new flow on connection c into the flow table and applies
// the service's access policy. When the cap is reached or the policy
// denies it, c is reset, the refusal logged, and Admit returns false.
// Otherwise it returns the flow's logger.
// LogRefusal logs, rate-limited, a flow FlowTable.Admit refused with
// err (what the proxy did about it in what) and how to lift the cap.
// The two caps are limited apart: a client at its own cap must not hide
// that the table is full.
func (b *Base) LogRefusal(err error, what string, args ...any) {
	key, limit := "cap", slog.Any("max_flows", b.Flows.Max())
	if errors.Is(err, ErrClientCap) {
		key, limit = "client_cap", slog.Any("max_flows_per_client", b.Flows.MaxPerClient())
	}
	b.LogLimited(key, slog.LevelWarn, err.Error()+", "+what, append(args, limit, "fix", CapFix(err))...)
}

func (b *Base) Admit(c *net.TCPConn, flow *Flow) (*slog.Logger, bool) {
	b.init()
	if err := b.Flows.Admit(flow); err != nil {
		reset(c)
		b.LogRefusal(err, "refusing new flows with a reset", logging.KeyClient, flow.Client, logging.KeyServer, flow.Server)
		return nil, false
	}
	// Formatted only if the flow logs a line: most never do.
	log := logging.With(b.Log, logging.KeyFlow, flow.ID, logging.KeyClient, flow.Client, logging.KeyServer, flow.Server)
	if b.Service.Access.Decide(flow.Client.Addr(), flow.Server) == config.Deny {
		reset(c)
		b.Flows.Remove(flow)
		log.Info("flow denied by access policy")
		b.Event(EventDenied, flow, "access policy")
		return nil, false
	}
	return log, true
}
