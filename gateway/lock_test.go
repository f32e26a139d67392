package gateway

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"spliced/config"
)

// withRunDir points RunDir at a fresh directory, as /run/spliced is:
// root's, mode 0755.
func withRunDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	old := RunDir
	RunDir = dir
	t.Cleanup(func() { RunDir = old })
	return dir
}

// TestTableLockExclusive: one holder per table and network namespace,
// named by its pid; the lock and its file go with unlock.
func TestTableLockExclusive(t *testing.T) {
	withRunDir(t)
	unlock, err := lockTable("locktest")
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockTable("locktest")
	if !errors.Is(err, errTableLocked) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d)", os.Getpid())) {
		t.Errorf("second lock: %v; want errTableLocked naming pid %d", err, os.Getpid())
	}
	other, err := lockTable("othertable")
	if err != nil {
		t.Errorf("another table's lock: %v", err)
	} else {
		other()
	}
	unlock()
	if _, err := os.Stat(lockPath("locktest")); !os.IsNotExist(err) {
		t.Errorf("lock file after unlock: %v", err)
	}
	again, err := lockTable("locktest")
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	again()
}

// TestTableLockRunDirRace: daemons of two tables that start and stop at
// once. The one that stops removes the run directory once it is empty,
// which may fall between the other's creating the directory and opening
// its lock file there; that open must not fail the start (it did, with
// "no such file or directory", when lab tests ran daemons in parallel).
func TestTableLockRunDirRace(t *testing.T) {
	withRunDir(t)
	RunDir = filepath.Join(RunDir, "run") // one that unlock may remove
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, table := range []string{"racea", "raceb"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 2000 {
				unlock, err := lockTable(table)
				if err != nil {
					errs <- err
					return
				}
				unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// squatTable, in the environment, makes the test binary the squatter of
// TestTableLockNotSquattable (see TestMain): as user nobody it tries to
// take the table's lock, and binds the abstract address that was the
// lock before, then waits until its stdin closes.
const squatTable = "SPLICED_SQUAT_TABLE"

func squatter(table string) {
	RunDir = os.Getenv("SPLICED_SQUAT_RUNDIR")
	if err := syscall.Setgid(65534); err != nil {
		fmt.Println("setgid:", err)
		return
	}
	if err := syscall.Setuid(65534); err != nil {
		fmt.Println("setuid:", err)
		return
	}
	_, err := lockTable(table)
	fd, _ := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	unix.Bind(fd, &unix.SockaddrUnix{Name: "@spliced/table/" + table})
	fmt.Printf("squatter done: %v\n", err)
	bufio.NewReader(os.Stdin).ReadString('\n') // until the parent is done
}

// TestTableLockNotSquattable: the table lock was an abstract Unix socket
// address, which any local user of the network namespace could bind
// first (abstract addresses have no permissions), keeping spliced from
// starting and spliced -cleanup (the unit's ExecStopPost) from removing
// a dead daemon's table. A user other than root can take the lock now
// neither way.
func TestTableLockNotSquattable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (to run a process as another user), as make test runs")
	}
	dir := withRunDir(t)
	const table = "squattest"
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), squatTable+"="+table, "SPLICED_SQUAT_RUNDIR="+dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	br := bufio.NewReader(stdout)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("squatter: %v", err)
		}
		if strings.HasPrefix(line, "squatter done: ") {
			if strings.Contains(line, "<nil>") {
				t.Errorf("user nobody took the table's lock")
			}
			break
		}
	}
	unlock, err := lockTable(table)
	if err != nil {
		t.Fatalf("root, with user nobody squatting: %v", err)
	}
	unlock()
}

// TestDaemonLockSharedRouting: a daemon on another table but the same
// kernel.mark or kernel.route_table is refused (its stop would remove
// the first one's policy routing), naming the setting; one with its
// own of both gets its locks, and every lock file goes with unlock.
func TestDaemonLockSharedRouting(t *testing.T) {
	dir := withRunDir(t)
	cfg := func(table string, mark, routeTable uint32) *config.Config {
		c := &config.Config{}
		c.Kernel.Table, c.Kernel.Mark, c.Kernel.RouteTable = table, config.Hex32(mark), routeTable
		return c
	}
	unlock, err := lockDaemon(cfg("first", 0x5c1, 100))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		cfg      *config.Config
		sentinel error
		want     string
	}{
		{cfg("first", 0x10, 200), errTableLocked, "runs on table inet first"},
		{cfg("second", 0x5c1, 200), errShared, "uses kernel.mark 0x5c1"},
		{cfg("second", 0x10, 100), errShared, "uses kernel.route_table 100"},
	} {
		_, err := lockDaemon(c.cfg)
		if !errors.Is(err, c.sentinel) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d)", os.Getpid())) {
			t.Errorf("table %s, mark %#x, route table %d: %v; want %v with %q and the pid", c.cfg.Kernel.Table, uint32(c.cfg.Kernel.Mark), c.cfg.Kernel.RouteTable, err, c.sentinel, c.want)
		}
	}
	other, err := lockDaemon(cfg("second", 0x10, 200))
	if err != nil {
		t.Fatalf("a daemon with its own table, mark and routing table: %v", err)
	}
	other()
	unlock()
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		t.Errorf("left after unlock: %v", ents)
	}
}
