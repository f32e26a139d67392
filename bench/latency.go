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
	portBusyNever = 7104
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
  - name: busynever
    listen: 15004
    ports: ["7104"]
    splice:
      mode: never
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
	// buffers fixed (splice.socket_buffer); then never spliced, for the
	// gaps a saturated machine makes without a splice.
	busy := map[uint16][]*busyResult{}
	for _, port := range []uint16{portBusy, portBusyFixed, portBusyNever} {
		bln, err := lab.Server().Listen(netip.AddrPortFrom(lab.Server().IPv4, port))
		if err != nil {
			res.Error = err.Error()
			return res
		}
		defer bln.Close()
		for range n {
			r, err := busyFlow(lab, bln, port, 32<<20)
			if err != nil {
				res.Error = "busy flow: " + err.Error()
				return res
			}
			busy[port] = append(busy[port], r)
		}
	}
	spliced := splicedWindows(d.Lines())
	stalls, across := stallsOf(busy[portBusy], spliced)
	stallsFixed, acrossFixed := stallsOf(busy[portBusyFixed], spliced)
	stallsNever, _ := stallsOf(busy[portBusyNever], nil)
	res.StallAcrossSamples, res.StallFixedAcrossSamples = len(across), len(acrossFixed)
	res.StallAcrossP50, res.StallAcrossP99 = percentile(across, 0.5), percentile(across, 0.99)
	res.StallFixedAcrossP50, res.StallFixedAcrossP99 = percentile(acrossFixed, 0.5), percentile(acrossFixed, 0.99)
	res.NeverSamples = len(stallsNever)
	res.StallNeverP50, res.StallNeverP99 = percentile(stallsNever, 0.5), percentile(stallsNever, 0.99)
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
	fmt.Fprintf(opt.Log, "   idle %d: p50 %.0f µs p99 %.0f µs; unsplice %d: p50 %.0f µs p99 %.0f µs; busy %d: p50 %.0f µs p99 %.0f µs, stall p50 %.1f ms p99 %.1f ms, across the splice p50 %.1f ms p99 %.1f ms; socket_buffer 256KiB: p50 %.0f µs p99 %.0f µs, stall p50 %.1f ms p99 %.1f ms, across the splice p50 %.1f ms p99 %.1f ms; never spliced: stall p50 %.1f ms p99 %.1f ms\n",
		res.IdleSamples, res.IdleP50, res.IdleP99, res.UnspliceSamples, res.UnspliceP50, res.UnspliceP99,
		res.BusySamples, res.BusyP50, res.BusyP99, res.StallP50, res.StallP99, res.StallAcrossP50, res.StallAcrossP99,
		res.BusyFixedP50, res.BusyFixedP99, res.StallFixedP50, res.StallFixedP99, res.StallFixedAcrossP50, res.StallFixedAcrossP99,
		res.StallNeverP50, res.StallNeverP99)
	return res
}

// busyResult is what the receivers of one busy flow saw.
type busyResult struct {
	client string // the client's address, as the gateway logs it
	// reads: when each receiver's reads returned data (client, server).
	reads [2][]time.Time
}

// longestGap is the longest time between two reads of a receiver of the
// flow: the gap across a window that spans the whole transfer.
func (r *busyResult) longestGap() time.Duration {
	g, _ := r.gapAcross(time.Time{}, time.Unix(1<<62, 0))
	return g
}

// gapAcross is the longest time between two reads of a receiver that
// overlaps [from, to]: the pause the splice made, including the one that
// ends with the first read after it completed. ok is false when no
// receiver read on both sides of the window.
func (r *busyResult) gapAcross(from, to time.Time) (gap time.Duration, ok bool) {
	for _, ts := range r.reads {
		for i := 1; i < len(ts); i++ {
			if ts[i-1].Before(to) && ts[i].After(from) {
				gap, ok = max(gap, ts[i].Sub(ts[i-1])), true
			}
		}
	}
	return gap, ok
}

// spliceWindow is when the gateway spliced a flow: from the splice's
// start to the "flow spliced" line (both on the machine's clock).
type spliceWindow struct{ from, to time.Time }

// splicedWindows returns the splice windows of the logged splices by
// client address.
func splicedWindows(lines []map[string]any) map[string]spliceWindow {
	out := map[string]spliceWindow{}
	for _, l := range lines {
		if l["msg"] != "flow spliced" {
			continue
		}
		client, _ := l["client"].(string)
		ts, _ := l["time"].(string)
		took, _ := l["took_us"].(float64)
		to, err := time.Parse(time.RFC3339Nano, ts)
		if client == "" || err != nil {
			continue
		}
		out[client] = spliceWindow{to.Add(-time.Duration(took) * time.Microsecond), to}
	}
	return out
}

// stallsOf returns the longest gap of each flow, and the gap across its
// splice for each flow the gateway spliced (in windows), in ms.
func stallsOf(flows []*busyResult, windows map[string]spliceWindow) (longest, across []float64) {
	for _, r := range flows {
		longest = append(longest, float64(r.longestGap().Microseconds())/1000)
		if w, ok := windows[r.client]; ok {
			if g, ok := r.gapAcross(w.from, w.to); ok {
				across = append(across, float64(g.Microseconds())/1000)
			}
		}
	}
	return longest, across
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
// logged with msg of flows to server (of every flow for "").
func phasesFor(lines []map[string]any, msg string, names []string, kind, server string) []PhaseLatency {
	var out []PhaseLatency
	for _, name := range names {
		var v []float64
		for _, l := range lines {
			if l["msg"] != msg || server != "" && l["server"] != server {
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
func busyFlow(lab *testnet.Lab, ln *net.TCPListener, port uint16, size int64) (*busyResult, error) {
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
		return nil, err
	}
	s := <-accepted
	if s == nil {
		c.Close()
		return nil, fmt.Errorf("accept failed")
	}
	r := &busyResult{client: c.LocalAddr().String()}
	var wg sync.WaitGroup
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
			r.reads[i], errs[2*i+1] = readTimes(conn)
		}()
	}
	wg.Wait()
	c.Close()
	s.Close()
	for _, e := range errs {
		if e != nil {
			return nil, e
		}
	}
	return r, nil
}

// readTimes reads to EOF and returns when each read returned data.
func readTimes(c *net.TCPConn) ([]time.Time, error) {
	buf := make([]byte, 256<<10)
	var times []time.Time
	for {
		n, err := c.Read(buf)
		if n > 0 {
			times = append(times, time.Now())
		}
		if err == io.EOF {
			return times, nil
		}
		if err != nil {
			return times, err
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
