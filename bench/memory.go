package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

const portMemory = 7200

func memoryConfig(mode, datapath string) string {
	return fmt.Sprintf(`
log:
  level: info
kernel:
  datapath: %s
limits:
  max_flows: 30000
services:
  - name: mem
    listen: 15001
    ports: ["%d"]
    splice:
      mode: %s
`, datapath, portMemory, mode)
}

// measureMemory establishes opt.Flows idle flows through a fresh daemon,
// proxied and then (another fresh daemon) spliced, and reads what the
// gateway holds: the daemon's resident memory and the kernel's TCP socket
// memory and socket count.
func measureMemory(env *Env, opt *Options) *Memory {
	flows, note := flowBudget(opt.Flows)
	res := &Memory{Flows: flows, Note: note}
	if note != "" {
		fmt.Fprintf(opt.Log, "   %s\n", note)
	}
	res.SplicedBPF = &MemSample{}
	for _, v := range []struct {
		mode, datapath string
		into           *MemSample
	}{{"never", "nfqueue", &res.Proxied}, {"immediate", "nfqueue", &res.Spliced}, {"immediate", "bpf", res.SplicedBPF}} {
		if err := memorySample(env, opt, flows, v.mode, v.datapath, v.into); err != nil {
			res.Error = fmt.Sprintf("%s flows (%s): %v", v.mode, v.datapath, err)
			return res
		}
		fmt.Fprintf(opt.Log, "   %s (%s): daemon RSS %s -> %s, socket memory %s, %d sockets\n", v.mode, v.datapath,
			bytesStr(v.into.BaseRSS), bytesStr(v.into.DaemonRSS), bytesStr(v.into.SocketMem), v.into.Sockets)
	}
	if p := res.Proxied.Total(); p > 0 {
		res.Ratio = float64(res.Spliced.Total()) / float64(p)
		res.RatioBPF = float64(res.SplicedBPF.Total()) / float64(p)
	}
	res.PerFlowB = float64(res.Spliced.Total()) / float64(flows)
	res.PerFlowBPFB = float64(res.SplicedBPF.Total()) / float64(flows)
	return res
}

// flowBudget caps the number of flows to what the open-file hard limit
// allows: a proxied flow holds two descriptors in the daemon, which cannot
// raise the limit without CAP_SYS_RESOURCE.
func flowBudget(want int) (int, string) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return want, ""
	}
	if most := int(lim.Max)/2 - 100; want > most {
		return most, fmt.Sprintf("measured %d flows instead of %d: the open-file hard limit here is %d and a proxied flow holds two descriptors", most, want, lim.Max)
	}
	return want, ""
}

// Hold accepts connections on addr and keeps them open until killed; the
// memory measure runs it in the server namespace (spliced-bench -hold). It
// returns only on failure.
func Hold(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	// Accepted connections must stay referenced: the runtime closes
	// unreachable ones.
	held := make(chan net.Conn, 1<<16)
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		select {
		case held <- c:
		default:
			return fmt.Errorf("more than %d connections", cap(held))
		}
	}
}

func memorySample(env *Env, opt *Options, flows int, mode, datapath string, into *MemSample) error {
	lab, err := testnet.New(testnet.Options{
		// The client opens every flow from its own port.
		ClientSysctls: map[string]string{"net.ipv4.ip_local_port_range": "10000 65000"},
	})
	if err != nil {
		return err
	}
	defer lab.Close()
	d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, memoryConfig(mode, datapath))
	if d != nil {
		defer d.Stop()
	}
	if err != nil {
		return err
	}
	before, err := sockstat(lab)
	if err != nil {
		return err
	}
	into.BaseRSS = rss(d.Pid())
	if into.BaseLive, err = daemonLive(d); err != nil {
		return err
	}
	if into.BaseMaps, err = bpfMapMemory(d.Pid()); err != nil {
		return err
	}
	// The server side holds its connections in a process of its own: this
	// one holds the client side, and each may only have so many files.
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dst := netip.AddrPortFrom(lab.Server().IPv4, portMemory)
	holder := lab.Server().Command(context.Background(), self, "-hold", dst.String())
	if err := holder.Start(); err != nil {
		return fmt.Errorf("start the connection holder: %w", err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	if err := waitListening(&lab.Server().NS, portMemory); err != nil {
		return err
	}
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < flows; i++ {
		c, err := lab.Client().Dial(dst, 10*time.Second)
		if err != nil {
			return fmt.Errorf("flow %d: %w", i, err)
		}
		held = append(held, c)
	}
	// Wait until the gateway is steady: every flow accepted upstream and,
	// when splicing, every flow spliced.
	err = testnet.Poll(2*time.Minute, func() error {
		srv, err := sockstatOf(&lab.Server().NS)
		if err != nil {
			return err
		}
		if srv.inuse < flows {
			return fmt.Errorf("%d of %d connections reached the server", srv.inuse-1, flows)
		}
		if mode != "never" {
			spliced := 0
			for _, l := range d.Lines() {
				if l["msg"] == "flow spliced" {
					spliced++
				}
			}
			if spliced < flows {
				return fmt.Errorf("%d of %d flows spliced", spliced, flows)
			}
		}
		return nil
	})
	if err != nil {
		var warn []string
		for _, l := range d.Lines() {
			if l["level"] == "WARN" || l["level"] == "ERROR" {
				warn = append(warn, fmt.Sprint(l["msg"], ": ", l["err"]))
				if len(warn) == 3 {
					break
				}
			}
		}
		return fmt.Errorf("%w; the daemon said: %s", err, strings.Join(warn, "; "))
	}
	time.Sleep(500 * time.Millisecond) // let the last acknowledgments settle
	after, err := sockstat(lab)
	if err != nil {
		return err
	}
	into.DaemonRSS = rss(d.Pid())
	if into.DaemonLive, err = daemonLive(d); err != nil {
		return err
	}
	into.Sockets = after.inuse - before.inuse
	maps, err := bpfMapMemory(d.Pid())
	if err != nil {
		return err
	}
	into.MapBytes = max(maps-into.BaseMaps, 0)
	// The kernel's TCP buffer pages are counted for all namespaces
	// together, and idle flows hold almost none; what each gateway socket
	// surely costs is its slab objects. Count both.
	into.SocketMem = max(after.memPages-before.memPages, 0)*int64(os.Getpagesize()) + int64(into.Sockets)*socketSlabBytes()
	return nil
}

// socketSlabBytes is the slab memory of one IPv4 TCP socket: the tcp_sock
// and its socket inode (from /proc/slabinfo; 3200 bytes if unreadable).
func socketSlabBytes() int64 {
	b, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return 3200
	}
	var total int64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 3 && (f[0] == "TCP" || f[0] == "sock_inode_cache") {
			v, _ := strconv.ParseInt(f[3], 10, 64)
			total += v
		}
	}
	if total == 0 {
		return 3200
	}
	return total
}

type sockstats struct {
	inuse    int
	memPages int64
}

// sockstat reads the gateway's /proc/net/sockstat TCP line.
func sockstat(lab *testnet.Lab) (sockstats, error) { return sockstatOf(&lab.Gateway.NS) }

func sockstatOf(ns *testnet.NS) (sockstats, error) {
	out, err := ns.Run("cat", "/proc/net/sockstat")
	if err != nil {
		return sockstats{}, err
	}
	var s sockstats
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			v, _ := strconv.ParseInt(f[i+1], 10, 64)
			switch f[i] {
			case "inuse":
				s.inuse = int(v)
			case "mem":
				s.memPages = v
			}
		}
	}
	return s, nil
}

// daemonLive asks the daemon (SIGUSR1) for its live memory: Go heap and
// stacks in use after a collection.
func daemonLive(d *testnet.Daemon) (int64, error) {
	seen := 0
	for _, l := range d.Lines() {
		if l["msg"] == "memory" {
			seen++
		}
	}
	if err := d.Signal(unix.SIGUSR1); err != nil {
		return 0, err
	}
	var live int64
	err := testnet.Poll(10*time.Second, func() error {
		n := 0
		for _, l := range d.Lines() {
			if l["msg"] == "memory" {
				if n++; n > seen {
					live = int64(l["heap_inuse_bytes"].(float64) + l["stack_inuse_bytes"].(float64))
					return nil
				}
			}
		}
		return fmt.Errorf("the daemon did not report its memory")
	})
	return live, err
}

// rss is a process's resident memory in bytes.
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}

// bpfMapMemory is the kernel's account of the BPF maps process pid holds:
// the sum of each map's memlock (its fdinfo), counted once per map. On
// both datapaths the daemon holds the flow maps (the program's, or the
// nfqueue datapath's record of spliced flows for a restart).
func bpfMapMemory(pid int) (int64, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	seen := map[string]bool{}
	var total int64
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err != nil || l != "anon_inode:bpf-map" {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		var id string
		var memlock int64
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			switch v = strings.TrimSpace(v); k {
			case "map_id":
				id = v
			case "memlock":
				memlock, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		if id != "" && !seen[id] {
			seen[id] = true
			total += memlock
		}
	}
	return total, nil
}
