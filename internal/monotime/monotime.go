// Package monotime is the clock of the timestamps the daemon keeps as
// numbers (a flow's last packet, when it finished, when a backend may be
// tried again): nanoseconds on the system's monotonic clock
// (CLOCK_MONOTONIC), which is also the BPF program's (bpf_ktime_get_ns)
// and is the same for every process of a boot, so a restarted daemon
// reads an earlier one's records with it.
//
// Those timestamps used to be unix nanoseconds (time.Now().UnixNano()),
// and every duration taken from them moved with the wall clock. Routers
// without a battery-backed clock boot with a stale time that NTP then
// steps forward, often by hours: every spliced and relayed flow then
// looked idle for that long and was reset. A monotonic clock never steps.
// Times shown to people (when a flow was spliced) are converted back to
// the wall clock with Wall.
package monotime

import (
	"time"

	"golang.org/x/sys/unix"
)

// base and baseNs are the same instant on Go's clock (whose monotonic
// reading is CLOCK_MONOTONIC) and as CLOCK_MONOTONIC nanoseconds: Now
// advances baseNs by Go's monotonic reading, without a system call.
var base, baseNs = anchor()

func anchor() (time.Time, int64) {
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &before); err != nil {
		// Not on Linux as built; any fixed origin keeps durations right.
		return time.Now(), 1
	}
	t := time.Now()
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &after)
	// The midpoint: a thread preempted between two readings would
	// otherwise put every Now of the process off by the preemption.
	return t, before.Nano() + (after.Nano()-before.Nano())/2
}

// Now is the current time on the monotonic clock, in nanoseconds.
func Now() int64 { return baseNs + int64(time.Since(base)) }

// Of is t on the monotonic clock. t must carry Go's monotonic reading
// (time.Now() and times derived from it with Add) for the result to
// ignore the wall clock's steps; a time without one (time.Unix) is placed
// by the wall clock as it reads now.
func Of(t time.Time) int64 { return Now() - int64(time.Since(t)) }

// Since is the time elapsed since t (a Now value).
func Since(t int64) time.Duration { return time.Duration(Now() - t) }

// Wall converts t (a Now value) to the wall clock as it reads now; 0
// stays the zero time. A value later than now (a record written by an
// earlier version in unix nanoseconds) is taken as unix nanoseconds.
func Wall(t int64) time.Time {
	if t == 0 {
		return time.Time{}
	}
	now := Now()
	if t > now {
		return time.Unix(0, t)
	}
	return time.Now().Add(-time.Duration(now - t))
}
