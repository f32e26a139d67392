package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabMPTCPClient: a client that offers Multipath TCP (MP_CAPABLE in
// its SYN, as Go programs since 1.24, iOS and mptcpize'd tools do), in
// both modes. The gateway answers in plain TCP, as the server behind it
// would be reached: the client's connection falls back to TCP, the flow
// is spliced (a splice captures TCP sockets with TCP_REPAIR; an MPTCP
// socket has no such state), and the transfer arrives intact both ways.
// Go's listeners use MPTCP unless told otherwise; found when a burst of
// 1000 connections made the kernel send SYN cookies from the daemon's
// MPTCP listener ("request_sock_subflow_v4: Possible SYN flooding").
func TestLabMPTCPClient(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			testnet.Privileged(t, "nft")
			lab := testnet.NewT(t, testnet.Options{})
			splice := "never"
			if mode == "splice" {
				splice = "immediate"
			}
			d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: %s
`, splice))
			srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
			ln, err := lab.Server().Listen(srv)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var c *net.TCPConn
			err = lab.Client().Do(func() error {
				dl := net.Dialer{Timeout: 10 * time.Second}
				dl.SetMultipathTCP(true)
				conn, err := dl.DialContext(context.Background(), "tcp4", srv.String())
				if err == nil {
					c = conn.(*net.TCPConn)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ln.SetDeadline(time.Now().Add(10 * time.Second))
			s, err := ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// The client's MPTCP socket fell back to TCP. (Go's
			// TCPConn.MultipathTCP says true after a fallback on this
			// kernel; ss reads the socket's own flag.)
			if out, err := lab.Client().Run("ss", "-Mtni", "dst", srv.String()); err != nil || !strings.Contains(out, "\nmptcp") || !strings.Contains(out, " fallback ") {
				t.Errorf("the client's MPTCP connection did not fall back to TCP (%v):\n%s", err, out)
			}
			tr := testnet.Exchange(c, s, testnet.TransferOptions{C2S: 8 << 20, S2C: 8 << 20, Seed: rand.Uint64(), Timeout: time.Minute})
			if err := tr.Check(); err != nil {
				t.Fatal(err)
			}
			// Listeners included: an MPTCP listener answers MP_CAPABLE.
			if out, _ := lab.Gateway.Run("ss", "-Mtan"); strings.Contains(out, "\nmptcp") {
				t.Errorf("the gateway holds MPTCP sockets:\n%s", out)
			}
			if mode == "splice" {
				waitSpliced(t, d)
			}
		})
	}
}
