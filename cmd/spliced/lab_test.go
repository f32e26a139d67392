package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// TestMain snapshots the host's own nftables ruleset, ip rules and routes
// before and after the tests: every test works in its own namespaces, and
// this proves it.
func TestMain(m *testing.M) {
	before := hostNetState()
	code := m.Run()
	testnet.RemoveBinaries()
	if after := hostNetState(); after != before {
		fmt.Fprintf(os.Stderr, "FAIL: the tests changed the host's network state\nbefore:\n%s\nafter:\n%s\n", before, after)
		code = 1
	}
	os.Exit(code)
}

func hostNetState() string {
	if os.Geteuid() != 0 {
		return ""
	}
	var b bytes.Buffer
	for _, args := range [][]string{
		{"nft", "list", "ruleset"},
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	} {
		out, _ := exec.Command(args[0], args[1:]...).CombinedOutput()
		fmt.Fprintf(&b, "$ %s\n%s", strings.Join(args, " "), out)
	}
	return b.String()
}

const forwardConfig = `
log:
  level: debug
kernel:
  table: spliced
services:
  - name: fwd
    listen: 15001
    ports: ["5001-5003"]
    destinations: [10.2.0.0/16, "fd00:2::/32"]
    upstream: %s
    access:
      rules:
        - action: deny
          ports: ["5003"]
`

// TestLabForward: a client connects to a server behind the gateway; the
// flow is intercepted (the daemon logs it with the right addresses), the
// server sees the client's address (transparent) or the gateway's (NAT),
// and 50 MB each way arrive intact.
func TestLabForward(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"transparent", "nat"} {
		for _, v6 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/v6=%v", mode, v6), func(t *testing.T) {
				lab := testnet.NewT(t, testnet.Options{})
				d := testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, mode))
				srv := netip.AddrPortFrom(lab.Server().Addr(v6), 5001)
				ln, err := lab.Server().Listen(srv)
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				const size = 50 << 20
				tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: size, S2C: size, Seed: 1})
				if err := tr.Check(); err != nil {
					t.Fatal(err)
				}
				wantPeer := lab.Client().Addr(v6)
				if mode == "nat" {
					wantPeer = lab.GatewayServerSide[0].Addr(v6)
				}
				if got := tr.Server.Peer.Addr(); got != wantPeer {
					t.Errorf("server saw %v, want %v", got, wantPeer)
				}
				if mode == "transparent" && tr.Server.Peer != tr.Client.Local {
					t.Errorf("server saw %v, want the client's own address and port %v", tr.Server.Peer, tr.Client.Local)
				}
				if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
					return l["msg"] == "flow closed" && l["client"] == tr.Client.Local.String() &&
						l["server"] == srv.String() && l["bytes_c2s"] == float64(size) && l["bytes_s2c"] == float64(size)
				}); err != nil {
					t.Fatalf("no 'flow closed' record with %d bytes each way for %v: %v\n%s", size, srv, err, d.Log())
				}
			})
		}
	}
}

// TestLabListenerNotReachableDirectly: a client that connects to a
// transparent service's TPROXY listener itself (the gateway's address and
// the listen port) is refused. Its destination was the listener, so the
// proxy connected to itself, again and again: one such connection to a
// NAT service made 5,000 flows in a minute (and in transparent mode one
// flow that hung). The daemon resets it, logs why (rate-limited), and
// keeps no flow. And a flow through the gateway to another host on the
// listen port is routed, not taken by the service.
func TestLabListenerNotReachableDirectly(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"nat", "transparent"} {
		for _, v6 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/v6=%v", mode, v6), func(t *testing.T) {
				lab := testnet.NewT(t, testnet.Options{})
				d := testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, mode))
				dst := netip.AddrPortFrom(lab.GatewayClientSide[0].Addr(v6), 15001)
				// The reset may come before the dial returns, or before
				// the write: the first call after it reports it (the
				// socket's error is consumed; a read after a failed
				// write sees only EOF).
				c, err := lab.Client().Dial(dst, 5*time.Second)
				if err == nil {
					defer c.Close()
					if _, err = c.Write([]byte("hello")); err == nil {
						c.SetReadDeadline(time.Now().Add(10 * time.Second))
						_, err = c.Read(make([]byte, 16))
					}
				}
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("connect, write and read: %v; want a reset", err)
				}
				if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
					client, _ := netip.ParseAddrPort(fmt.Sprint(l["client"]))
					return l["msg"] == "connection to the listen port refused" && client.Addr() == lab.Client().Addr(v6)
				}); err != nil {
					t.Errorf("no refusal logged: %v\n%s", err, tail(d.Log(), 10))
				}
				flows, err := d.Client().Flows(t.Context(), api.FlowFilter{})
				if err != nil || len(flows) != 0 {
					t.Errorf("flows: %d, %v; want none", len(flows), err)
				}
				if l := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow opened" }); l != nil {
					t.Errorf("a flow was opened: %v", l)
				}
				// Intercepted flows work as before.
				srv := netip.AddrPortFrom(lab.Server().Addr(v6), 5001)
				ln, err := lab.Server().Listen(srv)
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				if err := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 1 << 20, S2C: 1 << 20, Seed: 3}).Check(); err != nil {
					t.Error(err)
				}
				// A flow to another host's port 15001, which no service
				// intercepts, is routed: the listener's socket used to
				// claim it (the prerouting rule's socket lookup finds
				// a wildcard listener for any address on its port), and
				// the service took it.
				other := netip.AddrPortFrom(lab.Server().Addr(v6), 15001)
				oln, err := lab.Server().Listen(other)
				if err != nil {
					t.Fatal(err)
				}
				defer oln.Close()
				tr := testnet.RunTransfer(lab.Client(), oln, other, testnet.TransferOptions{C2S: 1 << 20, S2C: 1 << 20, Seed: 4})
				if err := tr.Check(); err != nil {
					t.Errorf("a flow to %v (not intercepted): %v", other, err)
				} else if tr.Server.Peer != tr.Client.Local {
					t.Errorf("the server at %v saw %v, want the client's own %v (routed, not proxied)", other, tr.Server.Peer, tr.Client.Local)
				}
				if l := d.FindLog(func(l map[string]any) bool { return l["server"] == other.String() }); l != nil {
					t.Errorf("the daemon handled the flow to %v: %v", other, l)
				}
			})
		}
	}
}

// TestLabNotSelected: a flow the configuration does not select is routed
// untouched: it works, and no proxy sees it.
func TestLabNotSelected(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "transparent"))
	srv := netip.AddrPortFrom(lab.Server().IPv4, 6001) // port not intercepted
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 1 << 20, S2C: 1 << 20, Seed: 2})
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	if tr.Server.Peer != tr.Client.Local {
		t.Errorf("server saw %v, client is %v", tr.Server.Peer, tr.Client.Local)
	}
	if l := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow opened" }); l != nil {
		t.Fatalf("an unselected flow was intercepted: %v", l)
	}
}

// TestLabAccessPolicy: a denied destination is refused with a reset and
// logged; an allowed one on the same service works.
func TestLabAccessPolicy(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "transparent"))
	denied := netip.AddrPortFrom(lab.Server().IPv4, 5003)
	ln, err := lab.Server().Listen(denied)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- struct{}{}
			c.Close()
		}
	}()
	c, err := lab.Client().Dial(denied, 5*time.Second)
	if err == nil {
		// The TPROXY listener completes the handshake; the proxy then
		// resets the connection.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadAll(c)
		c.Close()
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("denied flow: read gave %v, want connection reset", err)
		}
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow denied by access policy" && l["server"] == denied.String()
	}); err != nil {
		t.Fatalf("denial not logged: %v", err)
	}
	select {
	case <-accepted:
		t.Fatal("the server got a connection for a denied flow")
	default:
	}

	allowed := netip.AddrPortFrom(lab.Server().IPv4, 5002)
	ln2, err := lab.Server().Listen(allowed)
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	tr := testnet.RunTransfer(lab.Client(), ln2, allowed, testnet.TransferOptions{C2S: 1 << 20, S2C: 1 << 20, Seed: 3})
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestLabShutdownAndCleanup: SIGTERM removes everything; after kill -9 the
// state stays, and `spliced -cleanup` removes exactly it.
func TestLabShutdownAndCleanup(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	gw := lab.Gateway
	state := func() (table bool, rules, routes string) {
		_, err := gw.Run("nft", "list", "table", "inet", "spliced")
		r4, _ := gw.Run("ip", "rule")
		r6, _ := gw.Run("ip", "-6", "rule")
		t4, _ := gw.Run("ip", "route", "show", "table", "100")
		t6, _ := gw.Run("ip", "-6", "route", "show", "table", "100")
		return err == nil, r4 + r6, t4 + t6
	}
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "transparent"))
	if table, rules, routes := state(); !table || strings.Count(rules, "proto 92") != 2 || strings.Count(routes, "proto 92") != 2 {
		t.Fatalf("after start: table=%v\n%s\n%s", table, rules, routes)
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.Log())
	}
	if table, rules, routes := state(); table || strings.Contains(rules, "proto 92") || routes != "" {
		t.Fatalf("after SIGTERM: table=%v\n%s\n%s", table, rules, routes)
	}

	d = testnet.StartDaemon(t, lab, fmt.Sprintf(forwardConfig, "transparent"))
	d.Kill()
	if table, rules, _ := state(); !table || !strings.Contains(rules, "proto 92") {
		t.Fatalf("kill -9 should leave the state behind for -cleanup: table=%v\n%s", table, rules)
	}
	out, err := d.Run("-cleanup", "-config", d.Config)
	if err != nil {
		t.Fatalf("spliced -cleanup: %v\n%s", err, out)
	}
	if table, rules, routes := state(); table || strings.Contains(rules, "proto 92") || routes != "" {
		t.Fatalf("after -cleanup: table=%v\n%s\n%s", table, rules, routes)
	}
	if out, err := d.Run("-cleanup", "-config", d.Config); err != nil {
		t.Fatalf("second -cleanup must succeed on a clean gateway: %v\n%s", err, out)
	}
}

// TestBadConfigs: each malformed file exits non-zero with a message naming
// the file, the line, the key, the value and the fix; nothing is installed.
func TestBadConfigs(t *testing.T) {
	cases := []struct {
		name, config string
		want         []string
	}{
		{"unknown key", "services:\n  - name: web\n    listen: 15001\n    prots: [\"80\"]\n",
			[]string{"line 4: services[0].prots:", "is not a known key", `did you mean "ports"`}},
		{"bad port", "services:\n  - name: web\n    listen: 15001\n    ports: [\"80\", \"99999\"]\n",
			[]string{"line 4: services[0].ports[1]:", `"99999"`, "use 1-65535"}},
		{"overlapping services", "services:\n  - name: a\n    listen: 15001\n    ports: [\"80\"]\n  - name: b\n    listen: 15002\n    ports: [\"1-1024\"]\n",
			[]string{"line 7: services[1].ports:", `overlaps service "a"`, "tcp port 80", "narrow"}},
	}
	lab := testnet.NewT(t, testnet.Options{})
	bin := testnet.Binary(t, "spliced")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "bad.yaml")
			os.WriteFile(file, []byte(c.config), 0o600)
			out, err := lab.Gateway.Command(t.Context(), bin, "-config", file).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("exit: %v, want non-zero\n%s", err, out)
			}
			for _, w := range append(c.want, "config "+file+":", "nothing was installed") {
				if !bytes.Contains(out, []byte(w)) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			if tables, _ := lab.Gateway.Run("nft", "list", "tables"); tables != "" {
				t.Errorf("something was installed: %s", tables)
			}
			if out, err := lab.Gateway.Command(t.Context(), bin, "-check", "-config", file).CombinedOutput(); err == nil {
				t.Errorf("-check accepted the bad file:\n%s", out)
			}
		})
	}
}
