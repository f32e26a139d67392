package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"spliced/testnet"
)

// Ports the workloads use; every proxying configuration intercepts them.
const (
	portRR    = 7000
	portIperf = 5201
)

// echoServer answers every message of size bytes with the same bytes.
type echoServer struct {
	ln   *net.TCPListener
	size int
	wg   sync.WaitGroup
}

func startEcho(server *testnet.Host, port uint16, size int) (*echoServer, error) {
	ln, err := server.Listen(netip.AddrPortFrom(server.IPv4, port))
	if err != nil {
		return nil, err
	}
	e := &echoServer{ln: ln, size: size}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				defer c.Close()
				c.SetNoDelay(true)
				buf := make([]byte, size)
				for {
					if _, err := io.ReadFull(c, buf); err != nil {
						return
					}
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	return e, nil
}

func (e *echoServer) Close() {
	e.ln.Close()
	e.wg.Wait()
}

// requestResponse runs conns connections doing size-byte ping-pong for d
// and returns transactions per second.
func requestResponse(client, server *testnet.Host, size, conns int, d time.Duration) (float64, error) {
	echo, err := startEcho(server, portRR, size)
	if err != nil {
		return 0, err
	}
	defer echo.Close()
	dst := netip.AddrPortFrom(server.IPv4, portRR)
	cs := make([]*net.TCPConn, conns)
	for i := range cs {
		if cs[i], err = client.Dial(dst, 5*time.Second); err != nil {
			return 0, fmt.Errorf("dial: %w", err)
		}
		cs[i].SetNoDelay(true)
		defer cs[i].Close()
	}
	return rrLoop(cs, size, d)
}

// rrLoop runs size-byte ping-pong on established connections, each
// to an echo server of size-byte messages, for d and returns
// transactions per second.
func rrLoop(cs []*net.TCPConn, size int, d time.Duration) (float64, error) {
	// A first exchange on every connection, so that a configuration that
	// splices at connect has spliced before the clock starts.
	buf := make([]byte, size)
	for _, c := range cs {
		if err := exchange(c, buf); err != nil {
			return 0, err
		}
	}
	time.Sleep(50 * time.Millisecond)
	var count atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	start := time.Now()
	for _, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, size)
			c.SetDeadline(deadline.Add(5 * time.Second))
			for time.Now().Before(deadline) {
				if err := exchange(c, b); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	return float64(count.Load()) / elapsed.Seconds(), nil
}

func exchange(c *net.TCPConn, b []byte) error {
	if _, err := c.Write(b); err != nil {
		return err
	}
	_, err := io.ReadFull(c, b)
	return err
}

// iperf runs iperf3 for d from the client against a server it starts, and
// returns Gbit/s received. reverse measures server to client.
func iperf(lab *testnet.Lab, d time.Duration, reverse bool) (float64, error) {
	srv := lab.Server().Command(context.Background(), "iperf3", "-s", "-1", "-p", strconv.Itoa(portIperf), "-B", lab.Server().IPv4.String())
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("start iperf3 server: %w", err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	if err := waitListening(&lab.Server().NS, portIperf); err != nil {
		return 0, err
	}
	args := []string{"-c", lab.Server().IPv4.String(), "-p", strconv.Itoa(portIperf), "-t", fmt.Sprintf("%.1f", d.Seconds()), "-J"}
	if reverse {
		args = append(args, "-R")
	}
	out, err := lab.Client().Command(context.Background(), "iperf3", args...).Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3: %w: %s", err, tailStr(string(out), 300))
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	if res.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", res.Error)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

// waitListening waits until something listens on the TCP port in ns.
func waitListening(ns *testnet.NS, port int) error {
	return ns.WaitListening(uint16(port), 10*time.Second)
}

func tailStr(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// cpuMeter reads the CPU time of the gateway's user-space processes and
// the machine's softirq time (network processing in the kernel; the lab's
// namespaces share the CPUs, so it includes the ends' processing too).
type cpuMeter struct {
	pids func() []int
}

type cpuSample struct{ proc, softirq time.Duration }

const clockTick = 10 * time.Millisecond // USER_HZ = 100

func (m cpuMeter) read() cpuSample {
	var s cpuSample
	if m.pids != nil {
		for _, pid := range m.pids() {
			s.proc += procCPU(pid)
		}
	}
	f, err := os.Open("/proc/stat")
	if err != nil {
		return s
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 7 && fields[0] == "cpu" {
			v, _ := strconv.ParseInt(fields[7], 10, 64) // softirq
			s.softirq = time.Duration(v) * clockTick
		}
	}
	return s
}

func (a cpuSample) sub(b cpuSample) time.Duration { return (a.proc - b.proc) + (a.softirq - b.softirq) }

// procSub is the processes' time alone, without the machine's softirq
// time (which counts the other namespaces' packets, and on a shared
// machine other work too).
func (a cpuSample) procSub(b cpuSample) time.Duration { return a.proc - b.proc }

// procCPU is a process's user plus system time, with that of its
// children that ended and were waited for (a server that forks workers,
// as Dante does, keeps the time of the ones that ended).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return 0
	}
	var ticks int64
	for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
		v, _ := strconv.ParseInt(f[i], 10, 64)
		ticks += v
	}
	return time.Duration(ticks) * clockTick
}
