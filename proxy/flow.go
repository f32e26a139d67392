package proxy

import (
	"cmp"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// State of a flow as operators see it.
type State int32

const (
	StateProxied  State = iota // relayed by a proxy through two kernel sockets
	StateSplicing              // being handed from the proxy to the splice engine
	StateSpliced               // forwarded packet by packet; no gateway socket
	StateClosing               // ending
)

func (s State) String() string {
	switch s {
	case StateProxied:
		return "proxied"
	case StateSplicing:
		return "splicing"
	case StateSpliced:
		return "spliced"
	case StateClosing:
		return "closing"
	}
	return "unknown"
}

// Flow is one client connection relayed by a proxy, with the upstream
// connection it opened for it.
type Flow struct {
	ID       uint64
	Service  string
	Proxy    string         // kind of proxy: "forward", ...
	Client   netip.AddrPort // the client's address
	Server   netip.AddrPort // the original destination
	Upstream netip.AddrPort // local address of the upstream connection: what the server sees
	Started  time.Time

	state atomic.Int32
	// Bytes relayed by the proxy in user space (well, through splice(2)
	// pipes) since the flow started, client to server and back.
	C2S, S2C atomic.Int64
	// SplicedAt is when the flow was last spliced (monotime, 0 if
	// never; monotime.Wall shows it).
	SplicedAt atomic.Int64
	// UnspliceStarted is when the flow's last unsplice began (monotime,
	// 0 if never): for a flow unspliced on client data,
	// when the gateway saw the client's next data. Set before the
	// proxy gets the flow back.
	UnspliceStarted atomic.Int64

	// Backend is the address the upstream connection goes to (for the
	// forwarder, the original destination).
	Backend netip.AddrPort
	// Local is the client leg's local address when it is not Server: a
	// direct service's listen address. Zero for transparent flows.
	Local netip.AddrPort
	// User is who the client authenticated as (SOCKS5), or "".
	User string
	// legMu guards Upstream and Backend once the flow is in the table: a
	// proxy changes them (the HTTP proxy reconnects to another backend)
	// with SetServerLeg while others read them with ServerLeg. It guards
	// spliceReq's creation too.
	legMu sync.Mutex

	// spliceReq carries requests (an operator's) to splice the flow now.
	// Made on first use (under legMu): a flow spliced at once never
	// needs it, and a spliced flow keeps as little as it can.
	spliceReq chan struct{}
	// spliceErr is why the last splice was abandoned, if it was.
	spliceErr atomic.Pointer[string]
	// ended: the flow's ends are done with it, though it stays in the
	// table a while (FlowTable.Ended; under its mu).
	ended bool
	// UnspliceOnClientData asks the gateway, when it splices the flow, to
	// unsplice it as soon as the client sends new data (set by proxies
	// that read every request, such as the HTTP proxy).
	UnspliceOnClientData atomic.Bool
	// resume takes the flow back into its proxy after an unsplice.
	resume atomic.Pointer[func(client, upstream *net.TCPConn)]
}

// SetResume is called by the proxy relaying the flow: fn takes the flow
// back, with two connected sockets, after the gateway unspliced it. nil
// means the proxy cannot take it back (unsplice is refused).
func (f *Flow) SetResume(fn func(client, upstream *net.TCPConn)) {
	if fn == nil {
		f.resume.Store(nil)
		return
	}
	f.resume.Store(&fn)
}

// CanResume reports whether the flow's proxy can take it back.
func (f *Flow) CanResume() bool { return f.resume.Load() != nil }

// Resume gives the flow back to its proxy, which relays client and
// upstream from now on. It reports false when no proxy takes it.
func (f *Flow) Resume(client, upstream *net.TCPConn) bool {
	fn := f.resume.Load()
	if fn == nil {
		return false
	}
	(*fn)(client, upstream)
	return true
}

// NewFlow returns a flow in state proxied.
func NewFlow(service, proxy string, client, server netip.AddrPort) *Flow {
	return &Flow{Service: service, Proxy: proxy, Client: client, Server: server, Backend: server, Started: time.Now()}
}

// State returns the flow's current state.
func (f *Flow) State() State { return State(f.state.Load()) }

// SetState changes the flow's state.
func (f *Flow) SetState(s State) { f.state.Store(int32(s)) }

// ChangeState changes the flow's state to s if it is from, and reports
// whether it did.
func (f *Flow) ChangeState(from, s State) bool { return f.state.CompareAndSwap(int32(from), int32(s)) }

// RequestSplice asks the proxy relaying the flow to splice it as soon as it
// can. It returns at once; State and SpliceError tell what happened.
func (f *Flow) RequestSplice() {
	f.spliceErr.Store(nil)
	select {
	case f.requests() <- struct{}{}:
	default: // a request is pending already
	}
}

// SpliceRequested delivers the requests of RequestSplice.
func (f *Flow) SpliceRequested() <-chan struct{} { return f.requests() }

func (f *Flow) requests() chan struct{} {
	f.legMu.Lock()
	defer f.legMu.Unlock()
	if f.spliceReq == nil {
		f.spliceReq = make(chan struct{}, 1)
	}
	return f.spliceReq
}

// SetSpliceError records why a splice was abandoned.
func (f *Flow) SetSpliceError(err error) {
	s := err.Error()
	f.spliceErr.Store(&s)
}

// SpliceError is why the last splice was abandoned, or "".
func (f *Flow) SpliceError() string {
	if s := f.spliceErr.Load(); s != nil {
		return *s
	}
	return ""
}

// FlowTable holds the flows of all proxies, enforces the flow cap and hands
// out IDs.
type FlowTable struct {
	max    int
	nextID atomic.Uint64
	mu     sync.Mutex
	flows  map[uint64]*Flow
	// perService counts the flows of each service, spliced ones
	// included (a SOCKS5 service's max_sessions counts them), but not
	// those that ended and wait to leave the table (Ended).
	perService map[string]int
}

// NewFlowTable returns a table admitting at most max flows at once.
func NewFlowTable(max int) *FlowTable {
	return &FlowTable{max: max, flows: map[uint64]*Flow{}, perService: map[string]int{}}
}

// ServiceLen is the number of flows of a service, spliced ones included,
// ended ones not (see Ended).
func (t *FlowTable) ServiceLen(service string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.perService[service]
}

// Admit gives f an ID and adds it, unless the table is full.
func (t *FlowTable) Admit(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.flows) >= t.max {
		return false
	}
	f.ID = t.nextID.Add(1)
	t.flows[f.ID] = f
	t.perService[f.Service]++
	return true
}

// Adopt adds a flow that keeps the ID it was given (a spliced flow a
// restarted daemon found in the kernel), even above the cap; IDs handed
// out later are above it.
func (t *FlowTable) Adopt(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if f.ID == 0 || t.flows[f.ID] != nil {
		return false
	}
	for {
		n := t.nextID.Load()
		if n >= f.ID || t.nextID.CompareAndSwap(n, f.ID) {
			break
		}
	}
	t.flows[f.ID] = f
	t.perService[f.Service]++
	return true
}

// Remove drops f from the table.
func (t *FlowTable) Remove(f *Flow) {
	t.mu.Lock()
	if t.flows[f.ID] == f {
		delete(t.flows, f.ID)
		t.endLocked(f)
	}
	t.mu.Unlock()
}

// Ended says that f's ends are done with it (a spliced flow closed both
// ways, or reset) while it stays in the table: the gateway keeps a
// finished spliced flow for splice.linger (5 s) to take its last
// packets. It no longer counts as its service's (ServiceLen): a SOCKS5
// client that opened and closed a thousand connections within those
// seconds was refused the next one for max_sessions (1024), as the bench
// found (2026-12-05: the splicing SOCKS5 service failed after 1,019
// sessions).
func (t *FlowTable) Ended(f *Flow) {
	t.mu.Lock()
	if t.flows[f.ID] == f {
		t.endLocked(f)
	}
	t.mu.Unlock()
}

// endLocked stops counting f as its service's, once.
func (t *FlowTable) endLocked(f *Flow) {
	if f.ended {
		return
	}
	f.ended = true
	if t.perService[f.Service]--; t.perService[f.Service] <= 0 {
		delete(t.perService, f.Service)
	}
}

// Get returns the flow with the given ID, or nil.
func (t *FlowTable) Get(id uint64) *Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.flows[id]
}

// Live reports whether f is in the table and its ends are not done
// with it (see Ended).
func (t *FlowTable) Live(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.flows[f.ID] == f && !f.ended
}

// Len is the number of flows.
func (t *FlowTable) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.flows)
}

// Max is the flow cap.
func (t *FlowTable) Max() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.max
}

// SetMax changes the flow cap; flows above a lowered cap keep running.
func (t *FlowTable) SetMax(max int) {
	t.mu.Lock()
	t.max = max
	t.mu.Unlock()
}

// List returns the flows ordered by ID.
func (t *FlowTable) List() []*Flow {
	t.mu.Lock()
	out := make([]*Flow, 0, len(t.flows))
	for _, f := range t.flows {
		out = append(out, f)
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b *Flow) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// SetServerLeg sets the upstream connection's local address and its
// backend.
func (f *Flow) SetServerLeg(upstream, backend netip.AddrPort) {
	f.legMu.Lock()
	f.Upstream, f.Backend = upstream, backend
	f.legMu.Unlock()
}

// ServerLeg returns the upstream connection's local address and its
// backend: the server leg's ends.
func (f *Flow) ServerLeg() (upstream, backend netip.AddrPort) {
	f.legMu.Lock()
	defer f.legMu.Unlock()
	return f.Upstream, f.Backend
}
