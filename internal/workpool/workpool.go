// Package workpool runs functions on goroutines that outlive them.
//
// A goroutine that is done with one function waits a while for the next
// instead of ending, unless enough goroutines wait already: after a burst
// (a thousand flows spliced at once) the pool keeps a few, not one per
// function of the burst, each with its grown stack.
//
// A new goroutine starts on a small stack and grows it by copying,
// several times before it reaches the deep calls of a splice or an HTTP
// request; on this project's VMs the kernel's first access to
// a fresh stack page also costs tens of microseconds (a BPF map update
// from a new goroutine took 40-180 µs, from a reused one 4 µs). A reused
// goroutine keeps its grown stack, already known to the kernel.
package workpool

import (
	"sync"
	"sync/atomic"
	"time"
)

// Pool runs functions on reused goroutines. Its zero value is not usable:
// call New.
type Pool struct {
	idle    time.Duration
	maxIdle int32
	waiting atomic.Int32 // goroutines waiting for work, or about to
	next    chan func()  // to a goroutine waiting for work
	done    chan struct{}
	once    sync.Once
}

// New returns a pool whose goroutines end after idle without work; at
// most maxIdle of them wait at a time (one done with its function while
// maxIdle wait ends at once).
func New(idle time.Duration, maxIdle int) *Pool {
	return &Pool{idle: idle, maxIdle: int32(max(maxIdle, 1)), next: make(chan func()), done: make(chan struct{})}
}

// Idle returns how many goroutines wait for work.
func (p *Pool) Idle() int { return int(p.waiting.Load()) }

// Go runs fn on a goroutine of the pool that is waiting for work, or on a
// new one. It never waits for fn.
func (p *Pool) Go(fn func()) {
	select {
	case p.next <- fn:
	default:
		go p.work(fn)
	}
}

func (p *Pool) work(fn func()) {
	var idle *time.Timer
	for fn != nil {
		fn()
		if p.waiting.Add(1) > p.maxIdle {
			p.waiting.Add(-1)
			break
		}
		if idle == nil {
			idle = time.NewTimer(p.idle)
		} else {
			idle.Reset(p.idle)
		}
		select {
		case fn = <-p.next:
		case <-idle.C:
			fn = nil
		case <-p.done:
			fn = nil
		}
		p.waiting.Add(-1)
	}
	if idle != nil {
		idle.Stop()
	}
}

// Close ends the goroutines waiting for work. Go still runs functions
// after it, each on a goroutine that ends with it.
func (p *Pool) Close() { p.once.Do(func() { close(p.done) }) }
