package nfq

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// inNetNS runs fn on a thread that entered the namespace behind fd; a
// socket fn creates stays in that namespace. The thread goes back to the
// runtime only if it could leave the namespace again.
func inNetNS(fd int, fn func() (int, error)) (int, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, err}
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("enter netns: %w", err)}
			return
		}
		s, ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			ch <- result{s, ferr} // stay locked: the thread dies with the goroutine
			return
		}
		runtime.UnlockOSThread()
		ch <- result{s, ferr}
	}()
	r := <-ch
	return r.fd, r.err
}
