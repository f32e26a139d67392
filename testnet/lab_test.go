package testnet

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
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

// labNamespaces lists the namespaces that labs of this test process own.
func labNamespaces(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), fmt.Sprintf("%s%d-", Prefix, os.Getpid())) {
			names = append(names, e.Name())
		}
	}
	return names
}

// newNoPanic is New that turns a panic into a test failure naming it.
func newNoPanic(t *testing.T, opt Options) (lab *Lab, err error) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("New panicked instead of returning its error: %v", p)
		}
	}()
	return New(opt)
}

// Every error path of New returns the error and removes what it built.
// A sysctl that does not exist fails after all three namespaces exist.
func TestLabNewErrorRemovesNamespaces(t *testing.T) {
	Privileged(t, "ip")
	before := labNamespaces(t)
	for _, tc := range []struct {
		name string
		opt  Options
	}{
		{"gateway sysctl", Options{GatewaySysctls: map[string]string{"net.ipv4.no_such_sysctl": "1"}}},
		{"second server sysctl", Options{Servers: 2, ServerSysctls: map[string]string{"net.ipv4.no_such_sysctl": "1"}}},
		{"client mtu", Options{ClientMTU: 1 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lab, err := newNoPanic(t, tc.opt)
			if err == nil {
				lab.Close()
				t.Fatal("New succeeded")
			}
			if lab != nil {
				t.Errorf("New returned a lab with its error")
			}
			t.Logf("error: %v", err)
			if !strings.HasPrefix(err.Error(), "testnet: build lab "+Prefix) {
				t.Errorf("error %q does not say which lab failed", err)
			}
			if strings.Contains(tc.name, "sysctl") && !strings.Contains(err.Error(), "net.ipv4.no_such_sysctl") {
				t.Errorf("error %q does not name the sysctl", err)
			}
			if got := labNamespaces(t); !slices.Equal(got, before) {
				t.Errorf("namespaces left behind: %v (before New: %v)", got, before)
			}
		})
	}
}

// Without ip in PATH, New says what is missing and where it comes from
// before it creates anything (no root needed to see that).
func TestLabNewWithoutIP(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	lab, err := newNoPanic(t, Options{})
	if err == nil {
		lab.Close()
		t.Fatal("New succeeded without ip in PATH")
	}
	for _, want := range []string{"ip (Debian package iproute2)", "apt-get install iproute2"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestLabDropReport: a refused connect shows in the report of the
// client's namespace (Tcp.AttemptFails), and only there.
func TestLabDropReport(t *testing.T) {
	lab := NewT(t, Options{})
	// Nothing listens on the server's port 7001: the server answers with
	// a reset and the client counts a failed attempt.
	if c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, 7001), 5*time.Second); err == nil {
		c.Close()
		t.Fatal("dial of a port nothing listens on succeeded")
	}
	report := lab.DropReport()
	for _, line := range strings.Split(report, "\n") {
		name, counters, _ := strings.Cut(line, ": ")
		switch name {
		case lab.Client().Name:
			if !strings.Contains(counters, "Tcp.AttemptFails=1") {
				t.Errorf("client line %q: want Tcp.AttemptFails=1", line)
			}
		case lab.Gateway.Name:
			if strings.Contains(counters, "AttemptFails") {
				t.Errorf("gateway line %q: the failed attempt was the client's", line)
			}
		}
	}
	if !strings.Contains(report, lab.Client().Name+": ") || !strings.Contains(report, "softnet cpu0 since the lab was built: dropped=") {
		t.Errorf("report without the client's namespace or the softnet line:\n%s", report)
	}
}
