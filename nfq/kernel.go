package nfq

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// KernelStats are the kernel's counters of one queue, from
// /proc/net/netfilter/nfnetlink_queue.
type KernelStats struct {
	PortID uint32 // netlink port of the bound program (0: nobody)
	// Waiting is the number of packets queued now, waiting for a verdict.
	Waiting uint32
	// QueueDropped counts packets dropped because the queue was full
	// (MaxQueueLen); UserDropped those dropped because the netlink socket
	// buffer was full. Neither is fail-open: spliced's queues drop.
	QueueDropped, UserDropped uint32
	IDSequence                uint32 // ID of the last packet queued
}

// The calling thread's namespace: /proc/net follows the process.
const procQueues = "/proc/thread-self/net/netfilter/nfnetlink_queue"

// ReadKernelStats reads the kernel's counters of every bound queue in the
// caller's network namespace.
func ReadKernelStats() (map[uint16]KernelStats, error) {
	f, err := os.Open(procQueues)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseKernelStats(bufio.NewScanner(f))
}

// parseKernelStats parses lines of "queue portid waiting copy_mode
// copy_range queue_dropped user_dropped id_sequence 1".
func parseKernelStats(sc *bufio.Scanner) (map[uint16]KernelStats, error) {
	out := map[uint16]KernelStats{}
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 {
			continue
		}
		var v [8]uint64
		for i := range v {
			n, err := strconv.ParseUint(f[i], 10, 32)
			if err != nil {
				return nil, fmt.Errorf("%s: field %d of %q: %w", procQueues, i+1, sc.Text(), err)
			}
			v[i] = n
		}
		out[uint16(v[0])] = KernelStats{PortID: uint32(v[1]), Waiting: uint32(v[2]), QueueDropped: uint32(v[5]), UserDropped: uint32(v[6]), IDSequence: uint32(v[7])}
	}
	return out, sc.Err()
}
