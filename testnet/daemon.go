package testnet

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/api"
)

var build struct {
	once sync.Once
	dir  string
	err  error
	// cmds are the commands built or being built, by name: tests that
	// run in parallel wait for the one build of a command (not for
	// another command's), and never start one half written.
	mu   sync.Mutex
	cmds map[string]*builtCmd
}

type builtCmd struct {
	once sync.Once
	err  error
}

// RemoveBinaries removes what Binary built, for a test binary's TestMain
// to call after its tests ran (each test process builds its own copies:
// about 20 MB a process, which would pile up in the temporary directory).
func RemoveBinaries() {
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
}

// RaceEnv is the environment variable that makes Binary build with the
// race detector even when the test binary itself runs without it (make
// test-race sets it).
const RaceEnv = "SPLICED_RACE"

// Race reports whether Binary builds commands with the race detector:
// when the tests run with -race, or RaceEnv is set to 1.
func Race() bool { return raceEnabled || os.Getenv(RaceEnv) == "1" }

// raceReport marks what the race detector prints on stderr.
const raceReport = "WARNING: DATA RACE"

// Binary builds a command of this module (e.g. "spliced") once per test
// process and returns its path. Under Race it is built with -race, so
// that races inside the daemon are reported on its stderr (StartDaemon
// fails the test on one).
func Binary(t testing.TB, name string) string {
	t.Helper()
	build.once.Do(func() {
		build.dir, build.err = os.MkdirTemp("", "spliced-bin-")
	})
	if build.err != nil {
		t.Fatal(build.err)
	}
	build.mu.Lock()
	if build.cmds == nil {
		build.cmds = map[string]*builtCmd{}
	}
	b := build.cmds[name]
	if b == nil {
		b = &builtCmd{}
		build.cmds[name] = b
	}
	build.mu.Unlock()
	path := filepath.Join(build.dir, name)
	b.once.Do(func() { b.err = buildCmd(name, path) })
	if b.err != nil {
		t.Fatal(b.err)
	}
	return path
}

// buildCmd builds ./cmd/NAME of this module into path.
func buildCmd(name, path string) error {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %v", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	args := []string{"build", "-o", path}
	if Race() {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "./cmd/"+name)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/%s: %v\n%s", name, err, out)
	}
	return nil
}

// Daemon is a spliced process in a lab's gateway namespace, logging JSON.
type Daemon struct {
	Config string // path of its configuration file
	Socket string // path of its control socket
	cmd    *exec.Cmd
	ns     *NS
	bin    string

	mu     sync.Mutex
	client *api.Client // Client's
	raw    []string    // every line logged, appended by the reader
	done   chan struct{}
	err    error

	// The records of raw, parsed when a test asks (Lines): parsing in
	// the reader made it slower than a daemon that logs a thousand
	// splices at debug level, under the race detector, whose writes
	// then blocked on the full pipe with packets held (transitions
	// took seconds).
	parseMu sync.Mutex
	lines   []map[string]any
	parsed  int // lines of raw parsed into lines
}

// StartDaemon writes config to a file and runs `spliced -config FILE` in
// the gateway namespace, waiting until it logs "ready". The daemon is
// stopped (SIGTERM) in t.Cleanup if still running.
func StartDaemon(t testing.TB, lab *Lab, config string, args ...string) *Daemon {
	t.Helper()
	d, err := LaunchDaemon(lab, Binary(t, "spliced"), t.TempDir(), config, append([]string{"-log-level", "debug"}, args...)...)
	if d != nil {
		t.Cleanup(func() {
			d.Stop()
			d.CheckRaces(t)
			if t.Failed() {
				t.Logf("daemon log:\n%s", d.Log())
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// LaunchDaemon is StartDaemon without a test (and without forcing debug
// logs): bin is the spliced binary, dir receives the configuration file
// and the control socket. On error after the start, the
// returned Daemon is still running and must be stopped.
func LaunchDaemon(lab *Lab, bin, dir, config string, args ...string) (*Daemon, error) {
	d := &Daemon{Config: filepath.Join(dir, "spliced.yaml"), Socket: filepath.Join(dir, "spliced.sock"), ns: &lab.Gateway.NS, bin: bin}
	if err := os.WriteFile(d.Config, []byte(config), 0o600); err != nil {
		return nil, err
	}
	if err := d.start(args...); err != nil {
		return nil, err
	}
	// Ready when the control API answers: it opens after the kernel state
	// is installed, whatever the log level.
	// A daemon that exited fails at once: polling on took 15 s of the
	// lab tests' time for every start meant to fail.
	client := api.NewClient(d.Socket)
	exited := false
	if err := Poll(15*time.Second, func() error {
		select {
		case <-d.done:
			exited = true
			return nil
		default:
		}
		_, err := client.Status(context.Background())
		return err
	}); err != nil {
		return d, fmt.Errorf("daemon not ready: %w\n%s", err, d.Log())
	}
	if exited {
		return d, fmt.Errorf("daemon not ready: daemon exited: %v\n%s", d.err, d.Log())
	}
	return d, nil
}

// CheckRaces fails t if the daemon (built with -race, see Binary)
// reported a data race on its stderr.
func (d *Daemon) CheckRaces(t testing.TB) {
	t.Helper()
	log := d.Log()
	if i := strings.Index(log, raceReport); i >= 0 {
		t.Errorf("the daemon reported a data race:\n%s", log[i:min(len(log), i+8000)])
	}
}

// Client is an API client for the daemon's control socket.
func (d *Daemon) Client() *api.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	// One client, so that tests that poll reuse its connection instead
	// of leaving one idle at the daemon per call.
	if d.client == nil || d.client.Socket != d.Socket {
		d.client = api.NewClient(d.Socket)
	}
	return d.client
}

func (d *Daemon) start(args ...string) error {
	d.mu.Lock()
	d.client = nil // a connection to an earlier daemon on the socket is stale
	d.mu.Unlock()
	full := append([]string{"-config", d.Config, "-socket", d.Socket, "-log-format", "json"}, args...)
	d.cmd = d.ns.Command(context.Background(), d.bin, full...)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		return err
	}
	d.cmd.Stdout = os.Stdout
	d.done = make(chan struct{})
	if err := d.cmd.Start(); err != nil {
		return fmt.Errorf("start spliced: %w", err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			d.raw = append(d.raw, line)
			d.mu.Unlock()
		}
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	return nil
}

// Log returns everything the daemon logged so far.
func (d *Daemon) Log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.raw, "\n")
}

// Lines returns the JSON log records so far.
func (d *Daemon) Lines() []map[string]any {
	d.parseMu.Lock()
	defer d.parseMu.Unlock()
	d.mu.Lock()
	fresh := d.raw[d.parsed:len(d.raw):len(d.raw)] // the reader appends past its end only
	d.mu.Unlock()
	for _, line := range fresh {
		var m map[string]any
		json.Unmarshal([]byte(line), &m)
		if m != nil {
			d.lines = append(d.lines, m)
		}
	}
	d.parsed += len(fresh)
	return append([]map[string]any(nil), d.lines...)
}

// FindLog returns the first record matching pred, or nil.
func (d *Daemon) FindLog(pred func(map[string]any) bool) map[string]any {
	for _, l := range d.Lines() {
		if pred(l) {
			return l
		}
	}
	return nil
}

// WaitLog waits until a record matching pred appears.
func (d *Daemon) WaitLog(within time.Duration, pred func(map[string]any) bool) error {
	return Poll(within, func() error {
		if d.FindLog(pred) != nil {
			return nil
		}
		select {
		case <-d.done:
			return fmt.Errorf("daemon exited: %v", d.err)
		default:
		}
		return fmt.Errorf("no matching log record")
	})
}

// Stop sends SIGTERM and waits for the daemon to exit; it returns the
// exit error (nil for a clean exit).
func (d *Daemon) Stop() error { return d.signal(syscall.SIGTERM) }

// Kill sends SIGKILL (the daemon gets no chance to clean up) and waits.
func (d *Daemon) Kill() { d.signal(syscall.SIGKILL) }

func (d *Daemon) signal(sig syscall.Signal) error {
	select {
	case <-d.done:
		return d.err
	default:
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("daemon did not exit within 20s of %v", sig)
	}
	return d.err
}

// Wait waits up to within for the daemon to exit (after a signal sent
// with Signal) and returns its exit error.
func (d *Daemon) Wait(within time.Duration) error {
	select {
	case <-d.done:
		return d.err
	case <-time.After(within):
		return fmt.Errorf("daemon still running after %v", within)
	}
}

// Pid is the daemon's process ID.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Signal sends sig to the daemon without waiting.
func (d *Daemon) Signal(sig syscall.Signal) error { return d.cmd.Process.Signal(sig) }

// Run runs the spliced binary with args in the gateway namespace (e.g.
// -cleanup) and returns its combined output.
func (d *Daemon) Run(args ...string) (string, error) {
	out, err := d.ns.Command(context.Background(), d.bin, args...).CombinedOutput()
	return string(out), err
}
