package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"spliced/internal/monotime"
)

// Outcome is why Relay.Run returned.
type Outcome int

const (
	// Finished: both directions ended with a FIN, relayed as a FIN.
	Finished Outcome = iota
	// Paused: Pause was called or the pause threshold was reached; both
	// directions stopped between two reads, nothing is buffered in user
	// space, and Run may be called again to resume.
	Paused
	// Idle: nothing moved either way for the idle timeout; both
	// connections were closed.
	Idle
	// Failed: a connection failed (reset, write error); both were reset.
	Failed
)

func (o Outcome) String() string {
	return [...]string{"finished", "paused", "idle", "failed"}[o]
}

// quiet is how long a direction waits for data in splice(2), holding a
// pipe, before it waits without one.
const quiet = time.Second

// chunk bounds one splice(2) call sequence, so that counters and the pause
// threshold are looked at regularly even on a fast flow.
const chunk = 1 << 20

const (
	dirC2S = 0
	dirS2C = 1
)

// Relay copies bytes between a client and an upstream connection in both
// directions. Each direction is dst.ReadFrom(src) between *net.TCPConn, so
// the kernel moves the bytes with splice(2) and they never enter user
// memory. A FIN in one direction is passed on as a FIN (half-close) while
// the other direction keeps flowing.
type Relay struct {
	Client, Upstream *net.TCPConn
	Flow             *Flow
	// IdleTimeout ends the relay when no byte moved either way for this
	// long. Zero means no timeout.
	IdleTimeout time.Duration
	// PauseAfter makes Run return Paused once the flow's byte count (both
	// directions) reaches it. Zero means never.
	PauseAfter int64

	pausing    atomic.Bool
	aborting   atomic.Bool
	eof        [2]bool      // direction ended by a FIN, already passed on
	lastActive atomic.Int64 // monotime of the last bytes relayed
	inFlight   atomic.Int32 // directions inside a splice(2) call (ReadFrom)
	idledOut   atomic.Bool  // watchIdle ended the relay

	idleMu  sync.Mutex
	sampled bool   // moved holds a sample (idleMu)
	moved   uint64 // kernelMoved when idle last looked (idleMu)
}

type dirResult struct {
	dir     int
	kind    Outcome // Finished means this direction saw EOF
	err     error
	aborted bool // stopped because the other direction ended the relay
}

// HalfClosed reports whether a direction has already ended.
func (r *Relay) HalfClosed() bool { return r.eof[dirC2S] || r.eof[dirS2C] }

// Run relays until both directions end, the flow idles out, a connection
// fails, or the relay is paused. On every outcome but Paused both
// connections are closed when Run returns.
func (r *Relay) Run() (Outcome, error) {
	// A Pause or Close that came before Run started holds: Run returns
	// Paused (and consumes the pause) or Failed at once. Clearing them
	// here lost one that beat the goroutine running Run, which then
	// waited to read for ever behind a cleared deadline.
	r.lastActive.Store(monotime.Now())
	// Urgent data stays in the stream it is part of: without
	// SO_OOBINLINE Linux takes an urgent byte out of it (checked as the
	// bytes are read: one that came before still counts).
	KeepUrgentInline(r.Client)
	KeepUrgentInline(r.Upstream)
	results := make(chan dirResult, 2)
	running := 0
	for d := range 2 {
		if !r.eof[d] {
			running++
			go func() { results <- r.copyDir(d) }()
		}
	}
	stopWatch := func() {}
	if r.IdleTimeout > 0 && running > 0 {
		stopWatch = r.watchIdle()
	}
	outcome, failErr := Finished, error(nil)
	for ; running > 0; running-- {
		res := <-results
		if res.aborted {
			continue
		}
		switch res.kind {
		case Finished:
			r.eof[res.dir] = true
		case Paused:
			if outcome == Finished {
				outcome = Paused
			}
		case Idle, Failed:
			if outcome != Failed {
				outcome, failErr = res.kind, res.err
			}
			r.abort()
		}
	}
	stopWatch()
	if r.idledOut.Swap(false) && outcome != Failed {
		outcome, failErr = Idle, nil
	}
	if outcome == Finished && !(r.eof[dirC2S] && r.eof[dirS2C]) {
		// Both directions were stopped from outside (Close).
		outcome, failErr = Failed, errClosed
	}
	switch outcome {
	case Paused:
		// Clear the past deadline Pause set so the caller can use the
		// connections (or hand them over) at once.
		r.pausing.Store(false)
		r.Client.SetReadDeadline(time.Time{})
		r.Upstream.SetReadDeadline(time.Time{})
		return Paused, nil
	case Failed:
		reset(r.Client)
		reset(r.Upstream)
	default:
		r.Client.Close()
		r.Upstream.Close()
	}
	return outcome, failErr
}

// Pause makes Run return Paused as soon as both directions are between two
// reads. It may be called from any goroutine.
func (r *Relay) Pause() {
	r.pausing.Store(true)
	past := time.Unix(1, 0)
	r.Client.SetReadDeadline(past)
	r.Upstream.SetReadDeadline(past)
}

var errClosed = errors.New("relay closed by the gateway")

// Close ends the relay from outside: Run resets both connections and
// returns Failed.
func (r *Relay) Close() { r.abort() }

func (r *Relay) abort() {
	r.aborting.Store(true)
	past := time.Unix(1, 0)
	r.Client.SetDeadline(past)
	r.Upstream.SetDeadline(past)
}

func (r *Relay) copyDir(d int) dirResult {
	src, dst, counter := r.Client, r.Upstream, &r.Flow.C2S
	if d == dirS2C {
		src, dst, counter = r.Upstream, r.Client, &r.Flow.S2C
	}
	// A busy direction splices with a blocking splice(2), which holds a
	// pipe (two descriptors) while it waits for data. After a quiet spell
	// it waits without one instead, so idle flows cost their two sockets
	// only.
	busy := false // a new flow waits for its first bytes without a pipe
	for {
		if r.aborting.Load() {
			return dirResult{dir: d, aborted: true}
		}
		if r.pausing.Load() {
			return dirResult{dir: d, kind: Paused}
		}
		limit := int64(chunk)
		if r.PauseAfter > 0 {
			left := r.PauseAfter - (r.Flow.C2S.Load() + r.Flow.S2C.Load())
			if left <= 0 {
				r.Pause()
				return dirResult{dir: d, kind: Paused}
			}
			limit = min(limit, left)
		}
		var idleAt time.Time
		if r.IdleTimeout > 0 {
			// From time.Now(), so that the deadline keeps Go's
			// monotonic reading and no step of the wall clock moves it.
			idleAt = time.Now().Add(r.IdleTimeout - monotime.Since(r.lastActive.Load()))
		}
		deadline := idleAt
		if q := time.Now().Add(quiet); busy && (deadline.IsZero() || q.Before(deadline)) {
			deadline = q
		}
		src.SetReadDeadline(deadline)
		if r.pausing.Load() { // Pause may have run between the check and the deadline
			return dirResult{dir: d, kind: Paused}
		}
		var n int64
		var err error
		eof := false
		if busy {
			lr := &io.LimitedReader{R: src, N: limit}
			r.inFlight.Add(1)
			n, err = dst.ReadFrom(lr)
			if n > 0 {
				// Before the call counts as over: idle, which looks
				// at inFlight first, then sees this.
				r.lastActive.Store(monotime.Now())
			}
			r.inFlight.Add(-1)
			eof = err == nil && lr.N > 0
			if eof {
				// splice(2) stops at TCP urgent data and returns 0 there,
				// which Go takes for the end of the stream: the rest of
				// it (telnet's interrupt, an FTP client's abort and all
				// after them) was lost, the direction closed.
				m, uerr := pastUrgentMark(src, dst)
				n += m
				switch {
				case uerr != nil:
					eof, err = false, uerr
				case m > 0:
					eof = false
				}
			}
			if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) && !r.pausing.Load() && !r.aborting.Load() &&
				(idleAt.IsZero() || time.Now().Before(idleAt)) {
				busy = false // quiet: wait without a pipe
				continue
			}
		} else {
			var avail int
			switch avail, err = waitReadable(src); {
			case err != nil:
			case avail == 0:
				eof = true
			default:
				busy = true
				continue
			}
		}
		if n > 0 {
			counter.Add(n)
			r.lastActive.Store(monotime.Now())
		}
		switch {
		case eof:
			if err := dst.CloseWrite(); err != nil {
				return dirResult{dir: d, kind: Failed, err: err}
			}
			return dirResult{dir: d, kind: Finished}
		case err == nil:
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			if r.aborting.Load() {
				return dirResult{dir: d, aborted: true}
			}
			if r.pausing.Load() {
				return dirResult{dir: d, kind: Paused}
			}
			if n == 0 && r.IdleTimeout > 0 && r.idle() {
				return dirResult{dir: d, kind: Idle}
			}
		default:
			if r.aborting.Load() {
				return dirResult{dir: d, aborted: true}
			}
			return dirResult{dir: d, kind: Failed, err: err}
		}
	}
}

// watchIdle ends the relay as idle once idle says so, looking when the
// idle timeout passes. A direction waiting for data has its own idle
// deadline, but one blocked writing to a receiver that does not read (a
// full window) has none: when the other direction had ended (a client
// that half-closed after its request) or was blocked likewise, nothing
// looked, and the flow stayed for good. It returns a function that stops
// the watch; once that returned, the watch aborts nothing.
func (r *Relay) watchIdle() (stop func()) {
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	mu.Lock()
	defer mu.Unlock()
	t = time.AfterFunc(r.IdleTimeout, func() {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		if r.idle() {
			r.idledOut.Store(true)
			r.abort()
			return
		}
		next := r.IdleTimeout - monotime.Since(r.lastActive.Load())
		t.Reset(max(next, time.Millisecond))
	})
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}

// idle reports whether nothing moved either way for IdleTimeout. The
// bytes of a splice(2) call count in lastActive only when it returns,
// after up to a chunk, and a receiver that reads slowly keeps one going
// for minutes: while a direction is inside one, lastActive alone called
// a flow that moved bytes all along idle, and the other direction
// closed it in the middle of a download. Then the kernel's counts of
// the sockets decide: the flow is idle when they did not change over a
// whole IdleTimeout (so one blocked for good, on a receiver that never
// reads, is idle after twice IdleTimeout at most).
func (r *Relay) idle() bool {
	r.idleMu.Lock()
	defer r.idleMu.Unlock()
	inFlight := r.inFlight.Load() > 0 // before lastActive: see copyDir
	if monotime.Since(r.lastActive.Load()) < r.IdleTimeout {
		return false
	}
	if !inFlight {
		return true // every byte relayed is counted in lastActive
	}
	moved, ok := r.kernelMoved()
	if !ok {
		return true // a socket is gone: nothing moves any more
	}
	if !r.sampled || moved != r.moved {
		// Moved since the last look, or no look yet: look again a
		// whole timeout from now.
		r.sampled, r.moved = true, moved
		r.lastActive.Store(monotime.Now())
		return false
	}
	return true
}

// kernelMoved sums what the kernel counts of the bytes that moved on
// the relay's sockets: received from either peer, and acknowledged by
// either peer. ok is false if a socket could not tell.
func (r *Relay) kernelMoved() (sum uint64, ok bool) {
	for _, c := range []*net.TCPConn{r.Client, r.Upstream} {
		rc, err := c.SyscallConn()
		if err != nil {
			return 0, false
		}
		var info *unix.TCPInfo
		var serr error
		if err := rc.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || serr != nil {
			return 0, false
		}
		sum += info.Bytes_received + info.Bytes_acked
	}
	return sum, true
}

// waitReadable blocks (in the netpoller, obeying the read deadline) until c
// has data or its peer closed, and returns the bytes queued: 0 means EOF.
// pastUrgentMark moves the bytes from src's urgent mark on, as far as a
// read goes, to dst, when src is at the mark (SIOCATMARK): splice(2)
// moves nothing there, where a read does (with SO_OOBINLINE, the urgent
// byte too). It moves nothing at the end of the stream.
func pastUrgentMark(src, dst *net.TCPConn) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	atMark := 0
	var ierr error
	if err := rc.Control(func(fd uintptr) { atMark, ierr = unix.IoctlGetInt(int(fd), unix.SIOCATMARK) }); err != nil {
		return 0, err
	}
	if ierr != nil || atMark == 0 {
		return 0, ierr
	}
	var buf [2048]byte
	n, err := src.Read(buf[:])
	if n > 0 {
		if _, werr := dst.Write(buf[:n]); werr != nil {
			return 0, werr
		}
	}
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return int64(n), err
}

// KeepUrgentInline sets SO_OOBINLINE on c: TCP urgent data stays in the
// stream, where a relay moves it with the rest. Without it Linux takes
// an urgent byte out of the stream (it is read apart, with MSG_OOB, or
// not at all). A relay does not keep the urgency itself: the byte goes
// on as ordinary data.
func KeepUrgentInline(c *net.TCPConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_OOBINLINE, 1)
	}); err != nil {
		return err
	}
	return serr
}

func waitReadable(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var serr error
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		m, _, e := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case e == unix.EAGAIN:
			return false
		case e != nil:
			serr = e
		case m > 0:
			n, serr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	return n, serr
}
