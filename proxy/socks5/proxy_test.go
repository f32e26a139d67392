package socks5

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"spliced/config"
	"spliced/internal/dnstest"
	"spliced/proxy"
	"spliced/testnet"
)

// lab is a SOCKS5 proxy on loopback with an echo server, a closed port
// and a DNS server.
type lab struct {
	p       *Proxy
	addr    string
	echo    netip.AddrPort
	closed  netip.AddrPort
	dns     *dnstest.Server
	accepts atomic.Int64 // connections the echo server accepted
	log     *syncBuffer  // the proxy's log, JSON
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startLab(t testing.TB, extra ...string) *lab {
	t.Helper()
	l := &lab{}
	echo, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			l.accepts.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	l.echo = echo.Addr().(*net.TCPAddr).AddrPort()
	l.closed = testnet.RefusingPort(t)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.dns = dnstest.Serve(pc, map[string][]netip.Addr{
		"echo.test":   {netip.MustParseAddr("127.0.0.1")},
		"denied.test": {netip.MustParseAddr("127.0.0.1")},
		"other.test":  {netip.MustParseAddr("127.0.0.2")},
	})
	t.Cleanup(func() { l.dns.Close() })

	// Cheap hashes: what the tests check does not depend on the cost,
	// and HashCost's (60 ms a check, 730 ms under the race detector)
	// made a burst of logins outlast talk's 5 s guard under -race.
	hashed, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	hash := string(hashed)
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("# test users\nalice:"+hash+"\nbob:"+hash+"\n"), 0o600)
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    connect_timeout: 2s
    splice:
      mode: never
    socks5:
      users_file: %s
      resolver: %s
      resolve_timeout: 300ms
      handshake_timeout: 2s
      failed_logins: 3
      back_off: 1m
%s      auth:
        - sources: [127.0.0.3]
          method: none
      rules:
        - action: deny
          domains: [denied.test]
        - action: deny
          destinations: [127.0.0.2]
        - action: deny
          users: [bob]
        - action: allow             # the test's servers are on loopback
          destinations: [127.0.0.0/8]
`, users, l.dns.Addr(), strings.Join(extra, ""))))
	if err != nil {
		t.Fatal(err)
	}
	l.log = &syncBuffer{}
	l.serve(t, &cfg.Services[0], slog.New(slog.NewJSONHandler(l.log, nil)))
	return l
}

// usersConfig is the configuration of one SOCKS5 service on loopback
// whose users file holds alice and bob (password s3cret, cheap hashes),
// with socks5Keys (YAML lines indented by six spaces) in its socks5
// section.
func usersConfig(t *testing.T, socks5Keys string) *config.Config {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("alice:"+string(hash)+"\nbob:"+string(hash)+"\n"), 0o600)
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    socks5:
      users_file: %s
%s`, users, socks5Keys)))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// serve runs the proxy of svc on loopback until the test ends.
func (l *lab) serve(t testing.TB, svc *config.Service, log *slog.Logger) {
	t.Helper()
	l.serveTable(t, svc, log, proxy.NewFlowTable(100))
}

// serveTable is serve with the flow table tab, which other proxies may
// share.
func (l *lab) serveTable(t testing.TB, svc *config.Service, log *slog.Logger, tab *proxy.FlowTable) {
	t.Helper()
	l.p = newProxy(proxy.Setup{Service: svc, Flows: tab, Log: log})
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { l.p.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done; l.p.CloseFlows() })
}

// talk connects from src, sends in, half-closes unless keepOpen, and
// returns everything read until the proxy closes (or 3 s pass).
func (l *lab) talk(t testing.TB, src string, in []byte, keepOpen bool) []byte {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp4", l.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(in)
	if !keepOpen {
		c.(*net.TCPConn).CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	out, err := io.ReadAll(c)
	if err != nil && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("read: %v (got %x)", err, out)
	}
	return out
}

func login(user, pass string) []byte {
	b := []byte{1, byte(len(user))}
	b = append(b, user...)
	b = append(b, byte(len(pass)))
	return append(b, pass...)
}

func connect4(ap netip.AddrPort) []byte {
	b := []byte{5, CmdConnect, 0, AtypIPv4}
	b = append(b, ap.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func connectName(name string, port uint16) []byte {
	b := []byte{5, CmdConnect, 0, AtypDomain, byte(len(name))}
	b = append(b, name...)
	return binary.BigEndian.AppendUint16(b, port)
}

func cat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

var (
	greetPass = []byte{5, 1, MethodPassword}
	greetNone = []byte{5, 1, MethodNone}
	okPass    = []byte{5, MethodPassword, 1, 0} // method chosen, login accepted
	failReply = func(r Reply) []byte { return []byte{5, byte(r), 0, AtypIPv4, 0, 0, 0, 0, 0, 0} }
)

// TestHandshakeReplies sends raw handshakes and checks every byte the
// proxy answers before it closes.
func TestHandshakeReplies(t *testing.T) {
	l := startLab(t)
	alice := cat(greetPass, login("alice", "s3cret"))
	boundEcho := cat([]byte{5, 0, 0, AtypIPv4, 127, 0, 0, 1}) // the port varies
	cases := []struct {
		name string
		src  string
		in   []byte
		want []byte // exact; with prefix, the start of the answer
		pfx  bool
	}{
		{"wrong version", "127.0.0.1", []byte{4, 1, 0, 0x1f, 0x90, 127, 0, 0, 1, 0}, nil, false},
		{"no methods", "127.0.0.1", []byte{5, 0}, nil, false},
		{"truncated greeting", "127.0.0.1", []byte{5, 3, 0}, nil, false},
		{"password required", "127.0.0.1", greetNone, []byte{5, MethodRefused}, false},
		{"more methods than announced", "127.0.0.1", []byte{5, 1, MethodPassword, 0, 1, 5}, []byte{5, MethodPassword}, false},
		{"wrong password", "127.0.0.1", cat(greetPass, login("alice", "guess"), connect4(l.echo)), []byte{5, MethodPassword, 1, 1}, false},
		{"unknown user", "127.0.0.1", cat(greetPass, login("mallory", "s3cret"), connect4(l.echo)), []byte{5, MethodPassword, 1, 1}, false},
		{"empty password", "127.0.0.1", cat(greetPass, login("alice", "")), []byte{5, MethodPassword, 1, 1}, false},
		{"auth version", "127.0.0.1", cat(greetPass, []byte{5, 5, 'a'}), []byte{5, MethodPassword}, false},
		{"truncated username", "127.0.0.1", cat(greetPass, []byte{1, 255, 'a', 'b'}), []byte{5, MethodPassword}, false},
		{"garbage after greeting", "127.0.0.3", cat(greetNone, []byte("GET / HTTP/1.1\r\n\r\n")), cat([]byte{5, 0}, failReply(GeneralFailure)), false},
		{"request version", "127.0.0.1", cat(alice, []byte{4, 1, 0, 1, 127, 0, 0, 1, 0, 80}), cat(okPass, failReply(GeneralFailure)), false},
		{"bind", "127.0.0.1", cat(alice, []byte{5, CmdBind, 0, 1, 127, 0, 0, 1, 0, 80}), cat(okPass, failReply(CommandNotSupported)), false},
		{"udp associate", "127.0.0.1", cat(alice, []byte{5, CmdUDPAssociate, 0, 1, 0, 0, 0, 0, 0, 0}), cat(okPass, failReply(CommandNotSupported)), false},
		{"address type", "127.0.0.1", cat(alice, []byte{5, 1, 0, 5, 1, 2, 3, 4, 0, 80}), cat(okPass, failReply(AtypNotSupported)), false},
		{"bad domain name", "127.0.0.1", cat(alice, connectName("bad name!", 80)), cat(okPass, failReply(HostUnreachable)), false},
		{"denied address", "127.0.0.1", cat(alice, connect4(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), l.echo.Port()))), cat(okPass, failReply(NotAllowed)), false},
		{"denied resolved address", "127.0.0.1", cat(alice, connectName("other.test", l.echo.Port())), cat(okPass, failReply(NotAllowed)), false},
		{"denied user", "127.0.0.1", cat(greetPass, login("bob", "s3cret"), connect4(l.echo)), cat(okPass, failReply(NotAllowed)), false},
		{"refused", "127.0.0.1", cat(alice, connect4(l.closed)), cat(okPass, failReply(ConnectionRefused)), false},
		{"no such name", "127.0.0.1", cat(alice, connectName("nx.test", 80)), cat(okPass, failReply(HostUnreachable)), false},
		{"connect by address", "127.0.0.1", cat(alice, connect4(l.echo), []byte("ping")), cat(okPass, boundEcho), true},
		{"connect by name", "127.0.0.1", cat(alice, connectName("echo.test", l.echo.Port()), []byte("ping")), cat(okPass, boundEcho), true},
		{"connect without auth", "127.0.0.3", cat(greetNone, connect4(l.echo), []byte("ping")), cat([]byte{5, 0}, boundEcho), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := l.accepts.Load()
			got := l.talk(t, c.src, c.in, false)
			if c.pfx {
				// reply, bound port (2 bytes), then the echoed data
				if len(got) != len(c.want)+2+4 || !bytes.Equal(got[:len(c.want)], c.want) || string(got[len(got)-4:]) != "ping" {
					t.Fatalf("got %x, want %x + port + ping", got, c.want)
				}
				return
			}
			if !bytes.Equal(got, c.want) {
				t.Fatalf("got %x, want %x", got, c.want)
			}
			if n := l.accepts.Load() - before; n != 0 {
				t.Fatalf("a refused request reached the server (%d connections)", n)
			}
		})
	}
}

// TestDeniedDomainNotResolved: a name the rules deny is refused before
// any DNS query.
func TestDeniedDomainNotResolved(t *testing.T) {
	l := startLab(t)
	q := l.dns.Queries.Load()
	got := l.talk(t, "127.0.0.1", cat(greetPass, login("alice", "s3cret"), connectName("www.denied.test", 80)), false)
	if !bytes.Equal(got, cat(okPass, failReply(NotAllowed))) {
		t.Fatalf("got %x", got)
	}
	if n := l.dns.Queries.Load() - q; n != 0 {
		t.Fatalf("%d DNS queries for a denied name", n)
	}
}

// TestResolverTimeout: a resolver that does not answer gets 0x06.
func TestResolverTimeout(t *testing.T) {
	l := startLab(t)
	l.dns.Silent.Store(true)
	got := l.talk(t, "127.0.0.1", cat(greetPass, login("alice", "s3cret"), connectName("echo.test", 80)), false)
	if !bytes.Equal(got, cat(okPass, failReply(TTLExpired))) {
		t.Fatalf("got %x", got)
	}
}

// TestSlowLoris: a client that stops mid-greeting is closed at the
// handshake timeout.
func TestSlowLoris(t *testing.T) {
	l := startLab(t)
	start := time.Now()
	got := l.talk(t, "127.0.0.1", []byte{5}, true)
	if len(got) != 0 {
		t.Fatalf("got %x", got)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("closed after %v; handshake_timeout is 2s", d)
	}
	if n := l.p.result(resultTimeout); n != 1 {
		t.Fatalf("timeouts counted: %d", n)
	}
}

// TestBruteForceBackOff: after failed_logins failures a source is backed
// off: even the right password fails, without a bcrypt check, and other
// sources are not affected.
func TestBruteForceBackOff(t *testing.T) {
	l := startLab(t)
	wrong := cat(greetPass, login("alice", "nope"))
	right := cat(greetPass, login("alice", "s3cret"))
	for i := 0; i < 3; i++ {
		if got := l.talk(t, "127.0.0.5", wrong, false); !bytes.Equal(got, []byte{5, 2, 1, 1}) {
			t.Fatalf("attempt %d: got %x", i, got)
		}
	}
	start := time.Now()
	if got := l.talk(t, "127.0.0.5", right, false); !bytes.Equal(got, []byte{5, 2, 1, 1}) {
		t.Fatalf("backed-off source logged in: %x", got)
	}
	if d := time.Since(start); d > 30*time.Millisecond {
		t.Logf("backed-off refusal took %v", d)
	}
	if got := l.talk(t, "127.0.0.6", right, false); !bytes.Equal(got, okPass) {
		t.Fatalf("another source: got %x", got)
	}
	if l.p.result(resultBackedOff) != 1 || l.p.result(resultAuthFailed) != 3 {
		t.Fatalf("results %v", l.p.Metrics())
	}
	// Failed logins are logged once per 10 s; the next line counts the
	// ones dropped.
	if n := strings.Count(l.log.String(), `"msg":"socks5: login failed"`); n != 1 {
		t.Errorf("%d login-failed lines for 3 failures in a row, want 1 (rate-limited)", n)
	}
	if n := l.p.LogSuppressed(); n != 2 {
		t.Errorf("%d lines suppressed, want 2", n)
	}
}

// TestUsersReload: a user added to the file logs in after Reload; a
// broken file keeps the users in force.
func TestUsersReload(t *testing.T) {
	l := startLab(t)
	carol := cat(greetPass, login("carol", "pw"))
	if got := l.talk(t, "127.0.0.7", carol, false); !bytes.Equal(got, []byte{5, 2, 1, 1}) {
		t.Fatalf("unknown carol: %x", got)
	}
	hash, _ := HashPassword([]byte("pw"))
	f := l.p.conf.UsersFile
	old, _ := os.ReadFile(f)
	os.WriteFile(f, append(old, []byte("carol:"+hash+"\n")...), 0o600)
	if err := l.p.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := l.talk(t, "127.0.0.7", carol, false); !bytes.Equal(got, okPass) {
		t.Fatalf("carol after reload: %x", got)
	}
	os.WriteFile(f, []byte("carol:not-a-hash\n"), 0o600)
	if err := l.p.Reload(); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Fatalf("broken file: %v", err)
	}
	if got := l.talk(t, "127.0.0.7", carol, false); !bytes.Equal(got, okPass) {
		t.Fatalf("carol after a failed reload: %x", got)
	}
}

func TestDialReply(t *testing.T) {
	for _, c := range []struct {
		err  error
		want Reply
	}{
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", errnoRefused)}, ConnectionRefused},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", errnoHostUnreach)}, HostUnreachable},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", errnoNetUnreach)}, NetworkUnreachable},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", errnoTimedOut)}, TTLExpired},
		{context.DeadlineExceeded, TTLExpired},
		{io.ErrUnexpectedEOF, GeneralFailure},
	} {
		if got := dialReply(c.err); got != c.want {
			t.Errorf("%v: got %v, want %v", c.err, got, c.want)
		}
	}
}

func (p *Proxy) result(name string) uint64 {
	p.statsMu.Lock()
	defer p.statsMu.Unlock()
	return p.results[name]
}

// TestMaxSessions: connections beyond max_sessions are reset at once,
// handshaking ones included; a slot frees when a session ends.
func TestMaxSessions(t *testing.T) {
	l := startLab(t, "      max_sessions: 2\n")
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp4", l.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{5}) // a handshake that waits
		held = append(held, c)
	}
	// The proxy counts a session when it accepts it: wait for both.
	deadline := time.Now().Add(3 * time.Second)
	for l.p.sessions.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if c, err := net.Dial("tcp4", l.addr); err == nil { // reset: the dial may fail, or the read
		c.Write(greetPass)
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, _ := io.ReadAll(c)
		c.Close()
		if len(got) != 0 {
			t.Fatalf("third session answered %x", got)
		}
	}
	if n := l.p.result(resultCap); n != 1 {
		t.Fatalf("session_cap counted %d times", n)
	}
	held[0].Close()
	deadline = time.Now().Add(3 * time.Second)
	for l.p.sessions.Load() > 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := l.talk(t, "127.0.0.1", greetPass, false); !bytes.Equal(got, []byte{5, MethodPassword}) {
		t.Fatalf("after a session ended: %x", got)
	}
}

// TestConcurrentClients: 50 clients at once, each through its own
// handshake to the echo server with 64 KiB of distinct data.
func TestConcurrentClients(t *testing.T) {
	l := startLab(t)
	errs := make(chan error, 50)
	for i := range 50 {
		go func() {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}}
			c, err := d.Dial("tcp4", l.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			data := bytes.Repeat([]byte{byte(i)}, 64<<10)
			c.Write(cat(greetNone, connect4(l.echo)))
			go func() { c.Write(data); c.(*net.TCPConn).CloseWrite() }()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- err
				return
			}
			if len(got) != 2+10+len(data) || !bytes.Equal(got[12:], data) {
				errs <- fmt.Errorf("client %d: %d bytes back", i, len(got))
				return
			}
			errs <- nil
		}()
	}
	for range 50 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// BenchmarkConnectSetup: one SOCKS5 session per iteration on loopback,
// without authentication: greeting, CONNECT to the echo server, one byte
// each way, close (the connection setup rate, proxy side only).
func BenchmarkConnectSetup(b *testing.B) {
	l := startLab(b)
	req := cat(greetNone, connect4(l.echo), []byte{'x'})
	want := 2 + 10 + 1
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}}
	buf := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		c, err := d.Dial("tcp4", l.addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Write(req)
		n := 0
		for n < want {
			m, err := c.Read(buf[n:])
			if err != nil {
				b.Fatal(err)
			}
			n += m
		}
		c.Close()
	}
}

// TestBackOffConcurrentLogins: failed_logins bounds the guesses a source
// gets before it is backed off, however many logins it sends at once.
// blocked was checked before the bcrypt check and the failure recorded
// after it, so logins sent together all passed the check: max_sessions
// guesses (1024 by default) per back-off instead of failed_logins.
func TestBackOffConcurrentLogins(t *testing.T) {
	l := startLab(t) // failed_logins: 3
	wrong := cat(greetPass, login("alice", "nope"))
	var wg sync.WaitGroup
	for range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.talk(t, "127.0.0.9", wrong, false)
		}()
	}
	wg.Wait()
	if checked := l.p.result(resultAuthFailed); checked > 3 {
		t.Fatalf("%d passwords checked for one source sending 12 logins at once; failed_logins is 3 (%d backed off)",
			checked, l.p.result(resultBackedOff))
	}
	// A legitimate burst (a browser's connections) all log in.
	right := cat(greetPass, login("alice", "s3cret"))
	var ok atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if bytes.Equal(l.talk(t, "127.0.0.10", right, false), okPass) {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 8 {
		t.Fatalf("%d of 8 concurrent right logins succeeded", ok.Load())
	}
}

// TestBackOffNotResetByOtherUser: a source that knows one user's
// password cannot clear its failed guesses at another's by logging in as
// the first between guesses. Any success deleted the source's failures,
// so two guesses and a login as bob, over and over, guessed alice's
// password at full speed and was never backed off.
func TestBackOffNotResetByOtherUser(t *testing.T) {
	l := startLab(t) // failed_logins: 3
	guess := cat(greetPass, login("alice", "nope"))
	bob := cat(greetPass, login("bob", "s3cret"))
	for round := range 3 {
		for i := range 2 {
			if got := l.talk(t, "127.0.0.11", guess, false); !bytes.Equal(got, []byte{5, 2, 1, 1}) {
				t.Fatalf("round %d guess %d: got %x", round, i, got)
			}
		}
		l.talk(t, "127.0.0.11", bob, false)
	}
	if n := l.p.result(resultBackedOff); n == 0 {
		t.Fatalf("6 wrong passwords for alice, with bob's logins between them, were never backed off (failed_logins 3; %d checked)",
			l.p.result(resultAuthFailed))
	}
	// The user who failed and then got it right is forgiven.
	for range 2 {
		l.talk(t, "127.0.0.12", guess, false)
	}
	right := cat(greetPass, login("alice", "s3cret"))
	for i := range 3 {
		if got := l.talk(t, "127.0.0.12", right, false); !bytes.Equal(got, okPass) {
			t.Fatalf("alice's login %d after her own mistakes: got %x", i, got)
		}
		if i == 0 {
			l.talk(t, "127.0.0.12", guess, false)
			l.talk(t, "127.0.0.12", guess, false)
		}
	}
}

// TestConnectUnspecified: the unspecified address is not a destination
// but, to Linux, the gateway itself (connect(2) to 0.0.0.0 or :: goes to
// the loopback address). Rules that keep clients off the gateway's
// loopback services (127.0.0.0/8, ::1) did not see it: CONNECT 0.0.0.0
// reached them, as did a name resolving to 0.0.0.0.
func TestConnectUnspecified(t *testing.T) {
	svc, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}) // a loopback-only service
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	var reached atomic.Int64
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	port := svc.Addr().(*net.TCPAddr).AddrPort().Port()
	l := serveWithDNS(t, map[string][]netip.Addr{"zero.test": {netip.IPv4Unspecified()}}, `
        - action: deny
          destinations: [127.0.0.0/8, "::1/128"]
`)

	for _, req := range map[string][]byte{
		"127.0.0.1": connect4(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)),
		"0.0.0.0":   connect4(netip.AddrPortFrom(netip.IPv4Unspecified(), port)),
		"::":        append([]byte{5, CmdConnect, 0, AtypIPv6, 15: 0, 19: 0}, byte(port>>8), byte(port)),
		"zero.test": connectName("zero.test", port),
	} {
		if got := l.talk(t, "127.0.0.1", cat(greetNone, req), false); !bytes.Equal(got, cat([]byte{5, 0}, failReply(NotAllowed))) {
			t.Errorf("%x: got %x, want 0x02", req, got)
		}
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("a loopback-only service the rules deny was reached %d times", n)
	}
}

// serveWithDNS runs a SOCKS5 service on 127.0.0.1:1080 whose resolver is
// a DNS server on loopback that knows names, with these rules (YAML
// list items indented by eight spaces).
func serveWithDNS(t *testing.T, names map[string][]netip.Addr, rules string) *lab {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dns := dnstest.Serve(pc, names)
	t.Cleanup(func() { dns.Close() })
	cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    splice:
      mode: never
    socks5:
      resolver: %s
      rules:%s`, dns.Addr(), rules)))
	if err != nil {
		t.Fatal(err)
	}
	return serveConfig(t, cfg)
}

// serveConfig runs the proxy of cfg's first service on loopback.
func serveConfig(t *testing.T, cfg *config.Config) *lab {
	t.Helper()
	l := &lab{}
	l.serve(t, &cfg.Services[0], slog.New(slog.DiscardHandler))
	return l
}

// TestUnknownUserTiming: an unknown user must cost the time a known
// user's wrong password costs, whatever the cost of the file's hashes.
// The dummy hash had cost 10 (HashCost) while the users file may hold
// any bcrypt hash (htpasswd -B makes cost 5): with cost-4 hashes a wrong
// password was answered in ~1 ms and an unknown user in ~60 ms, which
// tells an attacker which names exist.
func TestUnknownUserTiming(t *testing.T) {
	cfg := usersConfig(t, "      failed_logins: 1000\n")
	l := serveConfig(t, cfg)
	fastest := func(user string) time.Duration {
		best := time.Hour
		for range 5 {
			start := time.Now()
			if got := l.talk(t, "127.0.0.1", cat(greetPass, login(user, "guess")), false); !bytes.Equal(got, []byte{5, 2, 1, 1}) {
				t.Fatalf("%s: got %x", user, got)
			}
			best = min(best, time.Since(start))
		}
		return best
	}
	fastest("nobody") // makes the dummy hash
	known, unknown := fastest("alice"), fastest("mallory")
	if unknown > 3*known+5*time.Millisecond {
		t.Fatalf("a wrong password takes %v, an unknown user %v: the names in the users file can be told apart", known, unknown)
	}
}

// TestBackOffIPv6Prefix: failures from IPv6 sources count against their
// /64, which one host commonly holds whole: a guesser that takes a new
// address of its /64 for every guess is backed off all the same, and
// other /64s and IPv4 sources are not.
func TestBackOffIPv6Prefix(t *testing.T) {
	f := newFailures(3, time.Minute)
	for i := range 3 {
		src := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i + 1)})
		if blocked, _ := f.begin(src, time.Now().Add(time.Minute)); blocked {
			t.Fatalf("guess %d from %v backed off already", i, src)
		}
		f.done(src, "alice", false, time.Now())
	}
	if blocked, _ := f.begin(netip.MustParseAddr("2001:db8::99"), time.Now().Add(time.Minute)); !blocked {
		t.Error("a fourth address of the same /64 is not backed off after 3 failures of the prefix")
	}
	for _, other := range []string{"2001:db8:0:1::1", "192.0.2.1", "::ffff:192.0.2.2"} {
		a := netip.MustParseAddr(other)
		if blocked, _ := f.begin(a, time.Now().Add(time.Minute)); blocked {
			t.Errorf("%v is backed off by another /64's failures", a)
		} else {
			f.done(a, "alice", true, time.Now())
		}
	}
}

// TestBackOffLinkLocalPerLink: every link's link-local addresses are in
// fe80::/64, told apart only by their zone (the interface). A client's
// failed logins on one link must back off its link's /64, not the
// link-local clients of every other link.
func TestBackOffLinkLocalPerLink(t *testing.T) {
	f := newFailures(3, time.Minute)
	for i := range 3 {
		src := netip.MustParseAddr(fmt.Sprintf("fe80::%d%%guest0", i+1))
		if blocked, _ := f.begin(src, time.Now().Add(time.Minute)); blocked {
			t.Fatalf("guess %d from %v backed off already", i, src)
		}
		f.done(src, "alice", false, time.Now())
	}
	if blocked, _ := f.begin(netip.MustParseAddr("fe80::99%guest0"), time.Now().Add(time.Minute)); !blocked {
		t.Error("another link-local address of the guessing link is not backed off")
	}
	a := netip.MustParseAddr("fe80::1%staff0")
	if blocked, _ := f.begin(a, time.Now().Add(time.Minute)); blocked {
		t.Errorf("%v, on another link, is backed off by the guest link's failures", a)
	} else {
		f.done(a, "alice", true, time.Now())
	}
}

// TestGatewayDestinations: with no rules, a client could CONNECT to the
// gateway's own services (loopback ones such as debug.pprof, which
// exposes the daemon's memory, and metrics, or a router's management
// on its own addresses) and to link-local neighbours (cloud metadata
// at 169.254.169.254): the proxy is a relay into the router. Such
// destinations are refused unless a rule allows them by name.
func TestGatewayDestinations(t *testing.T) {
	svc, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}) // a loopback-only service
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	var reached atomic.Int64
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	port := svc.Addr().(*net.TCPAddr).AddrPort().Port()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dns := dnstest.Serve(pc, map[string][]netip.Addr{"localhost.test": {netip.MustParseAddr("127.0.0.1")}})
	defer dns.Close()
	mapped := append([]byte{5, CmdConnect, 0, AtypIPv6, 14: 0xff, 15: 0xff, 16: 127, 19: 1}, byte(port>>8), byte(port))
	refused := map[string][]byte{
		"127.0.0.1":        connect4(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)),
		"::ffff:127.0.0.1": mapped,
		"localhost.test":   connectName("localhost.test", port),
		"name 127.0.0.1":   connectName("127.0.0.1", port),
		"169.254.255.254":  connect4(netip.MustParseAddrPort("169.254.255.254:9")),
	}
	// An address of one of the machine's interfaces, if it has one
	// besides loopback: nothing listens there on the port (the service
	// is on loopback), so before the fix the reply was 0x05.
	if ifas, err := net.InterfaceAddrs(); err == nil {
		for _, ia := range ifas {
			if ipn, ok := ia.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() && !ipn.IP.IsLinkLocalUnicast() {
				a, _ := netip.AddrFromSlice(ipn.IP.To4())
				refused["own "+a.String()] = connect4(netip.AddrPortFrom(a, port))
				break
			}
		}
	}
	for _, rules := range []string{
		"", // no rules: the default allows
		"      rules:\n        - action: allow\n          destinations: [0.0.0.0/0, \"::/0\"]\n",
		"      rules:\n        - action: allow\n          destinations: [127.0.0.2/32]\n",
		"      rules:\n        - action: allow\n          ports: [\"1-65535\"]\n",
	} {
		cfg, err := config.Parse("test.yaml", []byte(fmt.Sprintf(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    connect_timeout: 1s
    splice:
      mode: never
    socks5:
      resolver: %s
%s`, dns.Addr(), rules)))
		if err != nil {
			t.Fatal(err)
		}
		l := serveConfig(t, cfg)
		for name, req := range refused {
			if got := l.talk(t, "127.0.0.1", cat(greetNone, req), false); !bytes.Equal(got, cat([]byte{5, 0}, failReply(NotAllowed))) {
				t.Errorf("rules %q: %s: got %x, want 0x02", rules, name, got)
			}
		}
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("a loopback-only service was reached %d times", n)
	}

	// A rule that names the destination allows it.
	cfg, err := config.Parse("test.yaml", []byte(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    splice:
      mode: never
    socks5:
      rules:
        - action: allow
          destinations: [127.0.0.1/32]
`))
	if err != nil {
		t.Fatal(err)
	}
	l := serveConfig(t, cfg)
	got := l.talk(t, "127.0.0.1", cat(greetNone, refused["127.0.0.1"]), false)
	if len(got) < 4 || got[3] != byte(Succeeded) {
		t.Fatalf("allowed by a rule naming it: got %x, want success", got)
	}
}

// takingSplicer takes every flow, as the gateway does when it splices:
// the sockets are its own from then on (kept open here), and the flow
// stays in the table until the gateway sees it end.
type takingSplicer struct {
	mu    sync.Mutex
	conns []*net.TCPConn
}

func (s *takingSplicer) Splice(_ context.Context, _ *proxy.Flow, client, upstream *net.TCPConn) error {
	s.mu.Lock()
	s.conns = append(s.conns, client, upstream)
	s.mu.Unlock()
	return nil
}

func (s *takingSplicer) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

// TestMaxSessionsSpliced: max_sessions caps the service's connections,
// established ones included, spliced or not. A session ended for the
// proxy when its flow was spliced (splice.mode: immediate, the socks5
// default), so a client could hold any number of spliced connections,
// up to limits.max_flows, which every service shares.
func TestMaxSessionsSpliced(t *testing.T) {
	l := startLab(t, "      max_sessions: 2\n")
	l.p.Service.Splice.Mode = config.SpliceImmediate
	sp := &takingSplicer{}
	defer sp.close()
	l.p.SetSplicer(sp)
	for i := range 4 {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}} // no login
		c, err := d.Dial("tcp4", l.addr)
		got := make([]byte, 12)
		n := 0
		switch {
		case err == nil:
			defer c.Close()
			c.Write(cat(greetNone, connect4(l.echo)))
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, _ = io.ReadFull(c, got)
		case !errors.Is(err, syscall.ECONNRESET):
			t.Fatal(err)
		}
		// A connection over the cap is reset as soon as it is accepted:
		// on loopback the reset can come before the dial returns (as in
		// the CI's race run), and then the dial reports it.
		ok := n == 12 && got[3] == byte(Succeeded)
		if want := i < 2; ok != want {
			t.Fatalf("connection %d: got %x, connected %v; want %v (max_sessions 2, %d flows in the table)", i+1, got[:n], ok, want, l.p.Flows.Len())
		}
	}
	if n := l.p.result(resultCap); n != 2 {
		t.Fatalf("session_cap counted %d times, want 2", n)
	}
}

// slowListener returns a loopback listener whose accept queue is full
// until free is called: a connect to it waits for its SYN to be
// resent (1 s on Linux) and then succeeds, as one to a server that
// is slow to answer does.
func slowListener(t *testing.T) (addr netip.AddrPort, free func()) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	raw, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) { syscall.Listen(int(fd), 0) })
	addr = ln.Addr().(*net.TCPAddr).AddrPort()
	for i := 0; ; i++ { // fill the queue
		if i == 16 {
			t.Fatal("the accept queue never filled")
		}
		c, err := net.DialTimeout("tcp4", addr.String(), 300*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr, func() {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				t.Cleanup(func() { c.Close() })
			}
		}()
	}
}

// TestReplyAfterSlowConnect: handshake_timeout bounds the client's part
// of the handshake, not the gateway's resolve and connect. A client
// that sent its request in time, to a server that took a second to
// answer, got no reply at all: the reply's write met the handshake's
// deadline, and the connected flow was thrown away.
func TestReplyAfterSlowConnect(t *testing.T) {
	l := startLab(t) // handshake_timeout 2s, connect_timeout 2s
	dst, free := slowListener(t)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}} // no login
	c, err := d.Dial("tcp4", l.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(greetNone)
	time.Sleep(1500 * time.Millisecond) // a slow client, in time
	c.Write(connect4(dst))
	time.Sleep(200 * time.Millisecond)
	free() // the SYN resent about 1 s after the first gets through
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 12)
	n, err := io.ReadFull(c, got)
	if n < 4 || got[3] != byte(Succeeded) {
		t.Fatalf("got %x (%v), want the success reply; log:\n%s", got[:n], err, l.log.String())
	}
}

// TestRefusedLogNamesReply: the log line of a refused handshake names
// the reply the client got; one that ended before any reply said
// "succeeded" (the zero reply code), which misled whoever read it.
func TestRefusedLogNamesReply(t *testing.T) {
	l := startLab(t)
	l.talk(t, "127.0.0.1", []byte{4, 1, 0}, false) // not SOCKS 5
	l.talk(t, "127.0.0.3", cat(greetNone, []byte{5, CmdBind, 0, AtypIPv4, 10, 0, 0, 1, 0, 80}), false)
	var replies []string
	for _, line := range strings.Split(strings.TrimSpace(l.log.String()), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "socks5: request refused" {
			replies = append(replies, fmt.Sprint(rec["reason"], "/", rec["reply"]))
		}
	}
	want := []string{"bad_greeting/none", "command_not_supported/command_not_supported"}
	if strings.Join(replies, " ") != strings.Join(want, " ") {
		t.Fatalf("refusals logged %v, want %v", replies, want)
	}
}

// TestNAT64Destinations: an address of a well-known NAT64 prefix is its
// embedded IPv4 address to a translator on the way, and so to the rules:
// with DNS64 an internal host's name resolves to 64:ff9b::10.0.0.5. A
// deny rule for 10.0.0.0/8 held against 10.0.0.5 only, and the gateway
// was asked to connect to the NAT64 forms (here unreachable, so 0x03 or
// 0x04 instead of 0x02); loopback's NAT64 form counts as loopback.
// 64:ff9b:1::/48 is a range networks take a prefix of their own from,
// most often a /96: read as a /48 alone, 64:ff9b:1:fffe::10.0.0.5 passed
// the rule, and every address of 64:ff9b:1::/96 was refused as the
// gateway (its /48 reading is 0.0.0.0).
func TestNAT64Destinations(t *testing.T) {
	l := serveWithDNS(t, map[string][]netip.Addr{"internal.test": {netip.MustParseAddr("64:ff9b::a00:5")}}, `
        - action: deny
          destinations: [10.0.0.0/8]
`)
	connect6 := func(a string) []byte {
		b := append([]byte{5, CmdConnect, 0, AtypIPv6}, netip.MustParseAddr(a).AsSlice()...)
		return append(b, 0, 80)
	}
	for name, req := range map[string][]byte{
		"64:ff9b::10.0.0.5":           connect6("64:ff9b::a00:5"),
		"64:ff9b:1:a00:0:500:: (/48)": connect6("64:ff9b:1:a00:0:500::"),
		"64:ff9b::127.0.0.1":          connect6("64:ff9b::7f00:1"),
		// A /96 and a /64 taken from the local-use range.
		"64:ff9b:1:fffe::10.0.0.5 (/96)": connect6("64:ff9b:1:fffe::a00:5"),
		"64:ff9b:1:1::10.0.0.5 (/96)":    connect6("64:ff9b:1:1::a00:5"),
		"64:ff9b:1:1:a:0:500:: (/64)":    connect6("64:ff9b:1:1:a:0:500::"),
		// The suffix (RFC 6052: zero) set to hide the /64 reading.
		"64:ff9b:1:1:a:0:5ff:ffff (/64)": connect6("64:ff9b:1:1:a:0:5ff:ffff"),
		"internal.test (DNS64)":          connectName("internal.test", 80),
	} {
		if got := l.talk(t, "127.0.0.1", cat(greetNone, req), false); !bytes.Equal(got, cat([]byte{5, 0}, failReply(NotAllowed))) {
			t.Errorf("%s: got %x, want 0x02", name, got)
		}
	}
	// 93.184.216.34 through a translator on 64:ff9b:1::/96: allowed (and
	// unreachable here).
	if got := l.talk(t, "127.0.0.1", cat(greetNone, connect6("64:ff9b:1::5db8:d822")), false); len(got) < 4 || got[3] == byte(NotAllowed) {
		t.Errorf("64:ff9b:1::93.184.216.34: got %x, want a reply other than 0x02", got)
	}
	for a, want := range map[string]string{
		"64:ff9b::a00:5":         "10.0.0.5",
		"64:ff9b::7f00:1":        "127.0.0.1",
		"64:ff9b:1:a00:0:500::":  "10.0.0.5 0.0.5.0 0.5.0.0",
		"64:ff9b:1:c0a8:1:2ff::": "192.168.1.2 168.1.2.255 1.2.255.0",
		// A /96 of the local-use range: the /48 reading is 0.0.0.0,
		// which was taken for the gateway.
		"64:ff9b:1::5db8:d822":      "0.0.0.93 93.184.216.34",
		"64:ff9b:1:fffe::5db8:d822": "255.254.0.0 0.0.0.93 93.184.216.34",
		"2001:db8::a00:5":           "",
		"::ffff:10.0.0.5":           "",
	} {
		var got []string
		for _, e := range nat64Embedded(netip.MustParseAddr(a)) {
			got = append(got, e.String())
		}
		if strings.Join(got, " ") != want {
			t.Errorf("nat64Embedded(%s) = %v; want %q", a, got, want)
		}
	}
}
