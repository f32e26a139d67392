package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabSYNFlood: a third host floods the server's address with SYNs
// from random sources (hping3 --flood --rand-source) while a client makes
// 200 connections, each moving 4 KiB each way (SHA-256 checked): once at
// an intercepted port, where the SYNs reach spliced's TPROXY listener,
// and once at a routed port, where they reach the server's own listener.
// At least 99% of the connections succeed (SYN cookies: the gateway
// leaves net.ipv4.tcp_syncookies at its default, 1; at the intercepted
// port the ACK of a cookie handshake reaches the TPROXY listener through
// the conntrack mark the SYN rule sets, see rules.Spec.CtMark), and the
// daemon's memory stays bounded: the half-open connections are the
// kernel's, not spliced's. The listener's backlog is the configured one.
// The SYN-ACKs to the random sources end at the attacker's host, the
// gateway's default route (nothing leaves the lab).
func TestLabSYNFlood(t *testing.T) {
	// Not in parallel: the flood takes a CPU and the per-CPU receive
	// backlogs, which every namespace shares, from the test beside it.
	testnet.Privileged(t, "hping3", "ss")
	lab := testnet.NewT(t, testnet.Options{Clients: 2})
	attacker := lab.Clients[1]
	d := testnet.StartDaemon(t, lab, `
log:
  level: info
services:
  - name: fwd
    listen: 15001
    backlog: 1024
    ports: ["5001"]
`)
	if v, err := lab.Gateway.ReadSysctl("net.ipv4.tcp_syncookies"); err != nil || v != "1" {
		t.Fatalf("net.ipv4.tcp_syncookies in the gateway is %q (%v), want the default 1", v, err)
	}
	// The configured backlog is the listeners' (ss shows it as Send-Q).
	out, err := lab.Gateway.Run("ss", "-ltnH")
	if err != nil {
		t.Fatal(err)
	}
	listeners := 0
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 4 && strings.HasSuffix(f[3], ":15001") {
			listeners++
			if f[2] != "1024" {
				t.Errorf("listener backlog is not 1024: %q", line)
			}
		}
	}
	if listeners != 2 {
		t.Errorf("%d listeners on port 15001, want 2:\n%s", listeners, out)
	}
	// A route for the random sources, as a gateway has (its default route
	// upstream): without one the kernel cannot answer a SYN and drops it
	// before it holds any state (ListenDrops), and the flood tests
	// nothing. The answers reach the attacker's host, which drops them.
	if _, err := lab.Gateway.Run("ip", "route", "add", "default", "via", attacker.IPv4.String()); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name string
		port uint16
	}{{"intercepted", 5001}, {"routed", 5002}} {
		t.Run(c.name, func(t *testing.T) {
			dst := netip.AddrPortFrom(lab.Server().IPv4, c.port)
			ln, err := lab.Server().Listen(dst)
			if err != nil {
				t.Fatal(err)
			}
			mux := testnet.NewMux(ln)
			defer mux.Close()
			gwNS := []*testnet.NS{&lab.Gateway.NS}
			srvNS := []*testnet.NS{&lab.Server().NS}
			cookiesBefore, _ := tcpExt(append(gwNS, srvNS...), "SyncookiesSent")
			rssBefore := rss(t, d.Pid())
			serverRsts := outRsts(t, &lab.Server().NS)

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			flood := attacker.Command(ctx, "hping3", "--flood", "--rand-source", "-S", "-p", fmt.Sprint(c.port), dst.Addr().String())
			var floodOut strings.Builder
			flood.Stdout, flood.Stderr = &floodOut, &floodOut
			if err := flood.Start(); err != nil {
				t.Fatal(err)
			}
			floodStart := time.Now()
			stopFlood := func() {
				if flood.Process != nil {
					flood.Process.Signal(syscall.SIGINT)
					flood.Wait()
					flood.Process = nil
				}
			}
			defer stopFlood()
			// Wait until the flood fills a SYN queue: cookies are sent.
			testnet.Eventually(t, 10*time.Second, func() error {
				n, err := tcpExt(append(gwNS, srvNS...), "SyncookiesSent")
				if err != nil {
					return err
				}
				if n == cookiesBefore {
					return fmt.Errorf("no SYN cookie sent yet")
				}
				return nil
			})
			synRecv := halfOpen(t, lab)

			const conns = 200
			var ok, failed atomic.Int64
			var mu sync.Mutex
			var failures []string
			jobs := make(chan int)
			var wg sync.WaitGroup
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range jobs {
						tr := mux.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: 4 << 10, S2C: 4 << 10, Seed: uint64(i), Timeout: 30 * time.Second})
						if err := tr.Check(); err != nil {
							failed.Add(1)
							mu.Lock()
							failures = append(failures, fmt.Sprintf("connection %d: %v", i, err))
							mu.Unlock()
							continue
						}
						ok.Add(1)
					}
				}()
			}
			legitStart := time.Now()
			for i := range conns {
				jobs <- i
			}
			close(jobs)
			wg.Wait()
			legit := time.Since(legitStart)
			// The flood goes on for 5 s in all (some 300,000 SYNs):
			// long enough for the daemon to show what it costs.
			time.Sleep(time.Until(floodStart.Add(5 * time.Second)))
			rssDuring := rss(t, d.Pid())
			stopFlood()
			flooded := time.Since(floodStart)
			sent := floodPackets(floodOut.String())
			cookies, _ := tcpExt(append(gwNS, srvNS...), "SyncookiesSent")
			t.Logf("%s port %d: %d of %d connections intact in %v under a flood of %d SYNs in %v (%d SYN cookies sent, %d half-open at the listener); daemon RSS %d KiB before, %d KiB during",
				c.name, c.port, ok.Load(), conns, legit.Round(time.Millisecond), sent, flooded.Round(time.Millisecond), cookies-cookiesBefore, synRecv, rssBefore>>10, rssDuring>>10)
			if ok.Load()*100 < conns*99 {
				t.Errorf("only %d of %d connections succeeded:\n%s", ok.Load(), conns, strings.Join(failures, "\n"))
			}
			if sent < 10000 {
				t.Errorf("the flood sent only %d SYNs: the test proves nothing\n%s", sent, floodOut.String())
			}
			if rssDuring > rssBefore+32<<20 {
				t.Errorf("the daemon's RSS grew from %d to %d KiB under the flood", rssBefore>>10, rssDuring>>10)
			}
			if c.name == "intercepted" {
				// An ACK of a cookie handshake that missed the listener
				// would be routed on to the server, which resets it.
				if n := outRsts(t, &lab.Server().NS) - serverRsts; n != 0 {
					t.Errorf("the server sent %d RSTs: ACKs of cookie handshakes reached it", n)
				}
				st, err := d.Client().Status(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if n := st.Flows["proxied"] + st.Flows["closing"]; n > 8 {
					t.Errorf("%d flows open after the legitimate ones ended", n)
				}
			}
		})
	}
}

// rss returns the resident set size of a process in bytes.
func rss(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmRSS in /proc/%d/status", pid)
	}
	n, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return n << 10
}

// halfOpen counts connections in SYN-RECV at the gateway and the server
// (the flood's, intercepted or routed).
func halfOpen(t *testing.T, lab *testnet.Lab) int {
	t.Helper()
	n := 0
	for _, ns := range []*testnet.NS{&lab.Gateway.NS, &lab.Server().NS} {
		out, err := ns.Run("ss", "-tanH", "state", "syn-recv")
		if err != nil {
			t.Fatal(err)
		}
		n += strings.Count(out, "\n") + 1
		if strings.TrimSpace(out) == "" {
			n--
		}
	}
	return n
}

var hpingSent = regexp.MustCompile(`(\d+) packets transmitted`)

// floodPackets reads the number of packets hping3 sent from its summary.
func floodPackets(out string) int {
	m := hpingSent.FindStringSubmatch(out)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// outRsts reads Tcp OutRsts (resets sent) of a namespace.
func outRsts(t *testing.T, ns *testnet.NS) uint64 {
	t.Helper()
	c, err := ns.Counters()
	if err != nil {
		t.Fatal(err)
	}
	v, ok := c["Tcp.OutRsts"]
	if !ok {
		t.Fatalf("no Tcp OutRsts in %s's /proc/net/snmp", ns.Name)
	}
	return v
}
