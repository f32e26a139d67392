package gateway

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/api"
	"spliced/config"
)

func controlTestGateway() *Gateway {
	return New(&config.Config{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// TestControlSocketKeepsOtherFiles: a control.socket (or -socket) that
// names an existing file that is not a socket, by a typo or a wrong
// path, deleted that file without a word and put the socket in its place.
func TestControlSocketKeepsOtherFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "spliced.yaml")
	if err := os.WriteFile(path, []byte("precious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err == nil {
		stop()
	}
	data, rerr := os.ReadFile(path)
	if rerr != nil || string(data) != "precious\n" {
		t.Fatalf("the file at the socket's path is gone or changed (%v); serveControl said %v", rerr, err)
	}
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("want a refusal naming the file, got %v", err)
	}
}

// TestControlSocketStaleReplaced: a stale socket (its daemon died) is
// replaced.
func TestControlSocketStaleReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	stop()
}

// TestControlSocketNeverOpenToOthers: the socket used to be bound at its
// path and chmod'ed after: with umask 0 it was there, mode 0777, until
// the chmod, and a connection made then is served later. It now has its
// mode from the bind on (and a first version, bound in a directory of
// its own and renamed, failed where the path is near the 107-byte limit
// of a socket address: TestLabLegDifferences' temporary directories).
func TestControlSocketNeverOpenToOthers(t *testing.T) {
	dir := t.TempDir()
	// As long as a socket address takes: no room for another directory.
	path := filepath.Join(dir, strings.Repeat("s", 107-len(dir)-1))
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	seen := false
	afterControlBind = func(p string) {
		seen = true
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("the socket is at %s with mode %v before its chmod; want no bits for others", p, fi.Mode().Perm())
		}
	}
	defer func() { afterControlBind = func(string) {} }()
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if !seen {
		t.Fatal("the bind was not seen")
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want a socket of mode 0600", path, fi.Mode())
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the socket does not answer at its path: %v", err)
	}
	c.Close()
	// A short name in a directory as long as the limit allows.
	deep := filepath.Join(dir, strings.Repeat("d", 107-len(dir)-1-len("/s.sock")))
	if err := os.Mkdir(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	stop2, err := controlTestGateway().serveControl(context.Background(), filepath.Join(deep, "s.sock"), "")
	if err != nil {
		t.Fatal(err)
	}
	stop2()
}

// TestControlSocketGroup: with control.group the socket is root's and the
// group's, mode 0660, so the group's members may use splicectl.
func TestControlSocketGroup(t *testing.T) {
	gr, err := user.LookupGroup("daemon")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "s.sock")
	stop, err := controlTestGateway().serveControl(context.Background(), path, "daemon")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o660 || fmt.Sprint(st.Gid) != gr.Gid || st.Uid != 0 {
		t.Errorf("%s: mode %v, owner %d:%d; want 0660, 0:%s", path, fi.Mode().Perm(), st.Uid, st.Gid, gr.Gid)
	}
	if _, err := controlTestGateway().serveControl(context.Background(), filepath.Join(t.TempDir(), "t.sock"), "no-such-group-here"); err == nil || !strings.Contains(err.Error(), "control.group") {
		t.Errorf("an unknown group: %v; want an error naming control.group", err)
	}
}

// TestControlSocketDirWritableByOthers: in a directory others may write
// to (no sticky bit), someone can swap the socket for a symbolic link
// between net.Listen and the chown/chmod that follow it, and have
// spliced chown and chmod any file (0660 to control.group). Refused.
func TestControlSocketDirWritableByOthers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	stop, err := controlTestGateway().serveControl(context.Background(), filepath.Join(dir, "s.sock"), "")
	if err == nil {
		stop()
		t.Fatal("a control socket in a directory everyone may write to was accepted")
	}
	if !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("error does not say why: %v", err)
	}
}

// TestControlIdleConnectionsClose: a client of the control socket that
// leaves connections open must not hold the daemon's descriptors for
// ever: a connection idle after its request closes after
// controlIdleTimeout.
func TestControlIdleConnectionsClose(t *testing.T) {
	idle := controlIdleTimeout
	controlIdleTimeout = 300 * time.Millisecond
	defer func() { controlIdleTimeout = idle }()
	path := filepath.Join(t.TempDir(), "s.sock")
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// One request and its response (any: an unknown path's 404 does).
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /"+api.Version+"/nothing HTTP/1.1\r\nHost: spliced\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if _, err := r.ReadByte(); err != io.EOF {
		t.Errorf("an idle control connection: read %v, want EOF (closed by the daemon)", err)
	}
}

// TestControlRequestBodyNeverSent: the API takes no request body, but a
// request that declared one (a Content-Length, or chunked) and never sent
// it got no answer and held its connection, and the daemon's descriptor,
// for ever: the server waits for the body before it answers (and after,
// to reuse the connection), with no deadline on the control socket. It is
// answered at once, and the connection closed.
func TestControlRequestBodyNeverSent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for _, req := range []string{
		"GET /" + api.Version + "/status HTTP/1.1\r\nHost: spliced\r\nContent-Length: 10\r\n\r\n",
		"POST /" + api.Version + "/flows/1/splice HTTP/1.1\r\nHost: spliced\r\nContent-Length: 10\r\n\r\n",
		"POST /" + api.Version + "/flows/1/unsplice HTTP/1.1\r\nHost: spliced\r\nTransfer-Encoding: chunked\r\n\r\n",
	} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(c)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			c.Close()
			t.Fatalf("%q: no answer while its body does not come: %v", req, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "no request body") {
			t.Errorf("%q: %s %s; want 400 saying the API takes no request body", req, resp.Status, body)
		}
		if _, err := r.ReadByte(); err != io.EOF {
			t.Errorf("%q: after the answer, read %v; want EOF (closed by the daemon)", req, err)
		}
		c.Close()
	}
	// splicectl's requests, POSTs included, carry none and are served.
	if _, err := api.NewClient(path).Splice(context.Background(), 1); err == nil || !strings.Contains(err.Error(), "no flow 1") {
		t.Errorf("splice of an unknown flow through the API's client: %v; want no flow 1", err)
	}
}

// TestControlSocketAncestorsChecked: only the socket's own directory was
// checked. Its parent writable by others (no sticky bit), or a symbolic
// link on the way that another user owns, lets that user replace the
// directory, with everything in it, between the bind and the chown and
// chmod that follow the path, and have spliced chown and chmod a file of
// their choosing. Refused, naming the culprit.
func TestControlSocketAncestorsChecked(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o777)
	inner := filepath.Join(open, "d")
	if err := os.Mkdir(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	stop, err := controlTestGateway().serveControl(context.Background(), filepath.Join(inner, "s.sock"), "")
	if err == nil {
		stop()
		t.Error("a control socket below a directory everyone may write to was accepted")
	} else if !strings.Contains(err.Error(), open) || !strings.Contains(err.Error(), "writable by others") {
		t.Errorf("error does not name %s and why: %v", open, err)
	}

	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	stop, err = controlTestGateway().serveControl(context.Background(), filepath.Join(link, "s.sock"), "")
	if err == nil {
		stop()
		t.Error("a control socket through another user's symbolic link was accepted")
	} else if !strings.Contains(err.Error(), link) || !strings.Contains(err.Error(), "belongs to user 65534") {
		t.Errorf("error does not name %s and its owner: %v", link, err)
	}

	// Root's own link to a directory of root's (as /var/run to /run) is fine.
	if err := os.Lchown(link, 0, 0); err != nil {
		t.Fatal(err)
	}
	stop, err = controlTestGateway().serveControl(context.Background(), filepath.Join(link, "s.sock"), "")
	if err != nil {
		t.Fatal(err)
	}
	stop()
}

// TestControlStopEndsEventStreams: a stop of the control socket ends the
// event streams (splicectl watch) open on it. It waited for them, 2 s,
// and then left them open: every stop of the daemon took 2 s longer
// while someone watched, and the watcher learnt of it only when the
// process was gone.
func TestControlStopEndsEventStreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	stop, err := controlTestGateway().serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		stop()
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /"+api.Version+"/events HTTP/1.1\r\nHost: spliced\r\n\r\n"); err != nil {
		stop()
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		stop()
		t.Fatal(err)
	}
	first, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || !strings.Contains(first, api.EventSubscribed) {
		stop()
		t.Fatalf("first event %q, %v; want the subscription", first, err)
	}
	stop()
	// The stream ends (its last chunk, or the connection's close): a
	// read gets EOF, not the deadline's timeout.
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("the event stream after the stop: %v (read %q); want its end", err, rest)
	}
}

// TestControlStopEndsStalledEventStreams: a watcher that stops reading
// (splicectl watch piped into a pager left open, or suspended) left the
// stream's handler blocked in a write once the socket's buffer was full:
// the stop's cancel, which ends an event stream, did not reach it. The
// stop waited for it, 2 s, every time, and left it blocked.
func TestControlStopEndsStalledEventStreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	g := controlTestGateway()
	stop, err := g.serveControl(context.Background(), path, "")
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /"+api.Version+"/events HTTP/1.1\r\nHost: spliced\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	for g.events.n.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	// Events until the handler stops taking them, blocked writing to a
	// client that reads nothing: its channel stays full and the bytes
	// waiting at the client stop growing.
	detail := strings.Repeat("x", 64<<10)
	lost := func() int {
		g.events.mu.Lock()
		defer g.events.mu.Unlock()
		for _, n := range g.events.subs {
			return *n
		}
		return 0
	}
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	unread := func() (n int) {
		raw.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		return n
	}
	for last, still := -1, 0; still < 20; {
		g.events.publish(api.Event{Kind: "test", Detail: detail})
		if lost() == 0 {
			continue
		}
		time.Sleep(5 * time.Millisecond)
		if n := unread(); n == last {
			still++
		} else {
			last, still = n, 0
		}
	}
	stop()
	stopped = true
	if err := pollFor(func() bool { return g.events.n.Load() == 0 }); err != nil {
		t.Fatal("the stalled event stream did not end after the stop")
	}
}
