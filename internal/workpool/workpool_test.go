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
	waitGoroutines(t, before+maxIdle)
	if n := p.Idle(); n != maxIdle {
		t.Fatalf("%d goroutines wait for work, want %d", n, maxIdle)
	}
	if n := runtime.NumGoroutine(); n != before+maxIdle {
		t.Fatalf("%d goroutines, want %d (%d waiting)", n, before+maxIdle, maxIdle)
	}
	ran := make(chan struct{})
	p.Go(func() { close(ran) })
	<-ran
	waitGoroutines(t, before+maxIdle)
	p.Close()
	waitGoroutines(t, before)
	if n := p.Idle(); n != 0 {
		t.Fatalf("%d goroutines wait for work after Close", n)
	}
}
