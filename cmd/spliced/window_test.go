package main

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/splice"
	"spliced/testnet"
)

// TestLabSplicedSmallReceiveWindow: a flow spliced from its start, its
// client sending fast to a server with a 64 KiB receive buffer. The
// server's windows are in units of a few bytes, the client's view of
// them in units of 1 KiB (the gateway's socket negotiated a larger shift
// with it), and a server short of buffer space offers windows of a few
// hundred bytes. Rounded up to a unit, such a window let the client send
// up to 1 KiB where the server had offered a few hundred, and the server
// dropped the rest as beyond its window (TcpExtBeyondWindow; a capture
// showed a window of 248 bytes answered with 280 and 744).
//
// Captured at both ends, on both datapaths: no acknowledgment the client
// got on the spliced flow reaches further (its acknowledgment plus its
// window, in the server's sequence space) than the server had offered
// by then; the bytes arrive intact both ways. (The server can still drop
// segments beyond its window: under memory pressure it takes back window
// it had offered.)
func TestLabSplicedSmallReceiveWindow(t *testing.T) {
	t.Parallel()
	for i, datapath := range []string{"nfqueue", "bpf"} {
		t.Run(datapath, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			d, srv, ln := splicedAtConnect(t, lab, datapath, 7400+i)
			port := int(srv.Port())
			// Accepted sockets inherit the listener's buffer size.
			rc, err := ln.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			rc.Control(func(fd uintptr) {
				err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 64<<10)
			})
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			pcaps := map[string]string{}
			var stops []func()
			for _, h := range []*testnet.Host{lab.Client(), lab.Server()} {
				pcaps[h.Name] = filepath.Join(dir, h.Name+".pcap")
				stop, err := h.Capture("eth0", pcaps[h.Name], fmt.Sprintf("tcp port %d", port))
				if err != nil {
					t.Fatal(err)
				}
				stop = sync.OnceFunc(stop)
				defer stop()
				stops = append(stops, stop)
			}
			before, err := lab.Server().Counters()
			if err != nil {
				t.Fatal(err)
			}
			tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 64 << 20, S2C: 16 << 20, Seed: 7})
			if err := tr.Check(); err != nil {
				t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
			}
			if waitSpliced(t, d) == 0 {
				t.Fatal("not spliced")
			}
			rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" })
			if rec["datapath"] != datapath {
				t.Fatalf("spliced on datapath %v, want %s", rec["datapath"], datapath)
			}
			after, err := lab.Server().Counters()
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond) // the captures write their last packets
			for _, stop := range stops {
				stop()
			}
			spliced, err := time.Parse(time.RFC3339Nano, rec["time"].(string))
			if err != nil {
				t.Fatal(err)
			}
			off := c2sOffset(t, d)
			w := offeredWindows(t, pcaps[lab.Client().Name], pcaps[lab.Server().Name], port, spliced, off)
			t.Logf("%d acknowledgments to the client after the splice, %d beyond the server's offer (at most %d bytes); the server dropped %d segments beyond its window; client: %s",
				w.checked, w.beyond, w.worst, after["TcpExt.BeyondWindow"]-before["TcpExt.BeyondWindow"],
				nstatCounters(lab.Client(), "TCPTimeouts", "TCPLossProbes", "RetransSegs"))
			if w.checked < 100 {
				t.Fatalf("only %d acknowledgments to the client after the splice: the captures show nothing", w.checked)
			}
			if w.beyond != 0 {
				t.Errorf("%d acknowledgments offered the client more window than the server had (up to %d bytes beyond), first at %s", w.beyond, w.worst, w.first)
			}
		})
	}
}

// splicedAtConnect starts a daemon on datapath whose service splices the
// flows to port as they connect, and a listener on the lab's server at
// that port (closed when the test ends).
func splicedAtConnect(t *testing.T, lab *testnet.Lab, datapath string, port int) (*testnet.Daemon, netip.AddrPort, *net.TCPListener) {
	t.Helper()
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: debug
kernel:
  datapath: %s
services:
  - name: at_connect
    listen: 15001
    ports: ["%d"]
    splice:
      mode: immediate
`, datapath, port))
	srv := netip.AddrPortFrom(lab.Server().IPv4, uint16(port))
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return d, srv, ln
}

// c2sOffset is what the engine adds to the client's sequence numbers
// (the server leg's snd_nxt less the client leg's rcv_nxt at the
// capture, from the daemon's debug line).
func c2sOffset(t *testing.T, d *testnet.Daemon) uint32 {
	t.Helper()
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == "captured" })
	if rec == nil {
		t.Fatal("no captured line (log level debug)")
	}
	leg := func(name, field string) uint32 {
		m, _ := rec[name].(map[string]any)
		v, ok := m[field].(float64)
		if !ok {
			t.Fatalf("captured line without %s.%s: %v", name, field, rec)
		}
		return uint32(v)
	}
	return leg("server_leg", "snd_nxt") - leg("client_leg", "rcv_nxt")
}

type offered struct {
	checked, beyond int
	worst           uint32
	first           string
}

// offeredWindows compares the right window edges the client was offered
// on the spliced flow (acknowledgments from the server's port captured
// at the client after spliced, moved into the server's sequence space by
// off) with the largest edge the server had offered by then (captured
// at the server). tshark scales the windows from the handshakes it saw.
func offeredWindows(t *testing.T, clientPcap, serverPcap string, port int, spliced time.Time, off uint32) offered {
	t.Helper()
	type edge struct {
		at   float64
		edge splice.Seq
	}
	read := func(file string) []edge {
		// The windows are scaled only if tshark saw the handshake.
		syn, err := exec.Command("tshark", "-r", file, "-Y", fmt.Sprintf("tcp.srcport == %d && tcp.flags.syn == 1", port)).Output()
		if err != nil || len(strings.TrimSpace(string(syn))) == 0 {
			t.Fatalf("%s holds no SYN-ACK from port %d (%v): the capture missed the handshake", file, port, err)
		}
		out, err := exec.Command("tshark", "-r", file, "-o", "tcp.relative_sequence_numbers:FALSE",
			"-Y", fmt.Sprintf("tcp.srcport == %d && tcp.flags.ack == 1 && tcp.flags.syn == 0 && tcp.flags.reset == 0", port),
			"-T", "fields", "-e", "frame.time_epoch", "-e", "tcp.ack", "-e", "tcp.window_size").Output()
		if err != nil {
			t.Fatalf("tshark -r %s: %v", file, err)
		}
		var edges []edge
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			f := strings.Fields(line)
			if len(f) != 3 {
				continue
			}
			at, err1 := strconv.ParseFloat(f[0], 64)
			ack, err2 := strconv.ParseUint(f[1], 10, 32)
			win, err3 := strconv.ParseUint(f[2], 10, 32)
			if err1 != nil || err2 != nil || err3 != nil {
				t.Fatalf("tshark line %q", line)
			}
			edges = append(edges, edge{at, splice.Seq(ack).Add(uint32(win))})
		}
		return edges
	}
	server, client := read(serverPcap), read(clientPcap)
	since := float64(spliced.UnixNano()) / 1e9
	var w offered
	var most splice.Seq
	seen := false
	j := 0
	for _, c := range client {
		for ; j < len(server) && server[j].at <= c.at; j++ {
			if !seen || most.LessThan(server[j].edge) {
				most, seen = server[j].edge, true
			}
		}
		if c.at < since || !seen {
			continue
		}
		w.checked++
		if e := c.edge.Add(off); most.LessThan(e) {
			if w.beyond == 0 {
				w.first = time.Unix(0, int64(c.at*1e9)).UTC().Format("15:04:05.000000")
			}
			w.beyond++
			w.worst = max(w.worst, uint32(e-most))
		}
	}
	return w
}

// TestLabSpliceDeclinedTinyWindow: one end's receive buffer is the
// smallest there is (SO_RCVBUF 1), so its largest window is smaller than
// the other end's segments. Spliced, that end's peer would send only on
// its persist timer (it keeps the segment size it has with the gateway,
// and a Linux sender does not send part of a segment while it waits for
// window): 8 MiB to a server offering at most 1,152 bytes crawled, about
// 600 KB in 2 minutes, on both datapaths. The splice gives up after the
// capture and says why; the flow stays proxied and completes intact.
func TestLabSpliceDeclinedTinyWindow(t *testing.T) {
	t.Parallel()
	for _, tiny := range []string{"server", "client"} {
		for i, datapath := range []string{"nfqueue", "bpf"} {
			t.Run(tiny+"/"+datapath, func(t *testing.T) {
				sender := "client"
				if tiny == "client" {
					sender = "server"
				}
				lab := testnet.NewT(t, testnet.Options{})
				d, srv, ln := splicedAtConnect(t, lab, datapath, 7410+i)
				// The kernel raises SO_RCVBUF 1 to its minimum. Accepted
				// sockets inherit the listener's.
				smallest := func(_, _ string, rc syscall.RawConn) error {
					var serr error
					if err := rc.Control(func(fd uintptr) {
						serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1)
					}); err != nil {
						return err
					}
					return serr
				}
				if tiny == "server" {
					rc, err := ln.SyscallConn()
					if err != nil {
						t.Fatal(err)
					}
					if err := smallest("", "", rc); err != nil {
						t.Fatal(err)
					}
				}
				var c net.Conn
				dialer := net.Dialer{Timeout: 10 * time.Second}
				if tiny == "client" {
					dialer.Control = smallest
				}
				if err := lab.Client().Do(func() (err error) {
					c, err = dialer.Dial("tcp4", srv.String())
					return err
				}); err != nil {
					t.Fatal(err)
				}
				ln.SetDeadline(time.Now().Add(10 * time.Second))
				s, err := ln.AcceptTCP()
				if err != nil {
					t.Fatal(err)
				}
				tr := testnet.Exchange(c.(*net.TCPConn), s, testnet.TransferOptions{C2S: 2 << 20, S2C: 2 << 20, Seed: 11, Timeout: time.Minute})
				if err := tr.Check(); err != nil {
					// What each end's kernel did with the tiny window:
					// drops for want of receive memory, retransmissions,
					// probes; and the gateway's sockets as they stand.
					counters := []string{"RcvQDrop", "PruneCalled", "RcvPruned", "OFODrop", "RetransSegs", "TCPTimeouts", "TCPWinProbe", "TCPZeroWindowDrop"}
					ss, _ := lab.Gateway.Run("ss", "-tinm")
					t.Fatalf("%v\nclient: %s\nserver: %s\ngateway: %s\n%s\n%s", err,
						nstatCounters(lab.Client(), counters...), nstatCounters(lab.Server(), counters...),
						nstatCounters(lab.Gateway, counters...), ss, tail(d.Log(), 20))
				}
				if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" }) != nil {
					t.Fatalf("the flow was spliced\n%s", tail(d.Log(), 20))
				}
				want := fmt.Sprintf("the %s's largest receive window", tiny)
				rec := d.FindLog(func(l map[string]any) bool {
					e, _ := l["err"].(string)
					return l["msg"] == "flow stays proxied" && strings.Contains(e, want) && strings.Contains(e, "smaller than the "+sender+"'s segments")
				})
				if rec == nil {
					t.Fatalf("no \"flow stays proxied\" line saying %q\n%s", want, tail(d.Log(), 20))
				}
				t.Logf("%s: 2 MiB each way in %v; %s", datapath, tr.Elapsed.Round(time.Millisecond), rec["err"])
			})
		}
	}
}
