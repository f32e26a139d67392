package testnet

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
)

func TestLabRoutesBothFamilies(t *testing.T) {
	lab := NewT(t, Options{Servers: 2, ClientSysctls: map[string]string{"net.ipv4.tcp_rmem": "4096 65536 1048576"}})
	got, err := lab.Client().ReadSysctl("net.ipv4.tcp_rmem")
	if err != nil || strings.Join(strings.Fields(got), " ") != "4096 65536 1048576" {
		t.Fatalf("client tcp_rmem = %q, %v", got, err)
	}
	if v, _ := lab.Server().ReadSysctl("net.ipv4.tcp_rmem"); strings.Join(strings.Fields(v), " ") == "4096 65536 1048576" {
		t.Fatalf("client sysctl leaked into the server namespace")
	}
	for _, v6 := range []bool{false, true} {
		for _, srv := range lab.Servers {
			t.Run(fmt.Sprintf("v6=%v/%s", v6, srv.Name), func(t *testing.T) {
				echoThroughLab(t, lab.Client(), srv, v6)
			})
		}
	}
}

func echoThroughLab(t *testing.T, client, server *Host, v6 bool) {
	network := "tcp4"
	if v6 {
		network = "tcp6"
	}
	var ln net.Listener
	if err := server.Do(func() (err error) {
		ln, err = net.Listen(network, netip.AddrPortFrom(server.Addr(v6), 7000).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	var c net.Conn
	if err := client.Do(func() (err error) {
		c, err = net.Dial(network, ln.Addr().String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
	if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); got != client.Addr(v6) {
		t.Fatalf("client address %v, want %v", got, client.Addr(v6))
	}
}

func TestLabCloseRemovesNamespaces(t *testing.T) {
	Privileged(t, "ip")
	lab, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{lab.Gateway.Name, lab.Client().Name, lab.Server().Name}
	if err := lab.Close(); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if _, err := os.Stat("/run/netns/" + n); !os.IsNotExist(err) {
			t.Errorf("namespace %s still exists after Close (%v)", n, err)
		}
	}
}
