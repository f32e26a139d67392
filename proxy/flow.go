package proxy

import (
	"cmp"
	"errors"
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
	// with SetServerLeg while others read them with ServerLeg. So too
	// Server and Local, which a direct forwarder and SOCKS5 set once
	// the connect succeeded (SetDestination) while the control API may
	// list the flow (Destination). It guards spliceReq's creation too.
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

// FlowTable holds the flows of all proxies, enforces the flow caps and
// hands out IDs.
type FlowTable struct {
	max    int
	nextID atomic.Uint64
	mu     sync.Mutex
	flows  map[uint64]*Flow
	// perService counts the flows of each service, spliced ones
	// included (a SOCKS5 service's max_sessions counts them), but not
	// those that ended and wait to leave the table (Ended).
	perService map[string]int
	// perClient counts the flows of each client (clientKey) as
	// perService does, while maxPerClient caps them; with no cap (0)
	// it is nil: an entry per client costs more than 40 bytes, which
	// a table of many one-flow clients would pay for nothing
	// (TestPromotedFlowMemory).
	perClient    map[clientID]int
	maxPerClient int
	clientBits6  int // see clientKey
	// reserved counts the places each client (clientKey) holds for
	// flows to come: SOCKS5 handshakes under way (Reserve). They count
	// against maxPerClient with its flows, in every service's
	// admission: counted by each SOCKS5 service on its own, they were
	// seen by no other service, and a client held its cap of
	// handshakes on each SOCKS5 service and its cap of flows besides.
	// Kept with no cap too (an entry only while a handshake runs), so
	// that a cap set by a reload sees them.
	reserved map[clientID]int
	// refused counts the flows refused at each cap: limits.max_flows,
	// limits.max_flows_per_client.
	refused [2]atomic.Uint64
}

// NewFlowTable returns a table admitting at most max flows at once.
func NewFlowTable(max int) *FlowTable {
	return &FlowTable{max: max, flows: map[uint64]*Flow{}, perService: map[string]int{}, reserved: map[clientID]int{}}
}

// Refusals of FlowTable.Admit.
var (
	// ErrFlowCap: the table holds limits.max_flows flows.
	ErrFlowCap = errors.New("flow cap reached (limits.max_flows)")
	// ErrClientCap: the flow's client holds limits.max_flows_per_client
	// flows.
	ErrClientCap = errors.New("the client's flow cap reached (limits.max_flows_per_client)")
)

// clientID is a client for the per-client cap: its prefix (see
// clientKey) and, for a link-local address, the link (its zone).
type clientID struct {
	prefix netip.Prefix
	zone   string
}

// clientKey is what the per-client cap counts a client address as: an
// IPv4 address alone, an IPv6 address by its first bits6 bits
// (limits.client_ipv6_prefix; 0 is 128, the address alone). A /64 is
// what one host may use whole (it picks its own addresses in its
// subnet: RFC 4941, RFC 8981), and what a LAN's hosts share. A
// link-local address counts on its own link: every link's are in
// fe80::/64, and without the zone the link-local clients of all links
// shared one cap (with client_ipv6_prefix 64), which one client on a
// guest link could fill for all.
func clientKey(a netip.Addr, bits6 int) clientID {
	a = a.Unmap()
	bits := 32
	if a.Is6() {
		bits = cmp.Or(bits6, 128)
	}
	p, _ := a.WithZone("").Prefix(bits)
	if a.IsLinkLocalUnicast() {
		return clientID{p, a.Zone()}
	}
	return clientID{prefix: p}
}

// key is clientKey with the table's IPv6 prefix length (t.mu held).
func (t *FlowTable) key(a netip.Addr) clientID { return clientKey(a, t.clientBits6) }

// SetClientIPv6Prefix sets how many leading bits of an IPv6 client's
// address the per-client cap counts as one client (see clientKey),
// before any flow is admitted: the counts are kept by it.
func (t *FlowTable) SetClientIPv6Prefix(bits int) {
	t.mu.Lock()
	t.clientBits6 = bits
	t.mu.Unlock()
}

// CapFix says how an operator lifts the cap err names.
func CapFix(err error) string {
	if errors.Is(err, ErrClientCap) {
		return "a client holds limits.max_flows_per_client flows; raise it if the client is legitimate (many users behind one address)"
	}
	return "raise limits.max_flows or add gateways"
}

// ServiceLen is the number of flows of a service, spliced ones included,
// ended ones not (see Ended).
func (t *FlowTable) ServiceLen(service string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.perService[service]
}

// ClientLen is the number of flows of client a (counted by clientKey),
// ended ones not (see Ended), while there is a cap per client; places
// it reserved (Reserve) not.
func (t *FlowTable) ClientLen(a netip.Addr) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.perClient[t.key(a)] // 0 with no cap
}

// Admit gives f an ID and adds it, unless the table is full (ErrFlowCap)
// or f's client holds its cap of flows, places it reserved included
// (ErrClientCap).
func (t *FlowTable) Admit(f *Flow) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.admitLocked(f)
}

// AdmitReserved is Admit for a flow whose client reserved its place
// (Reserve): the reservation becomes the flow, at once, so that the
// client never counts it twice. The reservation is released even when
// the flow is refused.
func (t *FlowTable) AdmitReserved(f *Flow) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.releaseLocked(f.Client.Addr())
	return t.admitLocked(f)
}

func (t *FlowTable) admitLocked(f *Flow) error {
	if len(t.flows) >= t.max {
		t.CountRefusal(ErrFlowCap)
		return ErrFlowCap
	}
	if t.perClient != nil {
		key := t.key(f.Client.Addr())
		if t.perClient[key]+t.reserved[key] >= t.maxPerClient {
			t.CountRefusal(ErrClientCap)
			return ErrClientCap
		}
		t.perClient[key]++
	}
	f.ID = t.nextID.Add(1)
	t.flows[f.ID] = f
	t.perService[f.Service]++
	return nil
}

// Reserve holds a place for a flow to come of client a (a SOCKS5
// handshake under way), unless its flows and places reserved hold
// limits.max_flows_per_client (ErrClientCap, counted as Admit counts
// its refusals). A reservation ends with Release, or with AdmitReserved.
func (t *FlowTable) Reserve(a netip.Addr) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	key := t.key(a)
	if t.perClient != nil && t.perClient[key]+t.reserved[key] >= t.maxPerClient {
		t.CountRefusal(ErrClientCap)
		return ErrClientCap
	}
	t.reserved[key]++
	return nil
}

// Release gives back a place Reserve held for client a.
func (t *FlowTable) Release(a netip.Addr) {
	t.mu.Lock()
	t.releaseLocked(a)
	t.mu.Unlock()
}

func (t *FlowTable) releaseLocked(a netip.Addr) {
	key := t.key(a)
	if t.reserved[key]--; t.reserved[key] <= 0 {
		delete(t.reserved, key)
	}
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
	if t.perClient != nil {
		t.perClient[t.key(f.Client.Addr())]++
	}
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
	if t.perClient != nil {
		key := t.key(f.Client.Addr())
		if t.perClient[key]--; t.perClient[key] <= 0 {
			delete(t.perClient, key)
		}
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

// SetMaxPerClient changes the cap of flows per client (0: none); a
// client's flows above a lowered cap keep running. A cap set where
// there was none counts the flows the table holds.
func (t *FlowTable) SetMaxPerClient(max int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.maxPerClient = max
	switch {
	case max <= 0:
		t.perClient = nil
	case t.perClient == nil:
		t.perClient = map[clientID]int{}
		for _, f := range t.flows {
			if !f.ended {
				t.perClient[t.key(f.Client.Addr())]++
			}
		}
	}
}

// CountRefusal counts a flow refused at the cap err names (ErrFlowCap,
// ErrClientCap): Admit and Reserve count their own, a proxy those it
// refuses otherwise.
func (t *FlowTable) CountRefusal(err error) {
	if errors.Is(err, ErrClientCap) {
		t.refused[1].Add(1)
	} else {
		t.refused[0].Add(1)
	}
}

// Refused is how many flows were refused at limits.max_flows (table)
// and at limits.max_flows_per_client (client).
func (t *FlowTable) Refused() (table, client uint64) {
	return t.refused[0].Load(), t.refused[1].Load()
}

// MaxPerClient is the cap of flows per client (0: none).
func (t *FlowTable) MaxPerClient() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.maxPerClient
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

// SetDestination sets where the flow goes once it is in the table:
// server, and local, the address the client connected to when it is
// not server (a direct service's listen address; zero otherwise).
func (f *Flow) SetDestination(local, server netip.AddrPort) {
	f.legMu.Lock()
	f.Local, f.Server = local, server
	f.legMu.Unlock()
}

// Destination returns Local and Server, for a reader that may run while
// the flow's proxy sets them (SetDestination).
func (f *Flow) Destination() (local, server netip.AddrPort) {
	f.legMu.Lock()
	defer f.legMu.Unlock()
	return f.Local, f.Server
}

// ServerLeg returns the upstream connection's local address and its
// backend: the server leg's ends.
func (f *Flow) ServerLeg() (upstream, backend netip.AddrPort) {
	f.legMu.Lock()
	defer f.legMu.Unlock()
	return f.Upstream, f.Backend
}
