package main

import (
	"context"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabFwmarkAccept: with net.ipv4.tcp_fwmark_accept on, a socket
// accepted from a SYN takes the SYN's mark, and an intercepted SYN
// carries spliced's, which routes it to the gateway's own sockets. The
// SYN-ACK, routed by that mark, went back into the gateway: no
// intercepted connection opened. spliced's input chain now takes its
// mark off once the packet is routed, so connections open over IPv4
// and IPv6, with net.ipv4.fwmark_reflect and net.ipv6.fwmark_reflect
// on as well (the kernel's replies to a packet without a socket take
// its mark the same way), and flows splice intact.
func TestLabFwmarkAccept(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	lab.Gateway.MustRun("sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1", "net.ipv4.fwmark_reflect=1", "net.ipv6.fwmark_reflect=1")
	d := testnet.StartDaemon(t, lab, faultConfig("splice", ""))
	if st, err := d.Client().Status(context.Background()); err != nil || len(st.Warnings) > 0 {
		t.Errorf("status: %v %q, want no warning", err, st.Warnings)
	}
	for _, addr := range []netip.Addr{lab.Server().IPv4, lab.Server().IPv6} {
		dst := netip.AddrPortFrom(addr, 5001)
		ln, err := lab.Server().Listen(dst)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			io.WriteString(c, "hello through the gateway")
		}()
		c, err := lab.Client().Dial(dst, 5*time.Second)
		if err != nil {
			ln.Close()
			t.Fatalf("%v: an intercepted connection did not open with tcp_fwmark_accept on: %v\n%s", dst, err, tail(d.Log(), 10))
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		ln.Close()
		if err != nil || string(got) != "hello through the gateway" {
			t.Fatalf("%v: read %q, %v", dst, got, err)
		}
	}
	if failures := busyFlows(t, lab, d, "splice", 4, 2*time.Second, func() {}); len(failures) > 0 {
		t.Fatalf("spliced flows with tcp_fwmark_accept on:\n%s\n%s", strings.Join(failures, "\n"), tail(d.Log(), 20))
	}
}
