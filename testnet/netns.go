package testnet

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// NS is a named network namespace created by `ip netns add`. It is bound
// under /run/netns, so `ip netns exec` and library calls that take a
// namespace file descriptor can both reach it.
type NS struct {
	Name string
}

// Path is the namespace's bind mount, usable with setns(2).
func (n *NS) Path() string { return "/run/netns/" + n.Name }

// Open returns a file descriptor of the namespace for libraries that take
// one (nftables.WithNetNSFd, netlink Config.NetNS). The caller closes it.
func (n *NS) Open() (int, error) {
	fd, err := unix.Open(n.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	return fd, nil
}

// Do runs fn on an OS thread that has entered the namespace. Sockets that
// fn creates belong to the namespace for their whole life and may be used
// from any goroutine afterwards; goroutines that fn starts do NOT run in
// the namespace.
//
// The thread is returned to the runtime only if switching back to the
// original namespace succeeded; otherwise it stays locked and the runtime
// terminates it when the goroutine exits, so no other goroutine can ever
// run inside the test namespace by accident.
func (n *NS) Do(fn func() error) error {
	target, err := n.Open()
	if err != nil {
		return err
	}
	defer unix.Close(target)

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", n.Name, err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Stay locked: the runtime kills this thread on goroutine exit.
			errc <- fmt.Errorf("leave netns %s: %w (after fn: %v)", n.Name, err, fnErr)
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Command returns a command that runs inside the namespace through
// `ip netns exec`.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	full := append([]string{"netns", "exec", n.Name, name}, args...)
	return exec.CommandContext(ctx, "ip", full...)
}

// Run runs a command inside the namespace and returns its standard output.
// A failure carries the command line and its standard error.
func (n *NS) Run(name string, args ...string) (string, error) {
	cmd := n.Command(context.Background(), name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("[%s] %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// MustRun is Run for setup steps whose failure means the lab is unusable.
func (n *NS) MustRun(name string, args ...string) string {
	out, err := n.Run(name, args...)
	if err != nil {
		panic(err)
	}
	return out
}

// Sysctl sets a sysctl inside the namespace, e.g.
// Sysctl("net.ipv4.tcp_rmem", "4096 131072 6291456").
func (n *NS) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error {
		// /proc/sys/net reflects the namespace of the thread that opens it.
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%q in %s: %w", key, value, n.Name, err)
		}
		return nil
	})
}

// ReadSysctl reads a sysctl inside the namespace.
func (n *NS) ReadSysctl(key string) (string, error) {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	var v []byte
	err := n.Do(func() (err error) {
		v, err = os.ReadFile(path)
		return err
	})
	return strings.TrimSpace(string(v)), err
}

// Counters reads the namespace's protocol counters, what nstat shows
// (/proc/net/snmp and /proc/net/netstat), keyed by group and name:
// "Tcp.RetransSegs", "TcpExt.TCPTimeouts".
func (n *NS) Counters() (map[string]uint64, error) {
	out := map[string]uint64{}
	err := n.Do(func() error {
		for _, file := range []string{"snmp", "netstat"} {
			// thread-self: /proc/net is the process's namespace, not
			// this thread's.
			b, err := os.ReadFile("/proc/thread-self/net/" + file)
			if err != nil {
				return err
			}
			// Pairs of lines: "Group: names..." then "Group: values...".
			lines := strings.Split(string(b), "\n")
			for i := 0; i+1 < len(lines); i += 2 {
				names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
				if len(names) < 2 || len(values) != len(names) || names[0] != values[0] {
					continue
				}
				group := strings.TrimSuffix(names[0], ":")
				for j := 1; j < len(names); j++ {
					// Tcp MaxConn is -1: signed, where counters are not.
					v, err := strconv.ParseInt(values[j], 10, 64)
					if err == nil && v >= 0 {
						out[group+"."+names[j]] = uint64(v)
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("counters of %s: %w", n.Name, err)
	}
	return out, nil
}

func syscallClose(fd int) { unix.Close(fd) }
