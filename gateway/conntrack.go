package gateway

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"spliced/logging"
	"spliced/splice"
)

// conntrackCleaner keeps the conntrack entries of spliced flows right.
//
// While a flow is proxied, conntrack tracks it if any rule on the router
// uses conntrack (spliced's own service rules do). Once spliced, the
// flow's packets are untracked (the divert chain's notrack), so its
// entry sees neither the bytes nor the end of the flow:
//
//   - At a splice the entries stay, in the direction the client's SYN
//     gave them, and take liberal window tracking in both directions
//     (loosen). If the flow is unspliced, the gateway's rebuilt sockets
//     send again while the client's packets still cross the queue
//     untracked (the passthrough): without an entry, their first packet
//     would start one in the reverse direction, from the service's
//     address to the client, and conntrack cannot reopen such an entry
//     for the client's next SYN from that port (INVALID, which an
//     operator's `ct state invalid drop` drops). The spliced bytes moved
//     both sequences past the entry's windows, hence liberal tracking,
//     as conntrack gives a connection it picks up in mid-stream.
//   - When a spliced flow ends, its entries are deleted (forget): they
//     would otherwise stay ESTABLISHED for nf_conntrack_tcp_timeout_established,
//     five days by default, and the spliced flows of a few days would
//     fill the conntrack table of a busy router.
//
// Both go through ctnetlink, off the transitions' critical path, in the
// order they were queued. The queue takes a whole burst: the reaper
// retires every flow that ended or went idle in a round at once (the
// memory bench's 9,900 flows spliced together go idle together), and a
// queue of 4,096 dropped the rest, whose entries then stayed ESTABLISHED
// for days and filled the router's conntrack table (nf_conntrack_max:
// the kernel then drops every new connection, routed or intercepted).
type conntrackCleaner struct {
	conn *conntrack.Conn
	nl   *netlink.Conn // ctnetlink, for loosenEntry
	// mu guards pending, the work not yet taken, and closed; wake tells
	// run that pending has work (or that the cleaner closed).
	mu       sync.Mutex
	pending  []conntrackWork
	closed   bool
	wake     chan struct{}
	done     chan struct{}
	log      *slog.Logger
	loosened atomic.Uint64 // entries given liberal window tracking
	deleted  atomic.Uint64 // entries removed
	failed   atomic.Uint64 // updates or deletions that failed or were not queued
}

// conntrackWork is what to do with a flow's entries: its keys as the
// engine has them, and whether to delete them (or loosen them).
type conntrackWork struct {
	keys   [2]splice.Key
	delete bool
}

// newConntrackCleaner starts the cleaner, or returns nil (which does
// nothing) if ctnetlink is unavailable.
func newConntrackCleaner(log *slog.Logger) *conntrackCleaner {
	conn, err := conntrack.Dial(nil)
	var nl *netlink.Conn
	if err == nil {
		if nl, err = netlink.Dial(unix.NETLINK_NETFILTER, nil); err != nil {
			conn.Close()
		}
	}
	if err != nil {
		log.Warn("ctnetlink unavailable: conntrack entries of spliced flows will linger until they time out (load nf_conntrack_netlink)", logging.Err(err))
		return nil
	}
	c := &conntrackCleaner{conn: conn, nl: nl, wake: make(chan struct{}, 1), done: make(chan struct{}), log: log}
	go c.run()
	return c
}

// loosen queues liberal window tracking for a flow just spliced: the
// client's connection and, if it differs (NAT), the gateway's to the
// server.
func (c *conntrackCleaner) loosen(keys [2]splice.Key) { c.queue(conntrackWork{keys: keys}) }

// forget queues the removal of an ended spliced flow's entries.
func (c *conntrackCleaner) forget(keys [2]splice.Key) {
	c.queue(conntrackWork{keys: keys, delete: true})
}

// conntrackQueueMax bounds the work waiting for the cleaner, should
// ctnetlink stop answering: each flow queues at most two (its splice,
// its end), so this is far above any burst limits.max_flows allows by
// default (74 bytes each: under 20 MiB).
const conntrackQueueMax = 1 << 18

func (c *conntrackCleaner) queue(w conntrackWork) {
	if c == nil {
		return
	}
	c.mu.Lock()
	if c.closed || len(c.pending) >= conntrackQueueMax {
		c.mu.Unlock()
		c.failed.Add(1) // the entry stays as it is
		return
	}
	c.pending = append(c.pending, w)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default: // run is told already
	}
}

func (c *conntrackCleaner) run() {
	defer close(c.done)
	var batch []conntrackWork
	for range c.wake {
		for {
			c.mu.Lock()
			batch, c.pending = c.pending, batch[:0]
			closed := c.closed
			c.mu.Unlock()
			if len(batch) == 0 {
				if closed {
					return
				}
				break
			}
			for _, w := range batch {
				c.do(w)
			}
		}
	}
}

// do updates or deletes a flow's entries.
func (c *conntrackCleaner) do(w conntrackWork) {
	do := c.loosenEntry
	if w.delete {
		do = c.delete
	}
	client, server := w.keys[splice.C2S], w.keys[splice.S2C].Reverse()
	do(client)
	if server != client {
		do(server)
	}
}

// flowOf is the conntrack flow whose original tuple is k. Conntrack
// finds an entry by either of its tuples, so it also names an entry that
// runs the other way.
func flowOf(k splice.Key) conntrack.Flow {
	src, dst := k.SrcAddrPort(), k.DstAddrPort()
	return conntrack.NewFlow(unix.IPPROTO_TCP, 0, src.Addr(), dst.Addr(), src.Port(), dst.Port(), 0, 0)
}

// ctnetlink's message and attributes (linux/netfilter/nfnetlink_conntrack.h)
// for loosenEntry.
const (
	ctMsgNew                  = 0 // IPCTNL_MSG_CT_NEW: creates or updates
	ctaTupleOrig              = 1
	ctaProtoInfo              = 4
	ctaTupleIP                = 1
	ctaTupleProto             = 2
	ctaIPv4Src, ctaIPv4Dst    = 1, 2
	ctaIPv6Src, ctaIPv6Dst    = 3, 4
	ctaProtoNum               = 1
	ctaProtoSrcPort           = 2
	ctaProtoDstPort           = 3
	ctaProtoInfoTCP           = 1
	ctaProtoInfoTCPFlagsOrig  = 4
	ctaProtoInfoTCPFlagsReply = 5
	ctTCPBeLiberal            = 0x08 // IP_CT_TCP_FLAG_BE_LIBERAL
)

// loosenMessage is the ctnetlink update that sets liberal window
// tracking in both directions of the entry k names and changes nothing
// else. A TCP flags attribute is a byte of flags and a byte of the mask
// of those to change. (ti-mo/conntrack's update always sets the state and
// the window scales too, and its Get, which could read them first, waits
// forever on this kernel: a reply flagged multipart that ends with an
// acknowledgement rather than NLMSG_DONE.)
func loosenMessage(k splice.Key) (netlink.Message, error) {
	src, dst := k.SrcAddrPort(), k.DstAddrPort()
	family, srcAttr, dstAttr := byte(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if !k.IsIPv4() {
		family, srcAttr, dstAttr = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
	}
	ae := netlink.NewAttributeEncoder()
	ae.Nested(ctaTupleOrig, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(ctaTupleIP, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(srcAttr, src.Addr().AsSlice())
			ae.Bytes(dstAttr, dst.Addr().AsSlice())
			return nil
		})
		ae.Nested(ctaTupleProto, func(ae *netlink.AttributeEncoder) error {
			ae.Uint8(ctaProtoNum, unix.IPPROTO_TCP)
			ae.Bytes(ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, src.Port()))
			ae.Bytes(ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dst.Port()))
			return nil
		})
		return nil
	})
	ae.Nested(ctaProtoInfo, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(ctaProtoInfoTCP, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(ctaProtoInfoTCPFlagsOrig, []byte{ctTCPBeLiberal, ctTCPBeLiberal})
			ae.Bytes(ctaProtoInfoTCPFlagsReply, []byte{ctTCPBeLiberal, ctTCPBeLiberal})
			return nil
		})
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return netlink.Message{}, err
	}
	return netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | ctMsgNew),
			Flags: netlink.Request | netlink.Acknowledge, // no Create: an update only
		},
		// nfgenmsg: family, version 0, resource ID 0.
		Data: append([]byte{family, 0, 0, 0}, attrs...),
	}, nil
}

// loosenEntry sets liberal window tracking on the entry k names.
func (c *conntrackCleaner) loosenEntry(k splice.Key) {
	msg, err := loosenMessage(k)
	if err == nil {
		_, err = c.nl.Execute(msg)
	}
	c.count(&c.loosened, "loosen", k, err)
}

// delete removes the entry k names.
func (c *conntrackCleaner) delete(k splice.Key) {
	c.count(&c.deleted, "delete", k, c.conn.Delete(flowOf(k)))
}

// count counts an update's outcome. No entry (conntrack is not in use,
// or nothing tracked the flow) is not an error.
func (c *conntrackCleaner) count(done *atomic.Uint64, what string, k splice.Key, err error) {
	switch {
	case err == nil:
		done.Add(1)
	case errors.Is(err, unix.ENOENT):
	default:
		c.failed.Add(1)
		c.log.Debug(what+" conntrack entry", "tuple", k.String(), logging.Err(err))
	}
}

// Close stops the cleaner after the queued work.
func (c *conntrackCleaner) Close() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	<-c.done
	return errors.Join(c.conn.Close(), c.nl.Close())
}
