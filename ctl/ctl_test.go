package ctl

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// asNobody, in the environment, makes the test binary run splicectl as
// user nobody (see TestMain) with the arguments in the environment,
// separated by newlines, and print its exit status after its output.
const asNobody = "SPLICECTL_TEST_AS_NOBODY"

func TestMain(m *testing.M) {
	if args := os.Getenv(asNobody); args != "" {
		if err := syscall.Setgid(65534); err != nil {
			fmt.Println("setgid:", err)
			os.Exit(3)
		}
		if err := syscall.Setuid(65534); err != nil {
			fmt.Println("setuid:", err)
			os.Exit(3)
		}
		code := Run(strings.Split(args, "\n"), os.Stdout, os.Stdout)
		fmt.Printf("exit %d\n", code)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runAsNobody runs splicectl with args as user nobody and returns what
// it printed and its exit status.
func runAsNobody(t *testing.T, args ...string) (string, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (to run splicectl as another user), as make test runs")
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), asNobody+"="+strings.Join(args, "\n"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("splicectl as nobody: %v: %s", err, out)
	}
	s := strings.TrimSpace(string(out))
	i := strings.LastIndex(s, "exit ")
	if i < 0 {
		t.Fatalf("splicectl as nobody printed no exit status: %s", out)
	}
	code, _ := strconv.Atoi(s[i+len("exit "):])
	return s[:i], code
}

// controlSocket serves an answer to everything on a Unix socket in a
// directory anyone may search, with the mode and group given, and
// returns its path.
func controlSocket(t *testing.T, mode os.FileMode, gid int) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	path := filepath.Join(dir, "spliced.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("{}"))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if err := os.Chown(path, 0, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestSocketNotPermitted: a user who may not use the control socket got
// Go's `Get "http://spliced/v1/status": dial unix PATH: connect:
// permission denied`, which names neither the cause nor the fix. The
// message now says who may use the socket and how to become one of them.
func TestSocketNotPermitted(t *testing.T) {
	path := controlSocket(t, 0o600, 0)
	out, code := runAsNobody(t, "-s", path, "status")
	if code != 1 {
		t.Errorf("exit %d, want 1: %s", code, out)
	}
	for _, want := range []string{"splicectl status: ", "permission", path, "root", "sudo", "control.group"} {
		if !strings.Contains(out, want) {
			t.Errorf("%q lacks %q", out, want)
		}
	}
	if strings.Contains(out, "http://") {
		t.Errorf("%q shows the request's internal URL", out)
	}

	gr, err := user.LookupGroup("daemon")
	if err != nil {
		t.Fatal(err)
	}
	gid, _ := strconv.Atoi(gr.Gid)
	path = controlSocket(t, 0o660, gid)
	out, code = runAsNobody(t, "-s", path, "flows")
	if code != 1 {
		t.Errorf("exit %d, want 1: %s", code, out)
	}
	for _, want := range []string{"splicectl flows: ", "permission", path, `group "daemon"`, "sudo"} {
		if !strings.Contains(out, want) {
			t.Errorf("%q lacks %q", out, want)
		}
	}
}

// TestNotRunning: nothing at the socket's path, or nothing listening
// there: splicectl says the daemon is not running, and exits 1.
func TestNotRunning(t *testing.T) {
	var out bytes.Buffer
	path := filepath.Join(t.TempDir(), "spliced.sock")
	if code := Run([]string{"-s", path, "status"}, &out, &out); code != 1 || !strings.Contains(out.String(), "spliced is not running") {
		t.Errorf("exit %d: %s", code, out.String())
	}
}

// serveEvents serves h as a daemon's control socket and returns its path.
func serveEvents(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "spliced.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

// TestWatchEnds: `splicectl watch` printed a daemon's error answer as an
// empty event, and a stream the daemon ended (it stopped or restarted)
// ended the command quietly with status 0, as if it had been followed to
// its end: a script behind `splicectl -j watch` could not tell. Both are
// failures now, with a message that says what happened.
func TestWatchEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    http.HandlerFunc
		want []string
	}{
		{"error answer", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error":"no such API call: GET /v1/events (this daemon speaks v2)"}` + "\n"))
		}, []string{"splicectl watch: no such API call"}},
		{"stream ended", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"time":"2024-01-01T00:00:00Z","kind":"subscribed"}` + "\n"))
		}, []string{"subscribed", "splicectl watch: the event stream ended: spliced stopped or restarted"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, args := range [][]string{{"watch"}, {"-j", "watch"}} {
				var out bytes.Buffer
				code := Run(append([]string{"-s", serveEvents(t, tc.h)}, args...), &out, &out)
				if code != 1 {
					t.Errorf("%v: exit %d, want 1: %q", args, code, out.String())
				}
				for _, want := range tc.want {
					if !strings.Contains(out.String(), want) {
						t.Errorf("%v: %q lacks %q", args, out.String(), want)
					}
				}
				if regexp.MustCompile(`(?m)^00:00:00\.000 *$`).MatchString(out.String()) || strings.Contains(out.String(), `"kind":""`) {
					t.Errorf("%v: an empty event printed: %q", args, out.String())
				}
			}
		})
	}
}

// TestFlowsBadState: an unknown -state is a usage error (status 2) that
// names the states, said before any daemon is asked: it was sent to the
// daemon, and without one splicectl said only that spliced is not
// running.
func TestFlowsBadState(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none.sock")
	var out bytes.Buffer
	code := Run([]string{"-s", path, "flows", "-state", "bogus"}, &out, &out)
	if code != 2 || !strings.Contains(out.String(), `-state "bogus"`) || !strings.Contains(out.String(), "proxied, splicing, spliced, closing") {
		t.Fatalf("exit %d, %q; want 2 and the states", code, out.String())
	}
}
