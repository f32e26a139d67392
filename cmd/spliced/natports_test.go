package main

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabNATPortsOfSplicedFlows: a spliced NAT flow's local port on the
// gateway is free in the kernel (its socket is gone), and the kernel
// gives it to the next connections to the same server once its choice
// of port comes round again: after some thousand connections with the
// default port range, at once with the 40 ports this lab's gateway has.
// Such a connection's SYN met the flow's established server, got a
// challenge ACK (diverted into the flow) and no SYN-ACK, and the client
// was reset when the connect timed out. Every new connection must now
// connect, and the spliced flows stay intact.
func TestLabNATPortsOfSplicedFlows(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{GatewaySysctls: map[string]string{"net.ipv4.ip_local_port_range": "40000 40039"}})
	d := testnet.StartDaemon(t, lab, faultConfig("splice", "")+"    upstream: nat\n    connect_timeout: 2s\n")
	dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	echo := func(c net.Conn, msg string) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		b := make([]byte, len(msg))
		_, err := io.ReadFull(c, b)
		if err == nil && string(b) != msg {
			t.Errorf("echo of %q: %q", msg, b)
		}
		return err
	}
	// Half the even ports (the kernel's first choice) held by spliced
	// flows, then as many new connections again.
	const held = 10
	live := make([]net.Conn, held)
	for i := range live {
		c, err := lab.Client().Dial(dst, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := echo(c, "live"); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		live[i] = c
	}
	testnet.Eventually(t, 10*time.Second, func() error {
		if n := countMsg(d, "flow spliced"); n < held {
			return fmt.Errorf("%d of %d flows spliced", n, held)
		}
		return nil
	})
	for i := range held {
		c, err := lab.Client().Dial(dst, 5*time.Second)
		if err != nil {
			t.Fatalf("new connection %d: %v", i, err)
		}
		if err := echo(c, "new"); err != nil {
			t.Errorf("new connection %d, next to %d spliced flows: %v\n%s", i, held, err, tail(d.Log(), 5))
		}
		c.Close()
	}
	for i, c := range live {
		if err := echo(c, "still"); err != nil {
			t.Errorf("spliced flow %d after the new connections: %v", i, err)
		}
	}
}
