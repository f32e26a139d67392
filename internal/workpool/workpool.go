// Package workpool runs functions on goroutines that outlive them.
//
// A goroutine that is done with one function waits a while for the next
// instead of ending. A new goroutine starts on a small stack and grows it
// by copying, several times before it reaches the deep calls of a splice
// or an HTTP request; on this project's VMs the kernel's first access to
// a fresh stack page also costs tens of microseconds (a BPF map update
// from a new goroutine took 40-180 µs, from a reused one 4 µs). A reused
// goroutine keeps its grown stack, already known to the kernel.
package workpool

import (
	"sync"
	"time"
)

// Pool runs functions on reused goroutines. Its zero value is not usable:
// call New.
type Pool struct {
	idle time.Duration
	next chan func() // to a goroutine waiting for work
	done chan struct{}
	once sync.Once
}

// New returns a pool whose goroutines end after idle without work.
func New(idle time.Duration) *Pool {
	return &Pool{idle: idle, next: make(chan func()), done: make(chan struct{})}
}

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
	}
	idle.Stop()
}

// Close ends the goroutines waiting for work. Go still runs functions
// after it, each on a goroutine that ends with it.
func (p *Pool) Close() { p.once.Do(func() { close(p.done) }) }
