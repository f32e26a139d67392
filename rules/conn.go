package rules

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nftBuffer is the send and receive buffer of spliced's nftables netlink
// sockets. A table goes in as one transaction, which grows with
// kernel.queues (two sets and eight rules per queue) and with the divert
// entries of live flows a restart or a repair carries; the kernel refuses
// a batch larger than the send buffer ("message too long") and drops
// acknowledgements that overflow the receive buffer ("no buffer space
// available"). With the defaults (208 KiB) a machine with 12 CPUs or
// more (kernel.queues defaults to one per CPU) could not start. The
// buffers are limits, not allocations: memory is taken as messages queue.
const nftBuffer = 256 << 20

// nftConn opens an nftables netlink connection in the namespace netns (0:
// this process's) with large buffers; lasting keeps one socket open.
func nftConn(netns int, lasting bool) (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(LargeBuffers)}
	if lasting {
		opts = append(opts, nftables.AsLasting())
	}
	if netns != 0 {
		opts = append(opts, nftables.WithNetNSFd(netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables netlink: %w", err)
	}
	return c, nil
}

// LargeBuffers sets a netlink socket's buffers to nftBuffer, beyond
// net.core.{w,r}mem_max (CAP_NET_ADMIN, which spliced has); without the
// capability (a test, -check) it takes what the limits allow.
func LargeBuffers(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], nftBuffer); e != nil {
				if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], nftBuffer); e != nil && serr == nil {
					serr = fmt.Errorf("set netlink socket buffer: %w", e)
				}
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
