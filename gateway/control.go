package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"spliced/api"
	"spliced/internal/monotime"
	"spliced/internal/version"
	"spliced/proxy"
	"spliced/rules"
	"spliced/splice"
)

// Version is spliced's version (package internal/version).
func Version() string { return version.Get().String() }

// controlIdleTimeout closes a control connection idle between requests.
var controlIdleTimeout = time.Minute

// serveControl opens the control socket and serves the API until ctx is
// done.
func (g *Gateway) serveControl(ctx context.Context, path, group string) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := checkSocketDir(dir); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another spliced answers there; stop it or set control.socket", path)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("control socket %s: there is a %s there, not a socket; spliced replaces only a stale socket: move it away or set control.socket", path, fileKind(fi.Mode()))
		}
		os.Remove(path) // stale, from a daemon that died
	}
	ln, err := listenPrivately(path, group)
	if err != nil {
		return nil, err
	}
	// A client of the socket may leave connections open: each costs the
	// daemon a descriptor, which the proxies' sockets share. One that
	// sends no request closes after ReadHeaderTimeout, an idle one after
	// controlIdleTimeout. (A cap on connections was tried: a client that
	// leaked its idle connections, as a new http.Client per request does,
	// then stalled every client for the idle timeout.)
	//
	// Requests run in base, which the stop cancels first: an event stream
	// (splicectl watch) lasts until its client goes, and the shutdown,
	// waiting for it, held every stop of the daemon for its 2 s, and with
	// them the restart that keeps flows, whose packets wait meanwhile.
	base, cancelBase := context.WithCancel(context.Background())
	srv := &http.Server{Handler: g.apiHandler(), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: controlIdleTimeout,
		BaseContext: func(net.Listener) context.Context { return base }}
	go srv.Serve(ln)
	return func() {
		cancelBase()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		os.Remove(path)
	}, nil
}

// listenPrivately opens a unix socket listener at path, owned by root
// and the group (mode 0660), or root alone (0600). The socket gets its
// mode before the bind (fchmod of the socket, which bind gives the file
// less the umask): bound first and chmod'ed after, it was at path with
// the mode the umask left (0777 with umask 0) until the chmod, and a
// connection made in that moment is served later, whatever the mode
// became. The group's bits come with the chown: until then the file is
// root's group's.
func listenPrivately(path, group string) (*net.UnixListener, error) {
	gid := -1
	mode := os.FileMode(0o600)
	if group != "" {
		gr, err := user.LookupGroup(group)
		if err != nil {
			return nil, fmt.Errorf("control.group %q: %w; create the group (groupadd %s) or remove control.group", group, err, group)
		}
		gid, _ = strconv.Atoi(gr.Gid)
		mode = 0o660
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) { err = syscall.Fchmod(int(fd), 0o600) }); cerr != nil {
			return cerr
		}
		return err
	}}
	l, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	ln := l.(*net.UnixListener)
	afterControlBind(path)
	if gid >= 0 {
		err = os.Chown(path, 0, gid)
	}
	if err == nil {
		err = os.Chmod(path, mode) // the umask may have taken bits
	}
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return ln, nil
}

// afterControlBind is a test's look at the moment between the bind and
// the chown and chmod.
var afterControlBind = func(path string) {}

// checkSocketDir refuses a directory where someone else could replace
// the socket between its creation and its chown and chmod (which follow
// a symbolic link put in its place): one that belongs to another user, or
// that others may write to without the sticky bit. The same holds for
// every directory above it, and for every symbolic link on the way and
// where it leads: whoever may rename or replace any of them may put a
// directory of their own, and a link in it, at the socket's path.
func checkSocketDir(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := checkSocketPath(dir); err != nil {
		return err
	}
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return err
	}
	return checkSocketPath(resolved)
}

// checkSocketPath checks dir and each directory above it, without
// following symbolic links (a link's own owner may replace it).
func checkSocketPath(dir string) error {
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		what := "directory"
		if fi.Mode()&os.ModeSymlink != 0 {
			what = "symbolic link"
		}
		if what == "directory" && p == dir {
			what = "its directory"
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if uid := os.Geteuid(); st.Uid != uint32(uid) && st.Uid != 0 {
				return fmt.Errorf("%s %s belongs to user %d; put the socket in a directory of root's, such as /run/spliced (control.socket)", what, p, st.Uid)
			}
		}
		if fi.IsDir() && fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
			return fmt.Errorf("%s %s is writable by others (mode %v); put the socket in a directory only root writes, such as /run/spliced (control.socket), or chmod go-w %s", what, p, fi.Mode().Perm(), p)
		}
		if p == "/" || p == "." {
			return nil
		}
	}
}

func fileKind(m os.FileMode) string {
	switch {
	case m.IsRegular():
		return "regular file"
	case m.IsDir():
		return "directory"
	case m&os.ModeSymlink != 0:
		return "symbolic link"
	}
	return "file of mode " + m.String()
}

func (g *Gateway) apiHandler() http.Handler {
	mux := http.NewServeMux()
	v := "/" + api.Version
	mux.HandleFunc("GET "+v+"/status", func(w http.ResponseWriter, r *http.Request) { reply(w, g.Status()) })
	mux.HandleFunc("GET "+v+"/flows", g.handleFlows)
	mux.HandleFunc("GET "+v+"/flows/{id}", func(w http.ResponseWriter, r *http.Request) {
		f, ok := g.flowByID(w, r)
		if ok {
			reply(w, g.apiFlow(f))
		}
	})
	mux.HandleFunc("POST "+v+"/flows/{id}/splice", g.handleSplice)
	mux.HandleFunc("POST "+v+"/flows/{id}/unsplice", g.handleUnsplice)
	mux.HandleFunc("GET "+v+"/ruleset", func(w http.ResponseWriter, r *http.Request) {
		rs, err := g.Ruleset(r.Context())
		if err != nil {
			fail(w, http.StatusInternalServerError, err.Error())
			return
		}
		reply(w, rs)
	})
	mux.HandleFunc("GET "+v+"/events", g.handleEvents)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fail(w, http.StatusNotFound, fmt.Sprintf("no such API call: %s %s (this daemon speaks %s)", r.Method, r.URL.Path, api.Version))
	})
	return noRequestBody(mux)
}

// noRequestBody refuses a request that carries a body: no API call takes
// one. The HTTP server reads what a handler left of a body before it
// answers (and after, to reuse the connection), with no deadline on the
// control socket: a client that declared a body and sent none held its
// connection, and the daemon's descriptor, for ever, unanswered. The read
// deadline in the past makes the server give up on the body at once and
// close the connection after the answer (what follows on it could be
// the rest of the body).
func noRequestBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength == 0 { // -1: chunked, or a length unknown
			h.ServeHTTP(w, r)
			return
		}
		http.NewResponseController(w).SetReadDeadline(time.Now())
		w.Header().Set("Connection", "close")
		fail(w, http.StatusBadRequest, fmt.Sprintf("%s %s: the API takes no request body; send the request without one", r.Method, r.URL.Path))
	})
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(api.Error{Error: msg})
}

// Status is the daemon at a glance.
func (g *Gateway) Status() api.Status {
	cfg := g.config()
	st := api.Status{
		Version: Version(), Started: g.started, UptimeSec: time.Since(g.started).Seconds(),
		ConfigFile: cfg.File, Table: "inet " + cfg.Kernel.Table,
		Flows:   map[string]int{api.StateProxied: 0, api.StateSplicing: 0, api.StateSpliced: 0, api.StateClosing: 0},
		Reloads: int(g.reloads.Load()), Repairs: int(g.repairs.Load()),
		Warnings: g.statusWarnings(),
	}
	for _, s := range cfg.Services {
		st.Services = append(st.Services, s.Name)
	}
	for _, f := range g.flows.List() {
		st.Flows[f.State().String()]++
	}
	splicing := g.splicing()
	proxied, spliced, packets := g.engineTotals(splicing)
	st.Engines = append(st.Engines, api.Engine{Name: "proxy", BytesC2S: proxied[0], BytesS2C: proxied[1]})
	if splicing {
		e := api.Engine{Name: "splice", Splices: g.spliceLatency.count.Load(), SpliceAborts: g.spliceAborts.Load(),
			SpliceP50Us: g.spliceLatency.percentile(0.5).Microseconds(), SpliceP99Us: g.spliceLatency.percentile(0.99).Microseconds(),
			Verdicts: map[string]uint64{}, QueueBackend: cfg.Kernel.NFQueue, InjectFailures: g.injectErrors.Load(), InjectedGSO: g.injectedGSO.Load(),
			StalledFlows: g.stalledFlows.Load(), HeldDropped: g.counters.heldDropped.Load(), Datapath: g.datapathName(), Phases: g.phaseTable(),
			DivertByCommand: g.divertCommands.Load(), DivertByNetlink: g.divertNetlink.Load()}
		for r, name := range pmtuResultNames {
			if n := g.counters.pmtu[r].Load(); n > 0 {
				if e.PMTUErrors == nil {
					e.PMTUErrors = map[string]uint64{}
				}
				e.PMTUErrors[name] = n
			}
		}
		if k := g.kpath; k != nil {
			e.BPFInterfaces = k.at.Interfaces()
			e.BPFVerdicts = g.bpfCounters()
			e.BPFPromotions, e.BPFPromoteFails = k.promotions.Load(), k.promoteFailures.Load()
			e.BPFPromoteSkipped = k.promoteSkipped.Load()
			e.BPFDemotions, e.BPFStragglers = k.demotions.Load(), k.stragglers.Load()
		}
		e.BytesC2S, e.BytesS2C = spliced[0], spliced[1]
		e.PacketsC2S, e.PacketsS2C = packets[0], packets[1]
		for v := range splice.NumVerdicts {
			if n := g.counters.verdicts[v].Load(); n > 0 {
				e.Verdicts[splice.Verdict(v).String()] = n
			}
		}
		for _, q := range g.queues.Stats() {
			e.Queues = append(e.Queues, api.Queue{Number: q.Queue, Received: q.Received, Accepted: q.Accepted,
				Modified: q.Modified, Dropped: q.Dropped, Held: q.Held, Errors: q.Errors, Overruns: q.Overruns, Reopens: q.Reopens,
				Truncated: q.Truncated, KernelWaiting: q.Kernel.Waiting, KernelQueueDropped: q.Kernel.QueueDropped, KernelUserDropped: q.Kernel.UserDropped})
		}
		st.Engines = append(st.Engines, e)
	}
	return st
}

// apiFlow describes a flow for the API.
func (g *Gateway) apiFlow(f *proxy.Flow) api.Flow {
	g.splicedMu.Lock()
	sf := g.spliced[f.ID]
	g.splicedMu.Unlock()
	return describeFlow(f, sf)
}

// describeFlow describes a flow for the API; sf is its spliced state, if
// it is spliced.
func describeFlow(f *proxy.Flow, sf *splicedFlow) api.Flow {
	local, server := f.Destination()
	if !local.IsValid() { // a transparent flow: the client connected to the server's address
		local = server
	}
	upstream, backend := f.ServerLeg()
	af := api.Flow{
		ID: f.ID, Service: f.Service, Proxy: f.Proxy, State: f.State().String(), User: f.User,
		ClientLeg: api.Leg{Local: local.String(), Remote: f.Client.String()},
		ServerLeg: api.Leg{Local: upstream.String(), Remote: backend.String()},
		BytesC2S:  uint64(f.C2S.Load()), BytesS2C: uint64(f.S2C.Load()),
		Started: f.Started, AgeSec: time.Since(f.Started).Seconds(),
	}
	if at := f.SplicedAt.Load(); at != 0 {
		t := monotime.Wall(at)
		af.SplicedAt = &t
	}
	if sf != nil {
		s := sf.entry.Stats()
		af.BytesC2S += s[splice.C2S].Bytes
		af.BytesS2C += s[splice.S2C].Bytes
		af.PacketsC2S, af.PacketsS2C = s[splice.C2S].Packets, s[splice.S2C].Packets
		af.Engine = engineState(sf, monotime.Now())
		af.Datapath = datapathOf(sf.entry)
		af.Adopted = sf.adopted
	}
	return af
}

func (g *Gateway) handleFlows(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var port uint16
	if p := q.Get("port"); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil {
			fail(w, http.StatusBadRequest, fmt.Sprintf("port %q: not a port number", p))
			return
		}
		port = uint16(n)
	}
	var addr netip.Addr
	if a := q.Get("addr"); a != "" {
		var err error
		if addr, err = netip.ParseAddr(a); err != nil {
			fail(w, http.StatusBadRequest, fmt.Sprintf("addr %q: not an IP address", a))
			return
		}
	}
	state := q.Get("state")
	if state != "" && !slices.Contains(api.FlowStates, state) {
		fail(w, http.StatusBadRequest, fmt.Sprintf("state %q: use proxied, splicing, spliced or closing", state))
		return
	}
	out := []api.Flow{}
	for _, f := range g.flows.List() {
		if p := q.Get("proxy"); p != "" && p != f.Proxy && p != f.Service {
			continue
		}
		if state != "" && f.State().String() != state {
			continue
		}
		upstream, backend := f.ServerLeg()
		_, server := f.Destination()
		ends := []netip.AddrPort{f.Client, server, upstream, backend}
		if addr.IsValid() && !slices.ContainsFunc(ends, func(e netip.AddrPort) bool { return e.Addr() == addr }) {
			continue
		}
		if port != 0 && !slices.ContainsFunc(ends, func(e netip.AddrPort) bool { return e.Port() == port }) {
			continue
		}
		out = append(out, g.apiFlow(f))
	}
	reply(w, out)
}

func (g *Gateway) flowByID(w http.ResponseWriter, r *http.Request) (*proxy.Flow, bool) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Sprintf("flow ID %q: not a number", r.PathValue("id")))
		return nil, false
	}
	f := g.flows.Get(id)
	if f == nil {
		fail(w, http.StatusNotFound, fmt.Sprintf("no flow %d (it may have ended; splicectl flows lists the current ones)", id))
		return nil, false
	}
	return f, true
}

// handleSplice asks the flow's proxy to splice it and waits for the
// outcome.
func (g *Gateway) handleSplice(w http.ResponseWriter, r *http.Request) {
	f, ok := g.flowByID(w, r)
	if !ok {
		return
	}
	switch f.State() {
	case proxy.StateSpliced:
		reply(w, g.apiFlow(f))
		return
	case proxy.StateClosing:
		fail(w, http.StatusConflict, fmt.Sprintf("flow %d is closing", f.ID))
		return
	}
	if !g.splicing() {
		fail(w, http.StatusConflict, "splicing is not enabled: give at least one service a splice.mode other than never")
		return
	}
	f.RequestSplice()
	wait := g.drainTimeout(f.Service) + 2*time.Second
	err := pollUntil(r.Context(), wait, func() (bool, error) {
		if f.State() == proxy.StateSpliced {
			return true, nil
		}
		if e := f.SpliceError(); e != "" {
			return false, errors.New(e)
		}
		if g.flows.Get(f.ID) == nil {
			return false, fmt.Errorf("flow %d ended", f.ID)
		}
		return false, nil
	})
	if err != nil {
		fail(w, http.StatusConflict, fmt.Sprintf("flow %d: %v", f.ID, err))
		return
	}
	reply(w, g.apiFlow(f))
}

func (g *Gateway) handleUnsplice(w http.ResponseWriter, r *http.Request) {
	f, ok := g.flowByID(w, r)
	if !ok {
		return
	}
	if f.State() == proxy.StateProxied {
		reply(w, g.apiFlow(f))
		return
	}
	if err := g.Unsplice(r.Context(), f); err != nil {
		fail(w, http.StatusConflict, err.Error())
		return
	}
	reply(w, g.apiFlow(f))
}

func pollUntil(ctx context.Context, within time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(within)
	for {
		done, err := cond()
		if done || err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no outcome after %v", within)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (g *Gateway) handleEvents(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		fail(w, http.StatusInternalServerError, "streaming unsupported")
		return
	}
	ch, cancel := g.events.subscribe()
	defer cancel()
	// A watcher that stops reading (its output piped into a pager left
	// open, or suspended) blocks a write once the socket's buffer is
	// full, where the select below never sees the request's end: the
	// control socket's stop then waited for the handler, 2 s, and left
	// it blocked. The end of the request (the stop, or the client gone)
	// cuts such a write short; a handler that was waiting for events
	// takes the cut back, so that the stream still ends with its last
	// chunk.
	rc := http.NewResponseController(w)
	var cutMu sync.Mutex
	ended := false
	stopCut := context.AfterFunc(r.Context(), func() {
		cutMu.Lock()
		defer cutMu.Unlock()
		if !ended {
			rc.SetWriteDeadline(time.Now())
		}
	})
	defer stopCut()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	enc.Encode(api.Event{Time: time.Now(), Kind: api.EventSubscribed})
	flusher.Flush()
	for {
		select {
		case <-r.Context().Done():
			cutMu.Lock()
			ended = true
			rc.SetWriteDeadline(time.Time{})
			cutMu.Unlock()
			return
		case ev := <-ch:
			if err := enc.Encode(ev); err != nil {
				return
			}
			flusher.Flush()
		}
	}
}

// Ruleset returns our table as the kernel has it and its drift.
func (g *Gateway) Ruleset(ctx context.Context) (*api.Ruleset, error) {
	m := g.manager()
	kernel, diff, err := m.Drift(ctx)
	if err != nil {
		return nil, err
	}
	return &api.Ruleset{Table: "inet " + m.Spec().Table, Kernel: kernel, Expected: rules.Listing(m.Spec()),
		Drift: diff != "", Diff: diff}, nil
}

// trimDiff shortens a diff for a log line.
func trimDiff(d string) string {
	lines := strings.Split(d, "\n")
	var changed []string
	for _, l := range lines {
		if strings.HasPrefix(l, "+") || strings.HasPrefix(l, "-") {
			changed = append(changed, l)
		}
	}
	if len(changed) > 20 {
		changed = append(changed[:20], fmt.Sprintf("... %d more changed lines", len(changed)-20))
	}
	return strings.Join(changed, "\n")
}
