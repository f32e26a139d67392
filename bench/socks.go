package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"spliced/testnet"
)

// The SOCKS5 part: a SOCKS server on the gateway's own address, clients
// in the client namespace that CONNECT through it to an echo server or a
// sink in the server namespace. Every server is driven by the same Go
// client (socksConnect), with no authentication: Dante's username method
// checks system accounts and spliced's a bcrypt users file, which would
// compare password hashing rather than the servers.
const (
	portSOCKS = 1080
	portSink  = 7001
	// setupLoops is the number of concurrent connect loops of the setup
	// rate.
	setupLoops = 8
)

// SOCKSMetrics are the measures of every SOCKS5 server, in table order.
var SOCKSMetrics = []Metric{
	{Key: "setup_8c", Title: "setup + 1-byte exchange, 8 loops", Unit: "conn/s"},
	{Key: "rr_1b_1c", Title: "1-byte RR, 1 conn", Unit: "tx/s"},
	{Key: "rr_1b_8c", Title: "1-byte RR, 8 conns", Unit: "tx/s"},
	{Key: "bulk_c2s", Title: "bulk client→server", Unit: "Gbit/s"},
	{Key: "cpu_us_per_conn", Title: "gateway CPU per connection", Unit: "µs", Lower: true},
	{Key: "cpu_s_per_gb", Title: "gateway CPU per GB", Unit: "s", Lower: true},
}

// BaselineSOCKS is the SOCKS5 server the others are compared with.
const BaselineSOCKS = "dante"

// socksServer is one SOCKS5 server under test, started on the gateway of
// a fresh lab, listening on listen.
type socksServer struct {
	name, desc string
	setup      func(env *Env, lab *testnet.Lab, listen netip.AddrPort) (pids func() []int, teardown func(), err error)
}

// SOCKSServers are the SOCKS5 configurations, in report order; -only
// selects them by name, or all of them with "socks".
var SOCKSServers = []socksServer{
	{name: BaselineSOCKS, desc: "Dante (danted), no authentication", setup: danteGateway},
	{name: "spliced-socks5-copy", desc: "spliced's SOCKS5 proxy, relaying every byte (splice mode never)", setup: splicedSOCKS("never")},
	{name: "spliced-socks5-splice", desc: "spliced's SOCKS5 proxy, spliced after the reply (splice mode immediate)", setup: splicedSOCKS("immediate")},
}

// churnLabOptions: the SOCKS5 setup rate and HTTP with one request per
// connection open and close thousands of connections a second; the
// client and the gateway (which closes first towards the server when it
// relays) may reuse ports in TIME_WAIT, from a wide range, for every
// configuration alike.
var churnLabOptions = testnet.Options{
	ClientSysctls:  map[string]string{"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"},
	GatewaySysctls: map[string]string{"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"},
}

// measureSOCKS runs every SOCKS5 measure Repetitions times in one lab.
func measureSOCKS(env *Env, s socksServer, opt *Options) ConfigResult {
	res := ConfigResult{Name: s.name, Description: s.desc, Metrics: map[string]Stat{}, Errors: map[string]string{}}
	lab, err := testnet.New(churnLabOptions)
	if err != nil {
		res.Failed = "build the lab: " + err.Error()
		return res
	}
	defer lab.Close()
	listen := netip.AddrPortFrom(lab.GatewayClientSide[0].IPv4, portSOCKS)
	pids, teardown, err := s.setup(env, lab, listen)
	if err != nil {
		res.Failed = err.Error()
		return res
	}
	defer teardown()
	server := lab.Server()
	echo, err := startEcho(server, portRR, 1)
	if err != nil {
		res.Failed = "echo server: " + err.Error()
		return res
	}
	defer echo.Close()
	sink, err := startSink(server, portSink)
	if err != nil {
		res.Failed = "sink: " + err.Error()
		return res
	}
	defer sink.Close()
	echoDst := netip.AddrPortFrom(server.IPv4, portRR)
	sinkDst := netip.AddrPortFrom(server.IPv4, portSink)

	meter := cpuMeter{pids: pids}
	samples := map[string][]float64{}
	add := func(key string, v float64, err error) {
		if err != nil {
			res.Errors[key] = err.Error()
			fmt.Fprintf(opt.Log, "   %s: failed: %v\n", key, err)
			return
		}
		samples[key] = append(samples[key], v)
	}
	for rep := 1; rep <= opt.Repetitions; rep++ {
		before := meter.read()
		n, rate, err := socksSetupRate(lab.Client(), listen, echoDst, setupLoops, opt.Measure)
		cpu := meter.read().sub(before)
		add("setup_8c", rate, err)
		if err == nil && n > 0 {
			add("cpu_us_per_conn", float64(cpu.Microseconds())/float64(n), nil)
		}
		for _, rr := range []struct {
			key   string
			conns int
		}{{"rr_1b_1c", 1}, {"rr_1b_8c", 8}} {
			rate, err := socksRR(lab.Client(), listen, echoDst, rr.conns, opt.Measure)
			add(rr.key, rate, err)
		}
		before = meter.read()
		gbps, err := socksBulk(lab.Client(), listen, sinkDst, sink, opt.Measure)
		cpu = meter.read().sub(before)
		add("bulk_c2s", gbps, err)
		if err == nil && gbps > 0 {
			add("cpu_s_per_gb", cpu.Seconds()/(gbps*opt.Measure.Seconds()/8), nil)
		}
		fmt.Fprintf(opt.Log, "   repetition %d: %s\n", rep, summary(SOCKSMetrics, samples))
	}
	res.finish(samples)
	return res
}

// socksConnect does a SOCKS5 CONNECT to dst on c, a fresh connection to
// the SOCKS server (RFC 1928): the greeting offering no authentication,
// the request, and the reply, whose bound address it returns (the zero
// AddrPort for a domain name). An error names the reply code.
func socksConnect(c io.ReadWriter, dst netip.AddrPort) (netip.AddrPort, error) {
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		return netip.AddrPort{}, err
	}
	var b [262]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5 method reply: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return netip.AddrPort{}, fmt.Errorf("socks5 method reply %x: no authentication refused", b[:2])
	}
	req := []byte{5, 1, 0, 1}
	if dst.Addr().Is6() {
		req[3] = 4
	}
	req = append(req, dst.Addr().AsSlice()...)
	req = binary.BigEndian.AppendUint16(req, dst.Port())
	if _, err := c.Write(req); err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := io.ReadFull(c, b[:4]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5 reply: %w", err)
	}
	if b[0] != 5 {
		return netip.AddrPort{}, fmt.Errorf("socks5 reply version %d", b[0])
	}
	if b[1] != 0 {
		return netip.AddrPort{}, fmt.Errorf("socks5 reply 0x%02x (%s)", b[1], socksReplyText(b[1]))
	}
	var n int
	switch b[3] {
	case 1:
		n = 4
	case 4:
		n = 16
	case 3:
		if _, err := io.ReadFull(c, b[:1]); err != nil {
			return netip.AddrPort{}, fmt.Errorf("socks5 reply: %w", err)
		}
		n = int(b[0])
	default:
		return netip.AddrPort{}, fmt.Errorf("socks5 reply address type %d", b[3])
	}
	atyp := b[3]
	if _, err := io.ReadFull(c, b[:n+2]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5 reply address: %w", err)
	}
	port := binary.BigEndian.Uint16(b[n:])
	if atyp == 3 {
		return netip.AddrPort{}, nil
	}
	addr, _ := netip.AddrFromSlice(b[:n])
	return netip.AddrPortFrom(addr, port), nil
}

func socksReplyText(code byte) string {
	texts := []string{"succeeded", "general failure", "not allowed by ruleset", "network unreachable", "host unreachable",
		"connection refused", "TTL expired", "command not supported", "address type not supported"}
	if int(code) < len(texts) {
		return texts[code]
	}
	return "unassigned"
}

// socksDial connects from the client's namespace to the SOCKS server
// proxy and through it to dst.
func socksDial(client *testnet.Host, proxy, dst netip.AddrPort) (*net.TCPConn, error) {
	c, err := client.Dial(proxy, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial the socks server: %w", err)
	}
	c.SetNoDelay(true)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := socksConnect(c, dst); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// socksSetupRate runs loops concurrent loops for d, each connecting to
// the SOCKS server, doing CONNECT to dst (an echo server of 1-byte
// messages), exchanging one byte and closing, and returns the sessions
// done and their rate per second. Each loop runs on a thread inside the
// client's namespace, so that its sockets are created there without a
// namespace switch per connection.
func socksSetupRate(client *testnet.Host, proxy, dst netip.AddrPort, loops int, d time.Duration) (int64, float64, error) {
	var count atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	start := time.Now()
	for range loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := client.Do(func() error {
				b := make([]byte, 1)
				for time.Now().Before(deadline) {
					if err := socksSession(proxy, dst, b); err != nil {
						return fmt.Errorf("after %d sessions: %w", count.Load(), err)
					}
					count.Add(1)
				}
				return nil
			})
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, 0, err
	}
	n := count.Load()
	return n, float64(n) / elapsed.Seconds(), nil
}

// socksSession is one session of the setup rate; it runs in the client's
// namespace.
func socksSession(proxy, dst netip.AddrPort, b []byte) error {
	c, err := net.DialTimeout("tcp4", proxy.String(), 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := socksConnect(c, dst); err != nil {
		return err
	}
	return exchange(c.(*net.TCPConn), b)
}

// socksRR runs 1-byte request/response on conns connections established
// through the SOCKS server.
func socksRR(client *testnet.Host, proxy, dst netip.AddrPort, conns int, d time.Duration) (float64, error) {
	cs := make([]*net.TCPConn, conns)
	for i := range cs {
		c, err := socksDial(client, proxy, dst)
		if err != nil {
			return 0, err
		}
		cs[i] = c
		defer c.Close()
	}
	return rrLoop(cs, 1, d)
}

// sinkServer reads every connection to its end and reports how many
// bytes it got and when the end came.
type sinkServer struct {
	ln   *net.TCPListener
	done chan sinkResult
	wg   sync.WaitGroup
}

type sinkResult struct {
	bytes int64
	end   time.Time
	err   error
}

func startSink(server *testnet.Host, port uint16) (*sinkServer, error) {
	ln, err := server.Listen(netip.AddrPortFrom(server.IPv4, port))
	if err != nil {
		return nil, err
	}
	s := &sinkServer{ln: ln, done: make(chan sinkResult, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				// A plain read loop: io.Copy to io.Discard would read in
				// 8 KiB pieces.
				var n int64
				var err error
				buf := make([]byte, 256<<10)
				for {
					k, rerr := c.Read(buf)
					n += int64(k)
					if rerr != nil {
						if rerr != io.EOF {
							err = rerr
						}
						break
					}
				}
				select {
				case s.done <- sinkResult{n, time.Now(), err}:
				default:
				}
			}()
		}
	}()
	return s, nil
}

func (s *sinkServer) Close() {
	s.ln.Close()
	s.wg.Wait()
}

// socksBulk sends from the client through the SOCKS server to the sink
// for d on one connection and returns Gbit/s: the bytes the sink got over
// the time from the first write to the end the sink saw.
func socksBulk(client *testnet.Host, proxy, dst netip.AddrPort, sink *sinkServer, d time.Duration) (float64, error) {
	for len(sink.done) > 0 { // a result of an earlier connection that failed
		<-sink.done
	}
	c, err := socksDial(client, proxy, dst)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	// Let a configuration that splices after the reply do it before the
	// clock starts, as the request/response measures do.
	time.Sleep(50 * time.Millisecond)
	buf := make([]byte, 128<<10)
	start := time.Now()
	deadline := start.Add(d)
	c.SetWriteDeadline(deadline.Add(10 * time.Second))
	for time.Now().Before(deadline) {
		if _, err := c.Write(buf); err != nil {
			return 0, fmt.Errorf("bulk write: %w", err)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	select {
	case r := <-sink.done:
		if r.err != nil {
			return 0, fmt.Errorf("sink: %w", r.err)
		}
		return float64(r.bytes) * 8 / r.end.Sub(start).Seconds() / 1e9, nil
	case <-time.After(15 * time.Second):
		return 0, errors.New("the sink saw no end of the transfer within 15 s")
	}
}

// splicedSOCKSConfig is the daemon configuration of the spliced SOCKS5
// rows: no authentication for the client's prefix.
func splicedSOCKSConfig(listen netip.AddrPort, clients netip.Prefix, mode string) string {
	return fmt.Sprintf(`
log:
  level: warn
limits:
  max_flows: 30000
services:
  - name: socks
    proxy: socks5
    listen_on: ["%s"]
    splice:
      mode: %s
    socks5:
      auth:
        - sources: [%s]
          method: none
`, listen, mode, clients)
}

// clientPrefix is the lab's client-side prefix (the client's /24).
func clientPrefix(lab *testnet.Lab) netip.Prefix {
	return netip.PrefixFrom(lab.Client().IPv4, 24).Masked()
}

func splicedSOCKS(mode string) func(*Env, *testnet.Lab, netip.AddrPort) (func() []int, func(), error) {
	return func(env *Env, lab *testnet.Lab, listen netip.AddrPort) (func() []int, func(), error) {
		return launchSpliced(env, lab, splicedSOCKSConfig(listen, clientPrefix(lab), mode))
	}
}

// danteConfig is danted's configuration: listening on listen, connecting
// from external (the gateway's address towards the server), no
// authentication for clients from the client prefix, CONNECT allowed
// anywhere, nothing logged per connection.
func danteConfig(listen netip.AddrPort, external netip.Addr, clients netip.Prefix, logFile string) string {
	return fmt.Sprintf(`logoutput: %s
internal: %s port = %d
external: %s
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
    from: %s to: 0.0.0.0/0
}
socks pass {
    from: %s to: 0.0.0.0/0
    command: connect
}
`, logFile, listen.Addr(), listen.Port(), external, clients, clients)
}

// danteGateway runs danted in the gateway namespace, in the foreground in
// its own process group, which the teardown ends.
func danteGateway(env *Env, lab *testnet.Lab, listen netip.AddrPort) (func() []int, func(), error) {
	bin, err := exec.LookPath("danted")
	if err != nil {
		return nil, nil, fmt.Errorf("danted is not installed (apt-get install dante-server)")
	}
	dir := filepath.Join(env.Dir, "dante")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	logFile := filepath.Join(dir, "danted.log")
	file := filepath.Join(dir, "danted.conf")
	if err := os.WriteFile(file, []byte(danteConfig(listen, lab.GatewayServerSide[0].IPv4, clientPrefix(lab), logFile)), 0o644); err != nil {
		return nil, nil, err
	}
	pids, teardown, err := startServer(lab, listen.Port(), bin, "-f", file)
	if err != nil {
		log, _ := os.ReadFile(logFile)
		return nil, nil, fmt.Errorf("danted: %w %s", err, tailStr(string(log), 300))
	}
	return pids, teardown, nil
}

// startServer runs a server (bin and its arguments) in the gateway
// namespace, in the foreground in its own process group, and waits until
// it listens on port. pids are the server's process and its descendants
// (servers that fork workers: Dante, nginx); teardown ends the group.
func startServer(lab *testnet.Lab, port uint16, bin string, args ...string) (pids func() []int, teardown func(), err error) {
	// ip netns exec runs the server in its own process (exec, no fork).
	cmd := lab.Gateway.Command(context.Background(), bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	pid := cmd.Process.Pid
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	teardown = func() {
		syscall.Kill(-pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(3 * time.Second):
			syscall.Kill(-pid, syscall.SIGKILL)
			<-exited
		}
		// Children still alive (they end when their parent does) are
		// in the same group.
		syscall.Kill(-pid, syscall.SIGKILL)
	}
	if err := lab.Gateway.WaitListening(port, 10*time.Second); err != nil {
		teardown()
		return nil, nil, fmt.Errorf("%w: %s", err, tailStr(stderr.String(), 300))
	}
	return func() []int { return append([]int{pid}, descendants(pid)...) }, teardown, nil
}

// descendants returns the processes below pid (Dante forks its workers).
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if ppid, ok := parentPid(string(b)); ok {
			children[ppid] = append(children[ppid], p)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// parentPid reads the parent's pid out of a /proc/PID/stat line (the
// command name in parentheses may hold spaces and parentheses).
func parentPid(stat string) (int, bool) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 2 {
		return 0, false
	}
	p, err := strconv.Atoi(f[1])
	return p, err == nil
}
