package gateway

import (
	"context"
	"errors"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"spliced/rules"
)

// watchRouting calls poke when an ip rule, or a route spliced installed
// (protocol rules.RouteProtocol), is deleted in the daemon's network
// namespace, until ctx is done. The nftables monitor does not see policy
// routing, and without its rule and route the packets the table marks
// for the gateway's sockets are routed past them: before, a deleted rule
// or route (a network manager that removes foreign ones at its restart
// does it) came back only at the next periodic check, 10 s later
// (TestLabRoutingGone).
func watchRouting(ctx context.Context, poke func()) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	groups := uint32(1<<(unix.RTNLGRP_IPV4_RULE-1) | 1<<(unix.RTNLGRP_IPV6_RULE-1) |
		1<<(unix.RTNLGRP_IPV4_ROUTE-1) | 1<<(unix.RTNLGRP_IPV6_ROUTE-1))
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return err
	}
	// Woken up regularly to see whether ctx is done.
	tv := unix.NsecToTimeval((250 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return err
	}
	go func() {
		defer unix.Close(fd)
		buf := make([]byte, 64<<10)
		for ctx.Err() == nil {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			switch {
			case errors.Is(err, unix.ENOBUFS):
				poke() // events were lost: one may have been ours
				continue
			case err != nil:
				continue // the timeout (EAGAIN), or EINTR
			}
			msgs, err := syscall.ParseNetlinkMessage(buf[:n])
			if err != nil {
				continue
			}
			for _, m := range msgs {
				switch m.Header.Type {
				case unix.RTM_DELRULE, unix.RTM_NEWRULE:
					// A deleted rule may be ours; a new one may route
					// by mark (checkMarkRouting, run with the repair).
					poke()
				case unix.RTM_DELROUTE:
					// struct rtmsg: family, dst_len, src_len, tos,
					// table, protocol, ...
					if len(m.Data) >= unix.SizeofRtMsg && m.Data[5] == rules.RouteProtocol {
						poke()
					}
				}
			}
		}
	}()
	return nil
}
