package nfq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The lean backend speaks nfnetlink_queue directly on a netlink socket:
// recvmmsg takes up to batchSize packets per system call into buffers that
// are reused, packets are parsed in place, and all verdicts of a batch go
// back in one sendmsg whose iovecs point at the (possibly rewritten)
// packets, so nothing is copied or allocated per packet.

// nfnetlink_queue constants (linux/netfilter/nfnetlink_queue.h).
const (
	nfnlSubsysQueue = 3

	nfqnlMsgPacket  = 0
	nfqnlMsgVerdict = 1
	nfqnlMsgConfig  = 2

	nfqaPacketHdr  = 1
	nfqaVerdictHdr = 2
	nfqaPayload    = 10
	nfqaCapLen     = 13
	nfqaSkbInfo    = 14

	nfqaCfgCmd         = 1
	nfqaCfgParams      = 2
	nfqaCfgQueueMaxlen = 3
	nfqaCfgMask        = 4
	nfqaCfgFlags       = 5

	nfqnlCfgCmdBind   = 1
	nfqnlCfgCmdUnbind = 2
	nfqnlCopyPacket   = 2
	nfqaCfgFGSO       = 1 << 2

	nfVerdictDrop   = 0
	nfVerdictAccept = 1

	nlmsgHdrLen = 16
	nfgenHdrLen = 4
	nlaHdrLen   = 4
)

const (
	batchSize = 64
	// closeCheck is how often a reader blocked in recvmmsg looks whether
	// the queue is being closed.
	closeCheck = 100 * time.Millisecond
	// A queued packet is at most 64 KiB (copy range 0xffff) plus its
	// netlink headers and attributes.
	recvBufSize = 65536 + 1024
	// maxCopy is the copy range the queues ask for: the most of a packet
	// the kernel copies to a queue's reader (it caps it lower still, at
	// 65531, so that the 16-bit length of the attribute holds it). A
	// longer packet arrives cut.
	maxCopy = 0xffff
)

func nlaAlign(n int) int { return (n + 3) &^ 3 }

// leanQueue is one queue served by the lean loop.
//
// The reader is supervised: when a receive fails for any reason but
// ENOBUFS (the kernel dropped packets because the socket buffer was full,
// which is counted and survived), it closes its socket (the kernel drops
// the packets waiting for a verdict, held ones included: their senders
// retransmit), opens and binds a new one, and goes on; a queue without
// bypass never stalls silently. Verdicts for packets of an earlier socket
// are not sent (their IDs would name other packets on the new one).
type leanQueue struct {
	num     uint16
	cfg     Config
	handler Handler
	log     logger
	cnt     *counters

	// The socket: the reader alone replaces it (reopen), under hold;
	// others read it under hold.
	fd   int
	file *os.File
	rc   syscall.RawConn
	gen  uint32 // counts sockets; packets carry the gen they came from
	// gsoOff: the queue asks the kernel to cut GSO packets into segments
	// before queueing them (see segmentGSO); gsoSeq is the sequence
	// number of that request. The reader's alone.
	gsoOff bool
	gsoSeq uint32

	// fault, when set, makes the next receive fail with it (a test hook;
	// see faultAfter).
	fault atomic.Pointer[error]
	// faultAfter: the reader fails its receive once after this many
	// packets, as if the socket had failed (0: never). See Open.
	faultAfter uint64

	bufs  [batchSize][]byte
	iov   [batchSize]unix.Iovec
	msgs  [batchSize]unix.Mmsghdr
	out   verdictBatch
	hold  sync.Mutex // serializes verdicts sent for held packets; guards the socket fields
	holdB verdictBatch
	stop  atomic.Bool
	done  chan struct{}
	seq   uint32
	scr   Packet
	// busy is set while the reader handles a batch whose verdicts are
	// not all sent; flushed counts the batches it sent (see Barrier).
	busy    atomic.Bool
	flushed atomic.Uint64
	// yield: a handler made a goroutine runnable during this batch
	// (Packet.Readied); only the reader's goroutine touches it.
	yield bool
}

// barrier waits until every verdict the reader decided so far reached the
// kernel: a verdict is batched, and the packet it lets through arrives
// after the batch is flushed, possibly later than the handler decided it.
func (q *leanQueue) barrier() {
	start := q.flushed.Load()
	for q.busy.Load() && q.flushed.Load() == start && !q.stop.Load() {
		time.Sleep(10 * time.Microsecond)
	}
}

// counters are a queue's statistics; both backends keep them.
type counters struct {
	received, accepted, modified, dropped, held, errors, overruns atomic.Uint64
	reopens                                                       atomic.Uint64
	// truncated: packets that arrived cut (longer than 64 KiB), dropped.
	truncated atomic.Uint64
}

// logger is what the queues log with (a *slog.Logger).
type logger interface {
	Error(string, ...any)
	Warn(string, ...any)
}

func (c *counters) count(d Decision) {
	switch d {
	case Accept:
		c.accepted.Add(1)
	case AcceptModified:
		c.modified.Add(1)
	case Drop:
		c.dropped.Add(1)
	}
}

// verdictBatch accumulates verdict messages as iovecs: for each packet a
// header (in hdrs) and, for a modified packet, its data and padding.
type verdictBatch struct {
	hdrs [batchSize][nlmsgHdrLen + nfgenHdrLen + nlaHdrLen + 8 + nlaHdrLen]byte
	iov  [3 * batchSize]unix.Iovec
	n    int // packets in the batch
	niov int
}

var pad [4]byte

func (b *verdictBatch) add(queue uint16, id uint32, d Decision, data []byte) {
	h := &b.hdrs[b.n]
	verdict := uint32(nfVerdictAccept)
	if d == Drop {
		verdict = nfVerdictDrop
	}
	hl := nlmsgHdrLen + nfgenHdrLen + nlaHdrLen + 8
	total := hl
	if d == AcceptModified {
		total = hl + nlaHdrLen + nlaAlign(len(data))
		hl += nlaHdrLen
	}
	binary.NativeEndian.PutUint32(h[0:], uint32(total))
	binary.NativeEndian.PutUint16(h[4:], nfnlSubsysQueue<<8|nfqnlMsgVerdict)
	binary.NativeEndian.PutUint16(h[6:], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(h[8:], 0)  // seq
	binary.NativeEndian.PutUint32(h[12:], 0) // pid
	h[16], h[17] = unix.AF_UNSPEC, 0
	binary.BigEndian.PutUint16(h[18:], queue)
	binary.NativeEndian.PutUint16(h[20:], nlaHdrLen+8)
	binary.NativeEndian.PutUint16(h[22:], nfqaVerdictHdr)
	binary.BigEndian.PutUint32(h[24:], verdict)
	binary.BigEndian.PutUint32(h[28:], id)
	if d == AcceptModified {
		binary.NativeEndian.PutUint16(h[32:], uint16(nlaHdrLen+len(data)))
		binary.NativeEndian.PutUint16(h[34:], nfqaPayload)
	}
	b.iov[b.niov] = iovec(&h[0], hl)
	b.niov++
	if d == AcceptModified && len(data) > 0 {
		b.iov[b.niov] = iovec(&data[0], len(data))
		b.niov++
		if p := nlaAlign(len(data)) - len(data); p > 0 {
			b.iov[b.niov] = iovec(&pad[0], p)
			b.niov++
		}
	}
	b.n++
}

// flush sends the batch in one sendmsg.
func (b *verdictBatch) flush(rc syscall.RawConn) error {
	if b.n == 0 {
		return nil
	}
	var msg unix.Msghdr
	msg.Iov = &b.iov[0]
	msg.SetIovlen(b.niov)
	var serr error
	err := rc.Write(func(fd uintptr) bool {
		_, _, errno := unix.Syscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), 0)
		if errno == unix.EAGAIN {
			return false
		}
		if errno != 0 {
			serr = errno
		}
		return true
	})
	b.n, b.niov = 0, 0
	if err != nil {
		return err
	}
	return serr
}

func openLean(num uint16, cfg Config, h Handler, log logger, cnt *counters, cpu int) (*leanQueue, error) {
	q := &leanQueue{num: num, cfg: cfg, handler: h, log: log, cnt: cnt, done: make(chan struct{}), faultAfter: cfg.faultAfter}
	if err := q.open(); err != nil {
		return nil, err
	}
	for i := range q.bufs {
		q.bufs[i] = make([]byte, recvBufSize)
		q.iov[i] = unix.Iovec{Base: &q.bufs[i][0], Len: recvBufSize}
		q.msgs[i].Hdr.Iov = &q.iov[i]
		q.msgs[i].Hdr.SetIovlen(1)
	}
	go func() {
		defer pinThread(cpu)() // see cpu.go: verdicts leave in order
		q.loop()
	}()
	return q, nil
}

// open opens, configures and binds the queue's socket and makes it the
// queue's (the caller holds hold, or is openLean).
func (q *leanQueue) open() error {
	cfg := q.cfg
	fd, err := netlinkSocket(cfg.NetNS)
	if err != nil {
		return err
	}
	q.fd = fd
	for _, o := range []struct {
		opt, val int
		name     string
	}{
		{unix.SO_RCVBUFFORCE, cfg.RcvBuf, "SO_RCVBUFFORCE"},
		// A batch of verdicts with rewritten 64 KiB packets is one
		// netlink message train; the send buffer must hold it.
		{unix.SO_SNDBUFFORCE, 2 * batchSize * recvBufSize, "SO_SNDBUFFORCE"},
	} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, o.opt, o.val); err != nil {
			unix.Close(fd)
			return fmt.Errorf("%s %d: %w (needs CAP_NET_ADMIN)", o.name, o.val, err)
		}
	}
	var flags uint32
	if !cfg.NoGSO && !q.gsoOff {
		flags = nfqaCfgFGSO
	}
	if err := q.configure(cfg.MaxQueueLen, flags); err != nil {
		unix.Close(fd)
		return err
	}
	// The reader blocks in recvmmsg on its own thread (see loop); the
	// receive timeout lets it notice Close.
	tv := unix.NsecToTimeval(int64(closeCheck))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	file := os.NewFile(uintptr(fd), fmt.Sprintf("nfqueue-%d", q.num))
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return err
	}
	q.file, q.rc = file, rc
	q.gen++
	return nil
}

// reopen replaces a failed socket: closing it unbinds the queue (the
// kernel drops what waits for a verdict), a new one binds it again. It
// retries with a backoff until it succeeds or the queue is closed, and
// reports whether it succeeded.
func (q *leanQueue) reopen(cause error) bool {
	wait := 10 * time.Millisecond
	for attempt := 1; ; attempt++ {
		q.hold.Lock()
		if q.stop.Load() {
			q.hold.Unlock()
			return false
		}
		if q.file != nil {
			q.file.Close()
			q.file = nil
		}
		err := q.open()
		q.hold.Unlock()
		if err == nil {
			q.cnt.reopens.Add(1)
			q.log.Warn("nfqueue reader reopened its socket after a receive failure; packets waiting for a verdict were dropped and are retransmitted",
				"queue", q.num, "attempts", attempt, "cause", cause)
			return true
		}
		q.log.Error("nfqueue reopen failed; retrying", "queue", q.num, "attempt", attempt, "error", err)
		time.Sleep(wait)
		wait = min(2*wait, time.Second)
	}
}

// netlinkSocket opens a NETLINK_NETFILTER socket, in the namespace behind
// netns if it is not 0.
func netlinkSocket(netns int) (int, error) {
	open := func() (int, error) {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		if err != nil {
			return -1, fmt.Errorf("netlink socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("netlink bind: %w", err)
		}
		return fd, nil
	}
	if netns == 0 {
		return open()
	}
	return inNetNS(netns, open)
}

// configure binds the queue and sets copy mode, flags and length, waiting
// for the kernel's acknowledgment of each step.
func (q *leanQueue) configure(maxLen uint32, flags uint32) error {
	cmd := func(c uint8) []byte { return []byte{c, 0, 0, 0} } // command, pad, be16 pf (unused)
	params := binary.BigEndian.AppendUint32(nil, maxCopy)
	params = append(params, nfqnlCopyPacket)
	steps := []struct {
		what  string
		attrs [][2]any
	}{
		{"unbind (stale binding)", [][2]any{{nfqaCfgCmd, cmd(nfqnlCfgCmdUnbind)}}},
		{"bind", [][2]any{{nfqaCfgCmd, cmd(nfqnlCfgCmdBind)}}},
		{"set copy mode", [][2]any{{nfqaCfgParams, params}}},
		{"set flags and length", append(gsoFlagAttrs(flags),
			[2]any{nfqaCfgQueueMaxlen, binary.BigEndian.AppendUint32(nil, maxLen)})},
	}
	for i, s := range steps {
		err := q.request(nfqnlMsgConfig, s.attrs)
		if err != nil && !(i == 0 && (errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EPERM))) {
			// The kernel refuses a bind to a queue another socket holds
			// with EPERM (its owner check comes before EBUSY's), which
			// reads as a missing capability: say who holds it.
			if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EPERM) && boundElsewhere(q.num) {
				return fmt.Errorf("nfqueue %d: %s: %w (another program is bound to this queue, such as another spliced with the same kernel.queue; choose another kernel.queue)", q.num, s.what, err)
			}
			return fmt.Errorf("nfqueue %d: %s: %w", q.num, s.what, err)
		}
	}
	return nil
}

// boundElsewhere reports whether the kernel lists queue num as bound (to
// another socket: called after our bind failed).
func boundElsewhere(num uint16) bool {
	ks, err := ReadKernelStats()
	_, ok := ks[num]
	return err == nil && ok
}

// gsoFlagAttrs are the config attributes that set the queue's GSO flag to
// flags' (nfqaCfgFGSO or 0).
func gsoFlagAttrs(flags uint32) [][2]any {
	return [][2]any{
		{nfqaCfgFlags, binary.BigEndian.AppendUint32(nil, flags)},
		{nfqaCfgMask, binary.BigEndian.AppendUint32(nil, nfqaCfgFGSO)},
	}
}

// message builds a netlink message of the queue's subsystem with sequence
// number seq.
func (q *leanQueue) message(msgType, flags uint16, seq uint32, attrs [][2]any) []byte {
	b := make([]byte, nlmsgHdrLen+nfgenHdrLen, 128)
	binary.NativeEndian.PutUint16(b[4:], nfnlSubsysQueue<<8|msgType)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	b[16] = unix.AF_UNSPEC
	binary.BigEndian.PutUint16(b[18:], q.num)
	for _, a := range attrs {
		data := a[1].([]byte)
		l := nlaHdrLen + len(data)
		b = binary.NativeEndian.AppendUint16(b, uint16(l))
		b = binary.NativeEndian.AppendUint16(b, uint16(a[0].(int)))
		b = append(b, data...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	return b
}

// request sends a config message with NLM_F_ACK and waits for the answer
// (on the still blocking socket).
func (q *leanQueue) request(msgType uint16, attrs [][2]any) error {
	q.seq++
	b := q.message(msgType, unix.NLM_F_REQUEST|unix.NLM_F_ACK, q.seq, attrs)
	if err := unix.Sendto(q.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(q.fd, buf, 0)
		if err != nil {
			return err
		}
		for m := buf[:n]; len(m) >= nlmsgHdrLen; {
			l := int(binary.NativeEndian.Uint32(m))
			if l < nlmsgHdrLen || l > len(m) {
				break
			}
			typ := binary.NativeEndian.Uint16(m[4:])
			seq := binary.NativeEndian.Uint32(m[8:])
			if typ == unix.NLMSG_ERROR && seq == q.seq && l >= nlmsgHdrLen+4 {
				if errno := int32(binary.NativeEndian.Uint32(m[16:])); errno != 0 {
					return syscall.Errno(-errno)
				}
				return nil
			}
			m = m[nlaAlign(l):]
		}
	}
}

func (q *leanQueue) loop() {
	defer close(q.done)
	for !q.stop.Load() {
		n, err := q.recv()
		if err != nil {
			if q.stop.Load() {
				return
			}
			if errors.Is(err, unix.ENOBUFS) {
				q.cnt.overruns.Add(1)
				continue
			}
			q.cnt.errors.Add(1)
			q.log.Error("nfqueue receive failed; reopening the queue", "queue", q.num, "error", err)
			q.out.n, q.out.niov = 0, 0 // verdicts for the old socket's packets
			if !q.reopen(err) {
				return
			}
			continue
		}
		if n == 0 {
			continue
		}
		q.busy.Store(true)
		for i := 0; i < n; i++ {
			q.process(q.bufs[i][:q.msgs[i].Len])
		}
		if err := q.out.flush(q.rc); err != nil {
			q.cnt.errors.Add(1)
		}
		q.flushed.Add(1)
		q.busy.Store(false)
		if q.yield {
			// Let the goroutines the batch readied run on this P now,
			// rather than after the runtime takes it from the reader
			// blocked in recvmmsg.
			q.yield = false
			runtime.Gosched()
		}
	}
}

// recv fills up to batchSize buffers, blocking until at least one message
// is there (MSG_WAITFORONE) or the receive timeout passed (0 messages).
//
// The reader blocks in the system call on its locked thread rather than
// parking in Go's netpoller: a parked goroutine locked to a thread is
// woken by another thread and handed back to its own, two wakeups per
// batch, which cost a third of the request rate and most of the idle
// splice latency (make bench, both designs measured side by side).
func (q *leanQueue) recv() (int, error) {
	if e := q.fault.Swap(nil); e != nil {
		return 0, *e
	}
	var n int
	var serr error
	err := q.rc.Read(func(fd uintptr) bool {
		r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&q.msgs[0])), batchSize, unix.MSG_WAITFORONE, 0, 0)
		switch errno {
		case 0:
			n = int(r)
		case unix.EAGAIN, unix.EINTR: // the receive timeout: the loop looks at q.stop
		default:
			serr = errno
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	return n, serr
}

// process handles one netlink datagram (one or more messages).
func (q *leanQueue) process(b []byte) {
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b))
		if l < nlmsgHdrLen || l > len(b) {
			return
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		switch {
		case typ == nfnlSubsysQueue<<8|nfqnlMsgPacket && l >= nlmsgHdrLen+nfgenHdrLen:
			q.packet(b[nlmsgHdrLen+nfgenHdrLen : l])
		case typ == unix.NLMSG_ERROR && l >= nlmsgHdrLen+4:
			// A verdict the kernel refused (unknown ID, bad payload), or
			// segmentGSO's request.
			if errno := int32(binary.NativeEndian.Uint32(b[nlmsgHdrLen:])); errno != 0 {
				q.cnt.errors.Add(1)
				if seq := binary.NativeEndian.Uint32(b[8:]); q.gsoOff && seq == q.gsoSeq {
					q.log.Error("nfqueue: the kernel refused to cut GSO packets into segments before queueing them; GSO packets longer than 64 KiB are dropped",
						"queue", q.num, "error", syscall.Errno(-errno))
				}
			}
		}
		b = b[min(nlaAlign(l), len(b)):]
	}
}

func (q *leanQueue) packet(attrs []byte) {
	p := &q.scr
	*p = Packet{q: q}
	var haveID, truncated bool
	var capLen uint32
	for len(attrs) >= nlaHdrLen {
		l := int(binary.NativeEndian.Uint16(attrs))
		typ := binary.NativeEndian.Uint16(attrs[2:]) & 0x3fff
		if l < nlaHdrLen || l > len(attrs) {
			break
		}
		v := attrs[nlaHdrLen:l]
		switch typ {
		case nfqaPacketHdr:
			if len(v) >= 4 {
				p.ID, haveID = binary.BigEndian.Uint32(v), true
			}
		case nfqaPayload:
			p.Data = v
		case nfqaSkbInfo:
			if len(v) >= 4 {
				info := binary.BigEndian.Uint32(v)
				p.CsumNotReady = info&skbCsumNotReady != 0
				p.CsumNotVerified = info&skbCsumNotVerified != 0
				p.GSO = info&skbGSO != 0
			}
		case nfqaCapLen:
			truncated = true
			if len(v) >= 4 {
				capLen = binary.BigEndian.Uint32(v)
			}
		}
		attrs = attrs[min(nlaAlign(l), len(attrs)):]
	}
	if !haveID {
		return
	}
	p.gen = q.gen
	if q.cnt.received.Add(1) == q.faultAfter {
		err := error(errInjected)
		q.fault.Store(&err)
	}
	if truncated {
		// Only part of the packet reached us (a GSO packet above 64 KiB,
		// "BIG TCP"); a rewritten copy would cut it. Drop it: TCP
		// resends, and from now on in segments (segmentGSO).
		q.cnt.truncated.Add(1)
		q.cnt.count(Drop)
		q.out.add(q.num, p.ID, Drop, nil)
		if p.GSO && !q.gsoOff {
			q.segmentGSO(capLen)
		}
		return
	}
	d := q.handler(p)
	if d == Hold {
		q.cnt.held.Add(1)
		return
	}
	q.cnt.count(d)
	q.out.add(q.num, p.ID, d, p.Data)
	if q.out.n == batchSize {
		if err := q.out.flush(q.rc); err != nil {
			q.cnt.errors.Add(1)
		}
	}
}

// segmentGSO clears the queue's GSO flag, after a GSO packet longer than
// a queue carries (length bytes) arrived cut: the kernel then cuts every
// GSO packet into segments before it queues them. With BIG TCP (an
// interface's gso_max_size or gro_max_size above 64 KiB) senders and GRO
// hand the gateway GSO packets of up to 512 KiB; dropping them alone
// cured nothing, since the retransmissions and the data after them came
// merged again: a spliced flow crawled, 64 MiB each way in 14-22 s
// instead of 0.5 s, over a thousand packets dropped (TestLabBigTCP,
// TestQueueSegmentsBigGSO).
// Segments cost the queue more packets (see the package comment), so the
// log says how to keep whole GSO packets. The request goes without
// NLM_F_ACK (the reader may not wait for an answer among the packets);
// the kernel takes it before the send returns, and reports only a
// failure (process). The flag stays off on a reopened socket.
func (q *leanQueue) segmentGSO(length uint32) {
	q.gsoOff = true
	q.seq++
	q.gsoSeq = q.seq
	b := q.message(nfqnlMsgConfig, unix.NLM_F_REQUEST, q.seq, gsoFlagAttrs(0))
	var serr error
	err := q.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return true
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		q.cnt.errors.Add(1)
		q.log.Error("nfqueue: could not ask the kernel to cut GSO packets into segments before queueing them; GSO packets longer than 64 KiB are dropped",
			"queue", q.num, "error", err)
		return
	}
	q.log.Warn(msgSegmenting, "queue", q.num, "length", length, "max", maxCopy)
}

// msgSegmenting is the warning of a queue that cleared its GSO flag.
const msgSegmenting = "nfqueue received a GSO packet longer than it can carry (BIG TCP: an interface's gso_max_size or gro_max_size above 65536); " +
	"the kernel now cuts GSO packets into segments before queueing them, which costs throughput. " +
	"To keep whole GSO packets, set gso_max_size, gro_max_size, gso_ipv4_max_size and gro_ipv4_max_size to 65536 on the interfaces of spliced flows"

// errInjected is the receive failure of the test hook (Config.faultAfter).
var errInjected = errors.New("injected receive failure (test hook)")

// errStale: a held packet's socket was replaced; the kernel dropped it.
var errStale = errors.New("nfqueue: the packet's socket was reopened; the kernel dropped it")

// verdict sends the verdict of a held packet.
func (q *leanQueue) verdict(p *Packet, d Decision) error {
	q.hold.Lock()
	defer q.hold.Unlock()
	q.cnt.held.Add(^uint64(0))
	if p.gen != q.gen {
		return errStale
	}
	q.cnt.count(d)
	q.holdB.add(q.num, p.ID, d, p.Data)
	return q.holdB.flush(q.rc)
}

// detach copies the packet's data out of the receive buffer it lives in.
func (q *leanQueue) detach(p *Packet) *Packet {
	c := *p
	c.Data = append([]byte(nil), p.Data...)
	return &c
}

// close stops the loop; closing the socket unbinds the queue, and the
// kernel drops the packets still waiting for a verdict.
func (q *leanQueue) close() error {
	q.stop.Store(true)
	q.hold.Lock()
	var err error
	if q.file != nil {
		err = q.file.Close()
		q.file = nil
	}
	q.hold.Unlock()
	<-q.done
	return err
}

func (q *leanQueue) number() uint16 { return q.num }

func (q *leanQueue) readied() { q.yield = true }

// iovec is an iovec of n bytes at p; its length field is 32 bits wide on
// 32-bit architectures (arm, mipsle) and 64 on the others.
func iovec(p *byte, n int) unix.Iovec {
	v := unix.Iovec{Base: p}
	v.SetLen(n)
	return v
}
