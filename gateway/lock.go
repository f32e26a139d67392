package gateway

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// RunDir holds what must outlive a daemon killed with SIGKILL, such as
// the value of a sysctl it changed (the systemd unit's RuntimeDirectory).
var RunDir = "/run/spliced"

// errTableLocked is lockTable's error when another daemon holds the table.
var errTableLocked = errors.New("table locked")

// lockName is the abstract socket address that marks the table's daemon.
// Abstract socket addresses belong to a network namespace and need no
// file, and the kernel frees them when the process ends (kill -9 too).
func lockName(table string) string { return "@spliced/table/" + table }

// lockTable takes the lock of table inet TABLE in this process's network
// namespace: a listening socket bound to lockName, held until unlock or
// the process's end. A second daemon on the same table would take over
// the first one's table (the two then restore their own in turn, for
// ever), and -cleanup would remove it and reset its flows.
func lockTable(table string) (unlock func(), err error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock table inet %s: %w", table, err)
	}
	addr := &unix.SockaddrUnix{Name: lockName(table)}
	if err := unix.Bind(fd, addr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("%w: another spliced%s runs on table inet %s in this network namespace; stop it first, or give this one its own kernel.table (and ports)",
				errTableLocked, lockHolder(addr), table)
		}
		return nil, fmt.Errorf("lock table inet %s: %w", table, err)
	}
	// Listening lets another daemon ask who holds it (lockHolder).
	if err := unix.Listen(fd, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock table inet %s: %w", table, err)
	}
	return func() { unix.Close(fd) }, nil
}

// lockHolder names the process that holds a table's lock, as " (pid N)",
// or "" when it cannot tell.
func lockHolder(addr *unix.SockaddrUnix) string {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, addr); err != nil {
		return ""
	}
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil || cred.Pid == 0 {
		return ""
	}
	return fmt.Sprintf(" (pid %d)", cred.Pid)
}
