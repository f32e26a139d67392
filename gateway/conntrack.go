package gateway

import (
	"errors"
	"log/slog"
	"sync/atomic"

	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"spliced/logging"
	"spliced/splice"
)

// conntrackCleaner removes the conntrack entries a splice leaves behind.
//
// While a flow is proxied, conntrack tracks it if any rule on the router
// uses conntrack (an operator's `ct state` rule is enough). Once spliced,
// the flow's packets are untracked (the divert chain's notrack), so its
// entry never sees the flow end and stays ESTABLISHED for
// nf_conntrack_tcp_timeout_established, five days by default: on a busy
// router the spliced flows of a few days would fill the conntrack table,
// and new connections would be dropped. The entries are deleted through
// ctnetlink right after the splice, off the splice's critical path.
type conntrackCleaner struct {
	conn    *conntrack.Conn
	work    chan [2]splice.Key
	done    chan struct{}
	log     *slog.Logger
	deleted atomic.Uint64 // entries removed
	failed  atomic.Uint64 // deletions that failed or were not queued
}

// newConntrackCleaner starts the cleaner, or returns nil (which does
// nothing) if ctnetlink is unavailable.
func newConntrackCleaner(log *slog.Logger) *conntrackCleaner {
	conn, err := conntrack.Dial(nil)
	if err != nil {
		log.Warn("ctnetlink unavailable: conntrack entries of spliced flows will linger until they time out (load nf_conntrack_netlink)", logging.Err(err))
		return nil
	}
	c := &conntrackCleaner{conn: conn, work: make(chan [2]splice.Key, 4096), done: make(chan struct{}), log: log}
	go c.run()
	return c
}

// forget queues the removal of a spliced flow's entries: the client's
// connection and, if it differs (NAT), the gateway's to the server.
func (c *conntrackCleaner) forget(keys [2]splice.Key) {
	if c == nil {
		return
	}
	select {
	case c.work <- keys:
	default:
		c.failed.Add(1) // the entry times out instead
	}
}

func (c *conntrackCleaner) run() {
	defer close(c.done)
	for keys := range c.work {
		client, server := keys[splice.C2S], keys[splice.S2C].Reverse()
		c.delete(client)
		if server != client {
			c.delete(server)
		}
	}
}

// delete removes the entry whose original tuple is k. No entry (conntrack
// is not in use, or nothing tracked the flow) is not an error.
func (c *conntrackCleaner) delete(k splice.Key) {
	src, dst := k.SrcAddrPort(), k.DstAddrPort()
	err := c.conn.Delete(conntrack.NewFlow(unix.IPPROTO_TCP, 0, src.Addr(), dst.Addr(), src.Port(), dst.Port(), 0, 0))
	switch {
	case err == nil:
		c.deleted.Add(1)
	case errors.Is(err, unix.ENOENT):
	default:
		c.failed.Add(1)
		c.log.Debug("delete conntrack entry", "tuple", k.String(), logging.Err(err))
	}
}

// Close stops the cleaner after the queued work.
func (c *conntrackCleaner) Close() error {
	if c == nil {
		return nil
	}
	close(c.work)
	<-c.done
	return c.conn.Close()
}
