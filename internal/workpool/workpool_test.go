package workpool

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// goroutineID is the calling goroutine's ID, from its stack header.
func goroutineID() string {
	var b [64]byte
	n := runtime.Stack(b[:], false)
	s := string(b[:n]) // "goroutine 18 [running]:..."
	for i := len("goroutine "); i < len(s); i++ {
		if s[i] == ' ' {
			return s[len("goroutine "):i]
		}
	}
	return s
}

// TestReuse: a goroutine done with a function takes the next one given
// to the pool (Go hands it to a waiting goroutine, here waited for).
func TestReuse(t *testing.T) {
	p := New(time.Hour, 64)
	defer p.Close()
	var ids []string
	done := make(chan string)
	p.Go(func() { done <- goroutineID() })
	ids = append(ids, <-done)
	for range 4 {
		select {
		case p.next <- func() { done <- goroutineID() }:
		case <-time.After(10 * time.Second):
			t.Fatal("no goroutine waits for work after a function")
		}
		ids = append(ids, <-done)
	}
	for _, id := range ids[1:] {
		if id != ids[0] {
			t.Fatalf("functions ran on goroutines %v: not reused", ids)
		}
	}
}

// TestConcurrent: Go never waits for a busy goroutine; every function
// runs once.
func TestConcurrent(t *testing.T) {
	p := New(time.Hour, 64)
	defer p.Close()
	var ran atomic.Int64
	release := make(chan struct{})
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		p.Go(func() { <-release; ran.Add(1); wg.Done() })
	}
	close(release) // all 50 were started while every goroutine was busy
	wg.Wait()
	if n := ran.Load(); n != 50 {
		t.Fatalf("%d functions ran, want 50", n)
	}
}

// TestEnds: idle goroutines end after the idle time and at Close.
func TestEnds(t *testing.T) {
	before := runtime.NumGoroutine()
	p := New(20*time.Millisecond, 64)
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		p.Go(func() { time.Sleep(10 * time.Millisecond); wg.Done() })
	}
	wg.Wait()
	waitGoroutines(t, before)

	q := New(time.Hour, 64)
	done := make(chan struct{})
	q.Go(func() { close(done) })
	<-done
	q.Close()
	waitGoroutines(t, before)
	ran := make(chan struct{})
	q.Go(func() { close(ran) }) // after Close: still runs
	<-ran
	waitGoroutines(t, before)
}

func waitGoroutines(t *testing.T, want int) {
	t.Helper()
	for range 5000 {
		if runtime.NumGoroutine() <= want {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%d goroutines, want %d", runtime.NumGoroutine(), want)
}

// TestMaxIdle: after a burst of functions, at most maxIdle goroutines
// wait for work; the others ended, and the ones left take new work.
func TestMaxIdle(t *testing.T) {
	before := runtime.NumGoroutine()
	const maxIdle = 4
	p := New(time.Hour, maxIdle)
	release := make(chan struct{})
	var wg sync.WaitGroup
	for range 40 {
		wg.Add(1)
		p.Go(func() { <-release; wg.Done() })
	}
	close(release)
	wg.Wait()
	// The pool's own count settles at maxIdle (one that ends counts
	// itself for a moment); the goroutine count is only a bound: those
	// of earlier tests may still be ending.
	waitIdle(t, p, maxIdle)
	waitGoroutines(t, before+maxIdle)
	ran := make(chan struct{})
	p.Go(func() { close(ran) })
	<-ran
	waitIdle(t, p, maxIdle)
	p.Close()
	waitIdle(t, p, 0)
	waitGoroutines(t, before)
}

func waitIdle(t *testing.T, p *Pool, want int) {
	t.Helper()
	for range 5000 {
		if p.Idle() == want {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%d goroutines wait for work, want %d", p.Idle(), want)
}
