package gateway

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/splice/bpf"
)

// RunDir holds what must outlive a daemon killed with SIGKILL, such as
// the value of a sysctl it changed (the systemd unit's RuntimeDirectory).
var RunDir = "/run/spliced"

// errTableLocked is lockTable's error when another daemon holds the
// table, errShared lockDaemon's when one on another table uses the
// same kernel.mark or kernel.route_table.
var (
	errTableLocked = errors.New("table locked")
	errShared      = errors.New("policy routing shared")
)

// lockPath is the file whose lock marks the daemon of table inet TABLE
// in this process's network namespace. It lives in RunDir, which only
// root may write: the lock was an abstract socket address before, which
// any local user could bind first (abstract addresses have no
// permissions) and so keep spliced from starting, and spliced -cleanup
// from removing a dead daemon's table. The namespace is named by its
// cookie (unique for the boot; Linux 5.14), else by the inode of
// /proc/self/ns/net, else not at all (a chroot without /proc on an
// older kernel: one namespace is all it sees).
func lockPath(table string) string { return lockPathOf("table-" + table) }

// lockPathOf is lockPath for the lock named name.
func lockPathOf(name string) string { return runPath(name, "lock") }

// runPath is the path in RunDir of name's file of kind ext for this
// process's network namespace (see lockPath).
func runPath(name, ext string) string {
	if c, err := bpf.NetNSCookie(); err == nil {
		name += fmt.Sprintf(".netns-cookie-%d", c)
	} else {
		var st unix.Stat_t
		if err := unix.Stat("/proc/self/ns/net", &st); err == nil {
			name += fmt.Sprintf(".netns-%d-%d", st.Dev, st.Ino)
		}
	}
	return filepath.Join(RunDir, name+"."+ext)
}

// lockTable takes the lock of table inet TABLE in this process's network
// namespace: an exclusive flock of lockPath, held until unlock or the
// process's end (the kernel drops it at a kill -9 too). A second daemon
// on the same table would take over the first one's table (the two then
// restore their own in turn, for ever), and -cleanup would remove it and
// reset its flows. The file holds the holder's pid, for the message.
func lockTable(table string) (unlock func(), err error) {
	return lockFile(lockPath(table), errTableLocked, func(holder string) string {
		return fmt.Sprintf("another spliced%s runs on table inet %s in this network namespace; stop it first, or give this one its own kernel.table, kernel.queue, kernel.mark and kernel.route_table (and listen ports)",
			holder, table)
	})
}

// lockDaemon takes the locks of a daemon (or a -cleanup) of cfg: its
// table's (lockTable), and those of the settings a daemon on another
// table must not share, since its stop removes them: every ip rule with
// its kernel.mark, and the routes of its kernel.route_table. Without
// them a second daemon on its own table but the first one's mark (the
// defaults) started, and its stop removed the first one's policy
// routing: the first one's intercepted flows were routed past its
// sockets until its drift check put the routing back.
func lockDaemon(cfg *config.Config) (unlock func(), err error) {
	unlocks := []func(){}
	release := func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
	u, err := lockTable(cfg.Kernel.Table)
	if err != nil {
		return nil, err
	}
	unlocks = append(unlocks, u)
	for _, r := range []struct{ name, setting string }{
		{fmt.Sprintf("mark-%#x", uint32(cfg.Kernel.Mark)), fmt.Sprintf("kernel.mark %#x", uint32(cfg.Kernel.Mark))},
		{fmt.Sprintf("route-table-%d", cfg.Kernel.RouteTable), fmt.Sprintf("kernel.route_table %d", cfg.Kernel.RouteTable)},
	} {
		u, err := lockFile(lockPathOf(r.name), errShared, func(holder string) string {
			return fmt.Sprintf("another spliced%s in this network namespace uses %s (on another kernel.table); give each daemon its own kernel.mark and kernel.route_table (and kernel.queue): stopping one removes the other's policy routing",
				holder, r.setting)
		})
		if err != nil {
			release()
			return nil, err
		}
		unlocks = append(unlocks, u)
	}
	return release, nil
}

// lockFile takes the lock of path (see lockTable); a lock held by
// another process is the error locked, with what busy says, given
// " (pid N)" or "".
func lockFile(path string, locked error, busy func(holder string) string) (unlock func(), err error) {
	for tries := 0; ; tries++ {
		// Another daemon (of another table or namespace) that stops
		// removes the run directory once it is empty (see unlock
		// below), maybe between our MkdirAll and our open (ENOENT), or
		// inside MkdirAll, after its mkdir found the directory and
		// before its check that it is one (EEXIST): then try again.
		err := os.MkdirAll(RunDir, 0o755)
		if errors.Is(err, fs.ErrExist) && tries < 100 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w (spliced runs as root)", path, err)
		}
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, unix.ENOENT) && tries < 100 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%w: %s", locked, busy(lockHolder(path)))
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// The holder before may have removed the file between our open
		// and our lock (unlock removes it while it holds the lock): a
		// lock on a removed file locks nothing; take the new one.
		var held, now unix.Stat_t
		if unix.Fstat(fd, &held) != nil || unix.Stat(path, &now) != nil || held.Ino != now.Ino || held.Dev != now.Dev {
			unix.Close(fd)
			continue
		}
		unix.Ftruncate(fd, 0)
		unix.Pwrite(fd, []byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		return func() {
			// Under the lock (see above), and only the file locked: if
			// the run directory was removed meanwhile (systemd removes
			// its RuntimeDirectory when the unit stops), the path may
			// be another daemon's lock now.
			var now unix.Stat_t
			if unix.Stat(path, &now) == nil && now.Ino == held.Ino && now.Dev == held.Dev {
				unix.Unlink(path)
			}
			unix.Close(fd)
			// Without systemd (whose RuntimeDirectory it is) nobody
			// else removes the directory; one that still holds
			// something stays.
			unix.Rmdir(RunDir)
		}, nil
	}
}

// lockHolder names the process that holds a table's lock, as " (pid N)",
// or "" when it cannot tell.
func lockHolder(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return ""
	}
	return fmt.Sprintf(" (pid %d)", pid)
}
