package nfq

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Ordering. A packet given a verdict continues its way through the stack
// on the CPU that gave the verdict, and leaves through that CPU's backlog
// (veth) or the transmit queue XPS maps that CPU to (a NIC). Two batches
// of one flow's packets given their verdicts from two CPUs can overtake
// each other on the way out, and a receiver that sees segments out of
// order sends SACKs and its sender retransmits spuriously. So the lean
// reader of each queue runs locked to one OS thread bound to one CPU, and
// code elsewhere that gives verdicts to, or injects, packets of a queue's
// flows (a splice releasing what it held) runs on that CPU too (Pin).

// allowedCPUs lists the CPUs the process may run on.
func allowedCPUs() []int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return nil
	}
	var cpus []int
	for c := range runtime.NumCPU() * 8 {
		if c < len(set)*64 && set.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	return cpus
}

// pinThread locks the calling goroutine to its OS thread and binds the
// thread to cpu (no binding when cpu < 0). The returned function undoes
// both.
func pinThread(cpu int) (unpin func()) {
	runtime.LockOSThread()
	if cpu < 0 {
		return runtime.UnlockOSThread
	}
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return runtime.UnlockOSThread
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return runtime.UnlockOSThread
	}
	return func() {
		unix.SchedSetaffinity(0, &old)
		runtime.UnlockOSThread()
	}
}

// cpuOf returns the CPU of the queue with index i of the set, or -1.
func (s *Set) cpuOf(i int) int {
	if len(s.cpus) == 0 {
		return -1
	}
	return s.cpus[i%len(s.cpus)]
}

// Pin runs the calling goroutine on the CPU of the set's queue with index
// i (0 for the first queue) until the returned function is called: packets
// it injects or gives verdicts to then leave in order with the ones the
// queue's reader passes.
func (s *Set) Pin(i int) (unpin func()) { return pinThread(s.cpuOf(i)) }
