package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/api"
	"spliced/testnet"
)

// TestLabWallClockStep: the wall clock steps forward by 30 s (NTP
// setting the time of a router without a battery-backed clock, some
// time after boot) and back, while idle flows are open, proxied, spliced
// on NFQUEUE and on the bpf datapath, with an idle_timeout of 15 s. No
// flow is taken for idle: each still carries bytes both ways after each
// step. Before the daemon kept its times on the monotonic clock, every
// spliced flow was reset as idle at the reaper's next round, and every
// proxied one was closed as idle when its next bytes came.
//
// The wall clock is the host's (no namespace has its own): it is off by
// the step for about three seconds, and put back to its offset from the
// monotonic clock before the step, also when the test fails (not when the
// process dies meanwhile: the step is small for that reason, twice the
// idle timeout).
func TestLabWallClockStep(t *testing.T) {
	// Not in parallel: it steps the host's wall clock, which no
	// namespace has its own of, under whatever test runs beside it
	// (wrk, nginx's rate limit and lftp time out by it).
	for _, c := range []struct{ name, mode, extra string }{
		{"copy", "copy", ""}, {"splice", "splice", ""}, {"splice-bpf", "splice", "  datapath: bpf\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			cfg := strings.Replace(faultConfig(c.mode, c.extra), "    splice:", "    idle_timeout: 15s\n    splice:", 1)
			d := testnet.StartDaemon(t, lab, cfg)
			dst := netip.AddrPortFrom(lab.Server().IPv4, 5001)
			ln, err := lab.Server().Listen(dst)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			const flows = 8
			var pairs [][2]*net.TCPConn // client end, server end
			for range flows {
				cl, sv := labPair(t, lab, ln, dst)
				pairs = append(pairs, [2]*net.TCPConn{cl, sv})
			}
			if err := exchangeAll(pairs, "before"); err != nil {
				t.Fatal(err)
			}
			if c.mode == "splice" {
				want := "nfqueue"
				if c.extra != "" {
					want = "bpf"
				}
				testnet.Eventually(t, 15*time.Second, func() error {
					fl, err := d.Client().Flows(context.Background(), api.FlowFilter{})
					if err != nil {
						return err
					}
					on := 0
					for _, f := range fl {
						if f.State == api.StateSpliced && f.Datapath == want {
							on++
						}
					}
					if on < flows {
						return fmt.Errorf("%d of %d flows spliced on %s", on, flows, want)
					}
					return nil
				})
				// Data after the splice: the flows' last packets went
				// through the datapath that holds them.
				if err := exchangeAll(pairs, "spliced"); err != nil {
					t.Fatal(err)
				}
			}

			// Idle first, as a flow that waits for its next bytes: the
			// last segments' delayed ACKs (200 ms at most) are through,
			// and a relay's directions have left their busy spell (a
			// second after the last bytes, then a second without any).
			time.Sleep(2500 * time.Millisecond)
			restore := stepWallClock(t, 30*time.Second)
			time.Sleep(3 * time.Second) // the reaper's rounds, a relay's quiet spell
			if err := exchangeAll(pairs, "after the step forward"); err != nil {
				restore()
				t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
			}
			restore()
			time.Sleep(2 * time.Second)
			if err := exchangeAll(pairs, "after the step back"); err != nil {
				t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
			}
			if l := d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow closed" }); l != nil {
				t.Errorf("a flow closed: %v", l)
			}
			if c.mode == "splice" {
				st, err := d.Client().Status(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if st.Flows[api.StateSpliced] != flows {
					t.Errorf("%d flows spliced after the steps, want %d", st.Flows[api.StateSpliced], flows)
				}
			}
		})
	}
}

// exchangeAll sends a line each way on every pair (client end, server
// end) at once and reads it at the other end.
func exchangeAll(pairs [][2]*net.TCPConn, when string) error {
	var wg sync.WaitGroup
	errs := make([]error, len(pairs))
	for i, p := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte(fmt.Sprintf("%s %d\n", when, i))
			for dir, ends := range [][2]*net.TCPConn{{p[0], p[1]}, {p[1], p[0]}} {
				ends[1].SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := ends[0].Write(msg); err != nil {
					errs[i] = fmt.Errorf("flow %d, %s, direction %d: write: %w", i, when, dir, err)
					return
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(ends[1], got); err != nil || string(got) != string(msg) {
					errs[i] = fmt.Errorf("flow %d, %s, direction %d: read %q: %v", i, when, dir, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	var failed []string
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err.Error())
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d flows failed:\n%s", len(failed), len(pairs), strings.Join(failed, "\n"))
	}
	return nil
}

// stepWallClock moves the host's wall clock (CLOCK_REALTIME) by step and
// returns the function that puts it back: to its offset from the
// monotonic clock before the step, so that the host keeps the time it had.
// The test's cleanup puts it back too.
func stepWallClock(t *testing.T, step time.Duration) (restore func()) {
	t.Helper()
	var mono, wall unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono); err != nil {
		t.Fatal(err)
	}
	if err := unix.ClockGettime(unix.CLOCK_REALTIME, &wall); err != nil {
		t.Fatal(err)
	}
	offset := wall.Nano() - mono.Nano()
	var once sync.Once
	restore = func() {
		once.Do(func() {
			var now unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
				t.Error(err)
				return
			}
			back := unix.NsecToTimespec(now.Nano() + offset)
			if err := unix.ClockSettime(unix.CLOCK_REALTIME, &back); err != nil {
				t.Errorf("put the wall clock back: %v", err)
			}
		})
	}
	t.Cleanup(restore)
	ahead := unix.NsecToTimespec(wall.Nano() + int64(step))
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ahead); err != nil {
		t.Fatalf("step the wall clock: %v", err)
	}
	return restore
}
