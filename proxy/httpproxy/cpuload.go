package httpproxy

import (
	"bytes"
	"os"
	"strconv"
	"sync"
	"time"
)

// cpuSampleEvery is how often the measured policy looks at the machine's
// CPU use: the share of idle time is that of the last such period.
const cpuSampleEvery = 500 * time.Millisecond

// cpuLoad tells whether the machine's CPUs are saturated, from
// /proc/stat, sampled at most every cpuSampleEvery by whichever decision
// finds the last sample old (no goroutine of its own).
//
// Why the policy asks: on the nfqueue datapath every packet of a spliced
// flow crosses to the daemon and back, which costs the gateway more CPU
// per byte than relaying does (about 1 s per GB spliced against 0.7 s
// relayed in `make bench`). While the CPUs have time to spare, a
// response spliced that way can still arrive sooner, which is what the
// measured policy's times compare; once they are saturated, every
// splice takes CPU from everything else, the responses' times no longer
// show it, and the service serves fewer requests (README, "HTTP proxy
// next to nginx and HAProxy").
type cpuLoad struct {
	mu          sync.Mutex
	at          time.Time // of the last sample; zero before the first
	busy, total uint64    // the counters of /proc/stat then
	idle        float64   // the share of idle time between the last two samples; -1 unknown
	read        func() (busy, total uint64, ok bool)
}

// idleShare returns the machine's share of idle CPU time over the last
// sampled period, or -1 while unknown (no two samples yet, /proc/stat
// unreadable). A caller that finds another sampling returns the last
// value without waiting.
func (l *cpuLoad) idleShare(now time.Time) float64 {
	if !l.mu.TryLock() {
		return -1
	}
	defer l.mu.Unlock()
	if l.read == nil {
		l.read, l.idle = readProcStat, -1
	}
	if !l.at.IsZero() && now.Sub(l.at) < cpuSampleEvery {
		return l.idle
	}
	busy, total, ok := l.read()
	if !ok {
		l.at, l.idle = now, -1
		return -1
	}
	if !l.at.IsZero() && total > l.total && busy >= l.busy {
		l.idle = 1 - float64(busy-l.busy)/float64(total-l.total)
	}
	l.at, l.busy, l.total = now, busy, total
	return l.idle
}

// readProcStat reads the machine's CPU time counters: busy and total
// jiffies over all CPUs.
func readProcStat() (busy, total uint64, ok bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, false
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	return parseCPULine(line)
}

// parseCPULine parses /proc/stat's first line, "cpu user nice system
// idle iowait irq softirq steal guest guest_nice": idle and iowait are
// not busy; guest time is counted in user and nice already.
func parseCPULine(line []byte) (busy, total uint64, ok bool) {
	fields := bytes.Fields(line)
	if len(fields) < 9 || string(fields[0]) != "cpu" {
		return 0, 0, false
	}
	var idle uint64
	for i, f := range fields[1:9] {
		v, err := strconv.ParseUint(string(f), 10, 64)
		if err != nil {
			return 0, 0, false
		}
		total += v
		if i == 3 || i == 4 { // idle, iowait
			idle += v
		}
	}
	return total - idle, total, true
}
