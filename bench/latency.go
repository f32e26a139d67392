package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"spliced/testnet"
)

const (
	portIdle      = 7101
	portBusy      = 7102
	portBusyFixed = 7103
)

const latencyConfig = `
log:
  level: info
services:
  - name: idle
    listen: 15001
    ports: ["7101"]
    splice:
      mode: time
      after: 300ms
  - name: busy
    listen: 15002
    ports: ["7102"]
    splice:
      mode: bytes
      bytes: 8MiB
  - name: busyfixed
    listen: 15003
    ports: ["7103"]
    splice:
      mode: bytes
      bytes: 8MiB
      socket_buffer: 256KiB
`

// measureLatency splices idle flows (nothing in flight) and busy ones
// (both directions at full speed) and reports the splice time the gateway
// measured and the longest pause a busy flow's receivers saw.
func measureLatency(env *Env, opt *Options) *Latency {
	res := &Latency{}
	n := 30
	if opt.Quick {
		n = 10
	}
	lab, err := testnet.New(testnet.Options{})
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer lab.Close()
	d, err := testnet.LaunchDaemon(lab, env.Spliced, env.Dir, latencyConfig)
	if d != nil {
		defer d.Stop()
	}
	if err != nil {
		res.Error = err.Error()
		return res
	}
	tookFor := func(port int) []float64 {
		var out []float64
		for _, l := range d.Lines() {
			if l["msg"] == "flow spliced" && l["server"] == fmt.Sprintf("%s:%d", lab.Server().IPv4, port) {
				out = append(out, l["took_us"].(float64))
			}
		}
		return out
	}

	// Idle flows: connect, wait for the splice.
	ln, err := lab.Server().Listen(netip.AddrPortFrom(lab.Server().IPv4, portIdle))
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	var idle []*net.TCPConn
	for range n {
		c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, portIdle), 5*time.Second)
		if err != nil {
			res.Error = "dial: " + err.Error()
			return res
		}
		idle = append(idle, c)
	}
	testnet.Poll(10*time.Second, func() error {
		if len(tookFor(portIdle)) < n {
			return fmt.Errorf("not all spliced")
		}
		return nil
	})
	idleServer := fmt.Sprintf("%s:%d", lab.Server().IPv4, portIdle)
	idleT := tookFor(portIdle)
	idlePhases := phasesFor(d.Lines(), "flow spliced", splicePhases, "idle", idleServer)
	// The same idle flows unspliced (splicectl unsplice), one at a time
	// on an otherwise quiet gateway; their proxy would splice them again
	// after 300 ms, by when they are closed.
	unspliced := unspliceIdle(d, idleServer)
	for _, c := range idle {
		c.Close()
	}

	// Busy flows, one after another; then the same with the sockets'
	// buffers fixed (splice.socket_buffer).
	var stalls, stallsFixed []float64
	for _, b := range []struct {
		port   uint16
		stalls *[]float64
	}{{portBusy, &stalls}, {portBusyFixed, &stallsFixed}} {
		bln, err := lab.Server().Listen(netip.AddrPortFrom(lab.Server().IPv4, b.port))
		if err != nil {
			res.Error = err.Error()
			return res
		}
		defer bln.Close()
		for range n {
			stall, err := busyFlow(lab, bln, b.port, 32<<20)
			if err != nil {
				res.Error = "busy flow: " + err.Error()
				return res
			}
			*b.stalls = append(*b.stalls, float64(stall.Microseconds())/1000)
		}
	}
	fixedT := tookFor(portBusyFixed)
	res.BusyFixedSamples = len(fixedT)
	res.BusyFixedP50, res.BusyFixedP99 = percentile(fixedT, 0.5), percentile(fixedT, 0.99)
	res.StallFixedP50, res.StallFixedP99 = percentile(stallsFixed, 0.5), percentile(stallsFixed, 0.99)
	busyT := tookFor(portBusy)
	res.IdleSamples, res.BusySamples = len(idleT), len(busyT)
	res.UnspliceSamples = len(unspliced)
	res.UnspliceP50, res.UnspliceP99 = percentile(unspliced, 0.5), percentile(unspliced, 0.99)
	res.IdleP50, res.IdleP99 = percentile(idleT, 0.5), percentile(idleT, 0.99)
	res.BusyP50, res.BusyP99 = percentile(busyT, 0.5), percentile(busyT, 0.99)
	res.StallP50, res.StallP99 = percentile(stalls, 0.5), percentile(stalls, 0.99)
	res.Phases = append(idlePhases, phasesFor(d.Lines(), "flow spliced", splicePhases, "busy", fmt.Sprintf("%s:%d", lab.Server().IPv4, portBusy))...)
	res.UnsplicePhases = phasesFor(d.Lines(), "flow unspliced", unsplicePhases, "idle", idleServer)
	fmt.Fprintf(opt.Log, "   idle %d: p50 %.0f µs p99 %.0f µs; unsplice %d: p50 %.0f µs p99 %.0f µs; busy %d: p50 %.0f µs p99 %.0f µs, stall p50 %.1f ms p99 %.1f ms; socket_buffer 256KiB: p50 %.0f µs p99 %.0f µs, stall p50 %.1f ms p99 %.1f ms\n",
		res.IdleSamples, res.IdleP50, res.IdleP99, res.UnspliceSamples, res.UnspliceP50, res.UnspliceP99,
		res.BusySamples, res.BusyP50, res.BusyP99, res.StallP50, res.StallP99,
		res.BusyFixedP50, res.BusyFixedP99, res.StallFixedP50, res.StallFixedP99)
	return res
}

// unspliceIdle unsplices every spliced flow to server through the
// control API, one after the other, and returns the unsplice times the
// gateway logged for them (µs).
func unspliceIdle(d *testnet.Daemon, server string) []float64 {
	var ids []uint64
	for _, l := range d.Lines() {
		if l["msg"] == "flow spliced" && l["server"] == server {
			if id, ok := l["flow"].(float64); ok {
				ids = append(ids, uint64(id))
			}
		}
	}
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d.Client().Unsplice(ctx, id) // a failure shows as a missing sample
		cancel()
		time.Sleep(5 * time.Millisecond) // one at a time, the gateway idle between
	}
	var out []float64
	for _, l := range d.Lines() {
		if l["msg"] == "flow unspliced" && l["server"] == server {
			if v, ok := l["took_us"].(float64); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// splicePhases and unsplicePhases are the phases of a splice and of an
// unsplice in the order they run (the gateway's "phases_us" log
// attribute).
var (
	splicePhases   = []string{"divert", "drain", "barrier", "capture", "install", "release", "promote", "record"}
	unsplicePhases = []string{"drain", "barrier", "rebuild", "release"}
)

// phasesFor summarizes the phases (names, in order) of the transitions
// logged with msg of flows to server.
func phasesFor(lines []map[string]any, msg string, names []string, kind, server string) []PhaseLatency {
	var out []PhaseLatency
	for _, name := range names {
		var v []float64
		for _, l := range lines {
			if l["msg"] != msg || l["server"] != server {
				continue
			}
			if ph, ok := l["phases_us"].(map[string]any); ok {
				if us, ok := ph[name].(float64); ok {
					v = append(v, us)
				}
			}
		}
		if len(v) > 0 {
			out = append(out, PhaseLatency{Flows: kind, Phase: name, P50: percentile(v, 0.5), P99: percentile(v, 0.99)})
		}
	}
	return out
}

// busyFlow sends size bytes each way at once and returns the longest gap
// between two reads at either receiver.
func busyFlow(lab *testnet.Lab, ln *net.TCPListener, port uint16, size int64) (time.Duration, error) {
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, port), 5*time.Second)
	if err != nil {
		return 0, err
	}
	s := <-accepted
	if s == nil {
		c.Close()
		return 0, fmt.Errorf("accept failed")
	}
	var wg sync.WaitGroup
	gaps := make([]time.Duration, 2)
	errs := make([]error, 4)
	for i, conn := range []*net.TCPConn{c, s} {
		conn.SetDeadline(time.Now().Add(time.Minute))
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, errs[2*i] = io.CopyN(conn, zeroReader{}, size)
			conn.CloseWrite()
		}()
		go func() {
			defer wg.Done()
			gaps[i], errs[2*i+1] = readGaps(conn)
		}()
	}
	wg.Wait()
	c.Close()
	s.Close()
	for _, e := range errs {
		if e != nil {
			return 0, e
		}
	}
	return max(gaps[0], gaps[1]), nil
}

// readGaps reads to EOF and returns the longest time between two reads.
func readGaps(c *net.TCPConn) (time.Duration, error) {
	buf := make([]byte, 256<<10)
	var longest time.Duration
	last := time.Time{}
	for {
		_, err := c.Read(buf)
		now := time.Now()
		if !last.IsZero() && err == nil {
			longest = max(longest, now.Sub(last))
		}
		last = now
		if err == io.EOF {
			return longest, nil
		}
		if err != nil {
			return longest, err
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func percentile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1)+0.5)]
}
