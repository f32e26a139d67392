// Package nfq receives packets from NFQUEUE and returns verdicts. It knows
// nothing about splicing: a Handler decides per packet to accept it
// (changed or not), drop it, or hold it and give the verdict later.
//
// Two backends serve a queue. The lean one (default) speaks
// nfnetlink_queue on its own netlink socket: recvmmsg of up to 64 packets
// per system call into reused buffers, parsing in place, and one sendmsg
// for all verdicts of a batch with iovecs pointing at the packets, so
// nothing is copied or allocated per packet. The library one uses
// github.com/florianl/go-nfqueue/v2, which copies every packet and builds
// a netlink message per verdict; it stays for comparison (make bench).
//
// Queues are opened with the GSO flag (packets arrive up to 64 KB, most
// with CHECKSUM_PARTIAL; without it the kernel segments first and
// throughput drops several times), until a GSO packet longer than a
// queue carries arrives (BIG TCP): then the queue clears the flag, as
// such a packet arrives cut and is dropped, and so would its
// retransmissions be (segmentGSO). Never with fail-open, and with a
// receive buffer set by SO_RCVBUFFORCE (net.core.rmem_max would cap
// SO_RCVBUF). Drops are never hidden: the kernel's own per-queue counters
// (user_dropped when the socket buffer was full, queue_dropped when the
// queue was) are read back alongside ours.
//
// A queue whose receive fails (other than ENOBUFS, which is counted)
// reopens and rebinds its socket, counts it (Stats.Reopens) and logs it,
// rather than leaving a queue without bypass stalled; both backends.
//
// Our own code never logs per packet.
package nfq

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Decision is a handler's verdict on a packet.
type Decision uint8

const (
	// Accept lets the packet continue unchanged.
	Accept Decision = iota
	// AcceptModified lets Packet.Data continue in place of the packet
	// (it may be shorter: the kernel trims the packet to it).
	AcceptModified
	// Drop drops the packet.
	Drop
	// Hold gives no verdict now: the handler kept the packet with
	// Packet.Detach and calls Verdict on the copy later. The kernel keeps
	// the packet meanwhile.
	Hold
)

func (d Decision) String() string {
	return [...]string{"accept", "accept_modified", "drop", "hold"}[d]
}

// skb info flags (NFQA_SKB_INFO).
const (
	skbCsumNotReady    = 1 << 0
	skbGSO             = 1 << 1
	skbCsumNotVerified = 1 << 2
)

// Packet is one queued packet.
type Packet struct {
	ID uint32
	// Data is the IP packet; the handler owns it and may change it in
	// place (it is a copy of the kernel's).
	Data []byte
	// CsumNotReady: the TCP checksum field holds only the pseudo-header
	// sum (CHECKSUM_PARTIAL); the packet's checksum is not complete.
	CsumNotReady bool
	// CsumNotVerified: nothing checked the TCP checksum yet (neither the
	// NIC nor the kernel: CHECKSUM_NONE or CHECKSUM_COMPLETE); it may be
	// wrong. Clear for a packet whose checksum was verified
	// (CHECKSUM_UNNECESSARY), or is not complete (CsumNotReady).
	CsumNotVerified bool
	// GSO: the packet is a GSO super-packet, longer than the MTU.
	GSO bool

	q   backend
	gen uint32 // the lean queue's socket it came from
}

// backend is one queue's implementation.
type backend interface {
	barrier()
	verdict(p *Packet, d Decision) error
	detach(p *Packet) *Packet
	close() error
	number() uint16
	readied()
}

// Barrier waits until every verdict that the handler of the set's queue
// with index i decided so far has reached the kernel. A handler's verdicts
// are sent in batches: a packet it let through may arrive after the
// handler returned, and after whatever the caller did since.
func (s *Set) Barrier(i int) {
	if i >= 0 && i < len(s.queues) {
		s.queues[i].barrier()
	}
}

// Detach returns a copy of the packet, data included, that the handler may
// keep after it returns (the Packet it was given and the buffer its data
// lives in are reused for the next packets).
func (p *Packet) Detach() *Packet { return p.q.detach(p) }

// Readied tells the queue's reader that its handler, deciding about p,
// made a goroutine runnable (started one, or woke one on a channel), and
// that goroutine should run soon. Go puts it on the reader's P, which
// the lean reader keeps while it blocks for the next packets in a
// system call, until the runtime takes the P back (20 µs to 10 ms
// later); so after this batch's verdicts the reader yields its P first.
// Handlers call it, from the reader's goroutine.
func (p *Packet) Readied() { p.q.readied() }

// Verdict gives the verdict for a held (detached) packet. Data is sent for
// AcceptModified.
func (p *Packet) Verdict(d Decision) error { return p.q.verdict(p, d) }

// Handler decides about one packet. Each queue has its own handler (see
// Open), called from one goroutine; handlers of different queues run
// concurrently.
type Handler func(p *Packet) Decision

// Config describes the queues to serve.
type Config struct {
	// First is the first queue number, Count how many consecutive queues
	// (the kernel balances flows over them).
	First, Count uint16
	// MaxQueueLen is the kernel's limit of packets waiting for a verdict
	// per queue (default 4096); past it the kernel drops (no fail-open).
	MaxQueueLen uint32
	// RcvBuf is the netlink socket's receive buffer (default 32 MiB).
	RcvBuf int
	// NoGSO disables the GSO flag (for tests of the segmented path).
	NoGSO bool
	// NetNS is a network namespace file descriptor (0: the caller's).
	NetNS int
	// Library selects the go-nfqueue backend instead of the lean one.
	Library bool

	// faultAfter is a test hook: each queue's reader fails one receive
	// after this many packets, as a broken socket would, and recovers as
	// from a real failure. Open sets it from the environment
	// variable FaultEnv, so that lab tests can provoke it in the daemon.
	faultAfter uint64
}

// FaultEnv names the environment variable of a test hook: set to N, each
// queue's reader fails one receive after N packets and must reopen its
// socket (see leanQueue). Never set it outside tests.
const FaultEnv = "SPLICED_TEST_NFQ_FAULT_AFTER"

// Set is a running group of queues.
type Set struct {
	queues   []backend
	counters []*counters
	log      *slog.Logger
	cancel   context.CancelFunc
	cpus     []int // the CPUs the queues' readers are bound to, in turn
}

// libQueue is a queue served by go-nfqueue. Like the lean reader, it
// reopens its socket when a receive fails (see reopen).
type libQueue struct {
	num     uint16
	ctx     context.Context
	cfg     Config
	handler Handler
	log     *slog.Logger
	cnt     *counters

	mu      sync.RWMutex     // guards nf, gen and stopped
	nf      *nfqueue.Nfqueue // nil while it is being replaced
	gen     uint32           // counts sockets; packets carry the gen they came from
	stopped bool
	reopens sync.WaitGroup // reopen goroutines, waited for by close

	scratch Packet // reused for every packet: the handler may not keep it
}

// Open binds the queues and starts serving them until ctx is done or Close
// is called. newHandler is called once per queue, so a handler can keep
// per-queue scratch state without locks.
func Open(ctx context.Context, cfg Config, newHandler func(queue uint16) Handler, log *slog.Logger) (*Set, error) {
	if cfg.Count == 0 {
		cfg.Count = 1
	}
	if cfg.MaxQueueLen == 0 {
		cfg.MaxQueueLen = 4096
	}
	if cfg.RcvBuf == 0 {
		cfg.RcvBuf = 32 << 20
	}
	if v := os.Getenv(FaultEnv); v != "" && cfg.faultAfter == 0 {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s=%q: %w", FaultEnv, v, err)
		}
		cfg.faultAfter = n
		log.Warn("test hook: every queue's reader fails once after some packets", "env", FaultEnv, "packets", n)
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &Set{log: log, cancel: cancel, cpus: allowedCPUs()}
	for n := cfg.First; n < cfg.First+cfg.Count; n++ {
		cnt := &counters{}
		var q backend
		var err error
		if cfg.Library {
			q, err = openLibrary(ctx, n, cfg, newHandler(n), log, cnt)
		} else {
			q, err = openLean(n, cfg, newHandler(n), log, cnt, s.cpuOf(int(n-cfg.First)))
		}
		if err != nil {
			s.Close()
			return nil, err
		}
		s.queues = append(s.queues, q)
		s.counters = append(s.counters, cnt)
	}
	return s, nil
}

func openLibrary(ctx context.Context, num uint16, cfg Config, h Handler, log *slog.Logger, cnt *counters) (*libQueue, error) {
	q := &libQueue{num: num, ctx: ctx, cfg: cfg, handler: h, log: log, cnt: cnt}
	q.mu.Lock() // its callbacks run as soon as it is bound
	defer q.mu.Unlock()
	nf, err := q.open(1)
	if err != nil {
		return nil, err
	}
	q.nf, q.gen = nf, 1
	return q, nil
}

// open opens and binds a go-nfqueue socket whose callbacks are q's; gen
// is the generation it will have.
func (q *libQueue) open(gen uint32) (*nfqueue.Nfqueue, error) {
	cfg, num := q.cfg, q.num
	var flags uint32
	if !cfg.NoGSO {
		flags = nfqueue.NfQaCfgFlagGSO
	}
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      num,
		MaxPacketLen: maxCopy,
		MaxQueueLen:  cfg.MaxQueueLen,
		Copymode:     nfqueue.NfQnlCopyPacket,
		Flags:        flags,
		AfFamily:     unix.AF_INET,
		NetNS:        cfg.NetNS,
	})
	if err != nil {
		return nil, fmt.Errorf("nfqueue %d: open: %w", num, err)
	}
	if err := setRcvBufForce(nf.Con, cfg.RcvBuf); err != nil {
		nf.Close()
		return nil, fmt.Errorf("nfqueue %d: %w", num, err)
	}
	receive := func(a nfqueue.Attribute) int { return q.receive(gen, a) }
	if err := nf.RegisterWithErrorFunc(q.ctx, receive, func(err error) int { return q.receiveError(gen, err) }); err != nil {
		nf.Close()
		return nil, fmt.Errorf("nfqueue %d: bind: %w (is another program bound to this queue number? set kernel.queue)", num, err)
	}
	return nf, nil
}

// startReopen replaces the socket of generation gen, whose receive
// failed, in a goroutine of its own (the failing socket's callback
// goroutine must end before the socket can be closed). A socket already
// replaced, or a closed queue, is left alone.
func (q *libQueue) startReopen(gen uint32, cause error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.stopped || q.gen != gen {
		return
	}
	old := q.nf
	q.nf = nil
	q.gen++ // verdicts of the old socket's packets are not sent
	q.reopens.Add(1)
	go func() {
		defer q.reopens.Done()
		old.Close() // not under mu: its callbacks may still be sending verdicts
		q.reopen(cause)
	}()
}

// reopen binds a new socket, with a backoff until it works or the queue
// is closed.
func (q *libQueue) reopen(cause error) {
	wait := 10 * time.Millisecond
	for attempt := 1; ; attempt++ {
		q.mu.Lock()
		if q.stopped {
			q.mu.Unlock()
			return
		}
		nf, err := q.open(q.gen + 1)
		if err == nil {
			q.nf = nf
			q.gen++
		}
		q.mu.Unlock()
		if err == nil {
			q.cnt.reopens.Add(1)
			q.log.Warn("nfqueue reader reopened its socket after a receive failure; packets waiting for a verdict were dropped and are retransmitted",
				"queue", q.num, "attempts", attempt, "cause", cause)
			return
		}
		q.log.Error("nfqueue reopen failed; retrying", "queue", q.num, "attempt", attempt, "error", err)
		select {
		case <-time.After(wait):
		case <-q.ctx.Done():
			return
		}
		wait = min(2*wait, time.Second)
	}
}

// setRcvBufForce sets the socket's receive buffer past net.core.rmem_max.
func setRcvBufForce(c *netlink.Conn, size int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("SO_RCVBUFFORCE %d: %w (needs CAP_NET_ADMIN)", size, serr)
	}
	return nil
}

// receive handles a packet of the socket of generation gen.
func (q *libQueue) receive(gen uint32, a nfqueue.Attribute) int {
	if a.PacketID == nil || a.Payload == nil {
		return 0
	}
	p := &q.scratch
	*p = Packet{ID: *a.PacketID, Data: *a.Payload, q: q, gen: gen}
	if q.cnt.received.Add(1) == q.cfg.faultAfter {
		// The test hook: as if the receive had failed.
		q.startReopen(gen, errInjected)
	}
	if a.SkbInfo != nil && len(*a.SkbInfo) >= 4 {
		info := binary.BigEndian.Uint32(*a.SkbInfo)
		p.CsumNotReady = info&skbCsumNotReady != 0
		p.CsumNotVerified = info&skbCsumNotVerified != 0
		p.GSO = info&skbGSO != 0
	}
	if a.CapLen != nil && int(*a.CapLen) > len(p.Data) {
		// Cut, as in the lean backend: dropped, and the queue asks the
		// kernel for segments from now on. The library cannot change a
		// bound queue's flags: a new socket without the GSO flag
		// replaces this one (what waits for a verdict is dropped and
		// retransmitted, in segments).
		q.cnt.truncated.Add(1)
		if err := q.send(p, Drop); err != nil {
			q.cnt.errors.Add(1)
		}
		if p.GSO {
			q.mu.Lock()
			first := !q.cfg.NoGSO
			q.cfg.NoGSO = true
			q.mu.Unlock()
			if first {
				q.log.Warn(msgSegmenting, "queue", q.num, "length", *a.CapLen, "max", maxCopy)
				q.startReopen(gen, errCut)
			}
		}
		return 0
	}
	d := q.handler(p)
	if d == Hold {
		q.cnt.held.Add(1)
		return 0
	}
	if err := q.send(p, d); err != nil {
		q.cnt.errors.Add(1)
	}
	return 0
}

// barrier: the library sends each verdict as the handler returns.
func (q *libQueue) barrier() {}

func (q *libQueue) verdict(p *Packet, d Decision) error {
	q.cnt.held.Add(^uint64(0))
	return q.send(p, d)
}

func (q *libQueue) close() error {
	q.mu.Lock()
	q.stopped = true
	nf := q.nf
	q.mu.Unlock()
	var err error
	if nf != nil {
		err = nf.Close()
	}
	q.reopens.Wait()
	return err
}

// detach: go-nfqueue gives every packet its own copy already.
func (q *libQueue) detach(p *Packet) *Packet {
	c := *p
	return &c
}

func (q *libQueue) number() uint16 { return q.num }

// readied: the library's reader waits in Go's netpoller, which hands the
// P on at once.
func (q *libQueue) readied() {}

func (q *libQueue) send(p *Packet, d Decision) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if p.gen != q.gen || q.nf == nil {
		return errStale
	}
	q.cnt.count(d)
	switch d {
	case Accept:
		return q.nf.SetVerdict(p.ID, nfqueue.NfAccept)
	case AcceptModified:
		return q.nf.SetVerdictWithOption(p.ID, nfqueue.NfAccept, nfqueue.WithAlteredPacket(p.Data))
	case Drop:
		return q.nf.SetVerdict(p.ID, nfqueue.NfDrop)
	}
	return fmt.Errorf("nfq: invalid verdict %v", d)
}

// receiveError decides whether a receive error ends the loop: ENOBUFS
// means the kernel dropped packets because our socket buffer was full; it
// is counted (and visible in user_dropped), and the loop goes on.
func (q *libQueue) receiveError(gen uint32, err error) int {
	if errors.Is(err, unix.ENOBUFS) {
		q.cnt.overruns.Add(1)
		return 0
	}
	var oe *netlink.OpError
	if errors.As(err, &oe) && oe.Timeout() {
		return 1 // the context was cancelled: Close
	}
	if errors.Is(err, net.ErrClosed) {
		return 1
	}
	q.mu.RLock()
	current := q.gen == gen && !q.stopped
	q.mu.RUnlock()
	if !current {
		return 1 // a socket being replaced or closed: its end is expected
	}
	q.cnt.errors.Add(1)
	q.log.Error("nfqueue receive failed; reopening the queue", "queue", q.num, "error", err)
	q.startReopen(gen, err)
	return 1
}

// errCut is why a library queue replaces its socket after a GSO packet
// arrived cut.
var errCut = errors.New("a GSO packet longer than a queue carries arrived cut; the new socket asks for segments")

// Close unbinds every queue. Packets still held are dropped by the kernel
// (TCP retransmits them).
func (s *Set) Close() error {
	s.cancel()
	var errs []error
	for _, q := range s.queues {
		if err := q.close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Stats are a queue's counters: ours, and the kernel's.
type Stats struct {
	Queue                                 uint16
	Received, Accepted, Modified, Dropped uint64
	Held                                  uint64 // waiting for a verdict now
	Errors                                uint64 // verdicts or receives that failed
	Overruns                              uint64 // ENOBUFS seen on receive
	Reopens                               uint64 // sockets reopened after a receive failure
	// Truncated: packets that arrived cut, longer than a queue carries
	// (GSO packets of BIG TCP), and were dropped (counted in Dropped too).
	Truncated uint64
	Kernel    KernelStats
}

// Stats returns the counters of every queue.
func (s *Set) Stats() []Stats {
	kernel, _ := ReadKernelStats()
	out := make([]Stats, len(s.queues))
	for i, q := range s.queues {
		c := s.counters[i]
		out[i] = Stats{
			Queue: q.number(), Received: c.received.Load(), Accepted: c.accepted.Load(), Modified: c.modified.Load(),
			Dropped: c.dropped.Load(), Held: c.held.Load(), Errors: c.errors.Load(), Overruns: c.overruns.Load(), Reopens: c.reopens.Load(),
			Truncated: c.truncated.Load(), Kernel: kernel[q.number()],
		}
	}
	return out
}
