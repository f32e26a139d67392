package socks5

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBackOffEnds: once a source's back-off is over, its next login gets
// its check, and a failure then doubles the back-off. begin found the
// streak's count (still failed_logins) not below failed_logins and
// waited for a check to end, which none would: the login hung until 10
// minutes after the last failure (the streak's forgiveness) and some
// other check ended, whatever the handshake's deadline.
func TestBackOffEnds(t *testing.T) {
	f := newFailures(2, 50*time.Millisecond)
	src := netip.MustParseAddr("192.0.2.1")
	for range 2 {
		if blocked, _ := f.begin(src, time.Now().Add(time.Minute)); blocked {
			t.Fatal("blocked early")
		}
		f.done(src, "alice", false, time.Now())
	}
	if blocked, until := f.begin(src, time.Now().Add(time.Minute)); !blocked || until.IsZero() {
		t.Fatalf("not backed off after 2 failures (blocked %v, until %v)", blocked, until)
	}
	time.Sleep(100 * time.Millisecond)
	done := make(chan bool, 1)
	go func() { b, _ := f.begin(src, time.Now().Add(time.Minute)); done <- b }()
	select {
	case blocked := <-done:
		if blocked {
			t.Fatal("a login after the back-off ended is refused without a check")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("begin after the back-off ended blocks")
	}
	if d := f.done(src, "alice", false, time.Now()); d != 100*time.Millisecond {
		t.Fatalf("a failure after the back-off backs off for %v, want 100ms (twice the first)", d)
	}
}

// TestBackOffEndedOneCheck: after a back-off a source gets one check at a
// time, so a burst cannot take more guesses than the doubled back-off
// allows; a login waiting its turn gives up at its deadline, however
// long the check ahead of it takes.
func TestBackOffEndedOneCheck(t *testing.T) {
	f := newFailures(2, 50*time.Millisecond)
	src := netip.MustParseAddr("192.0.2.1")
	for range 2 {
		f.begin(src, time.Now().Add(time.Minute))
		f.done(src, "alice", false, time.Now())
	}
	time.Sleep(100 * time.Millisecond)
	// begin runs begin with a deadline after wait and returns its result,
	// or fails the test if it has not returned in time: 2s after the
	// deadline, or 3s for long waits (which these logins should not
	// need).
	begin := func(what string, wait time.Duration) (bool, time.Time) {
		t.Helper()
		type result struct {
			blocked bool
			until   time.Time
		}
		res := make(chan result, 1)
		go func() { b, u := f.begin(src, time.Now().Add(wait)); res <- result{b, u} }()
		select {
		case r := <-res:
			return r.blocked, r.until
		case <-time.After(min(wait, time.Second) + 2*time.Second):
			t.Fatalf("%s: begin has not returned in %v", what, min(wait, time.Second)+2*time.Second)
			return false, time.Time{}
		}
	}
	if blocked, _ := begin("the first login after the back-off", time.Minute); blocked {
		t.Fatal("a login after the back-off ended is refused without a check")
	}
	// That check is running: a second login waits, until its deadline.
	start := time.Now()
	blocked, until := begin("a second login during the check", 200*time.Millisecond)
	if d := time.Since(start); !blocked || !until.IsZero() || d < 200*time.Millisecond {
		t.Fatalf("a second login during the one check: blocked %v, until %v after %v; want blocked, zero until, at its 200ms deadline",
			blocked, until, d)
	}
	// A waiting login learns of the failure when the check ends.
	go func() {
		time.Sleep(50 * time.Millisecond)
		f.done(src, "alice", false, time.Now())
	}()
	start = time.Now()
	if blocked, until := begin("a login waiting for a failing check", 5*time.Second); !blocked || until.IsZero() {
		t.Fatalf("a login waiting for a check that failed: blocked %v, until %v; want backed off", blocked, until)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a login waited %v for a check that ended after 50ms", d)
	}
}

// TestLoginAfterBackOff: through the proxy, logins from a source whose
// back-off has ended are answered (one of a burst checked, the others
// backed off again) within handshake_timeout, and the right password
// logs in after the next back-off. They hung: one source could so hold
// max_sessions handshakes and shut every client out.
func TestLoginAfterBackOff(t *testing.T) {
	cfg := usersConfig(t, "      handshake_timeout: 1s\n      failed_logins: 2\n      back_off: 100ms\n")
	l := serveConfig(t, cfg)
	wrong := cat(greetPass, login("alice", "nope"))
	refused := []byte{5, 2, 1, 1}
	for i := range 3 { // the third is backed off
		if got := l.talk(t, "127.0.0.20", wrong, false); !bytes.Equal(got, refused) {
			t.Fatalf("attempt %d: got %x", i, got)
		}
	}
	time.Sleep(150 * time.Millisecond)
	answers := make([][]byte, 4)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = l.talk(t, "127.0.0.20", wrong, false)
		}()
	}
	wg.Wait()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("4 logins after the back-off took %v; handshake_timeout is 1s", d)
	}
	for i, got := range answers {
		if !bytes.Equal(got, refused) {
			t.Fatalf("login %d after the back-off: got %x", i, got)
		}
	}
	if n := l.p.result(resultAuthFailed); n != 3 {
		t.Fatalf("%d passwords checked: 2, then 1 of the 4 sent after the back-off, want 3 (%d backed off)",
			n, l.p.result(resultBackedOff))
	}
	time.Sleep(250 * time.Millisecond) // the back-off is 200ms now
	right := cat(greetPass, login("alice", "s3cret"))
	if got := l.talk(t, "127.0.0.20", right, false); !bytes.Equal(got, okPass) {
		t.Fatalf("the right password after the second back-off: got %x", got)
	}
}

// TestUsersFileCostBounded: a hash of a cost above MaxHashCost is refused
// at once, naming its line. bcrypt.Cost accepts costs up to 31, and
// loadUsers makes a dummy hash at the file's most common cost: one line
// of cost 31 (a typo, a hash pasted from another tool) made config
// validation (spliced -check, the start, every SIGHUP) compute a cost-31
// hash, 2^21 times the 60-90 ms of cost 10, about 40 hours of a core;
// and then every login of an unknown user cost as much.
func TestUsersFileCostBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	hash := "$2a$31$" + strings.Repeat("a", 53)
	if err := os.WriteFile(path, []byte("# users\nalice:"+hash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := loadUsers(path)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a cost-31 hash was accepted")
		}
		for _, want := range []string{"line 2", "cost 31", "-hash-password"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
	case <-time.After(3 * time.Second):
		t.Fatal("loadUsers of a one-line users file with a cost-31 hash did not return within 3s")
	}
}

// TestUsersFileWritableByOthers: a users file that others than its owner
// may write is refused, with the chmod that fixes it: whoever can write
// it can add a login. loadUsers read it without a look at its mode.
func TestUsersFileWritableByOthers(t *testing.T) {
	path := aliceUsersFile(t)
	if _, err := loadUsers(path); err != nil {
		t.Fatalf("mode 600: %v", err)
	}
	for _, mode := range []os.FileMode{0o666, 0o620, 0o602} {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		_, err := loadUsers(path)
		if err == nil {
			t.Fatalf("a users file of mode %v was accepted", mode)
		}
		if !strings.Contains(err.Error(), "chmod 600 "+path) {
			t.Errorf("mode %v: error %q does not say chmod 600 %s", mode, err, path)
		}
	}
}

// TestUsersFileOtherOwner: a users file of a user other than root and the
// daemon's is refused: its owner can add a login. Needs root, to give
// the file away.
func TestUsersFileOtherOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown the file")
	}
	path := aliceUsersFile(t)
	if err := os.Chown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err := loadUsers(path)
	if err == nil {
		t.Fatal("a users file of user 65534 was accepted by a daemon running as root")
	}
	if !strings.Contains(err.Error(), "user 65534") || !strings.Contains(err.Error(), "chown root "+path) {
		t.Errorf("error %q does not name the owner and chown root %s", err, path)
	}
}

// TestUsersFileSizeCapped: a users file larger than the configuration's
// cap (4 MiB) is refused rather than read whole into memory: a path that
// names a log or a device by mistake.
func TestUsersFileSizeCapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	line := "# " + strings.Repeat("x", 1021) + "\n" // 1 KiB
	if err := os.WriteFile(path, []byte(strings.Repeat(line, 4<<10)+"#\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := loadUsers(path)
	if err == nil {
		t.Fatal("a users file of 4 MiB and 2 bytes was accepted")
	}
	if !strings.Contains(err.Error(), "larger than 4 MiB") {
		t.Errorf("error %q does not say the file is too large", err)
	}
}

// TestBackOffCapNotForgiven: a streak was forgiven maxBackOff after its
// last failure, which is when a back-off at the cap (maxBackOff) ends:
// at the cap a source got failed_logins guesses at once again, every
// time, instead of one. It is forgiven maxBackOff after its back-off
// ended, with no failure since. (The first back-off is at the cap here;
// a late wake-up of up to 90 ms leaves the outcome alone.)
func TestBackOffCapNotForgiven(t *testing.T) {
	f := newFailures(3, 100*time.Millisecond)
	f.maxBackOff = 100 * time.Millisecond
	src := netip.MustParseAddr("192.0.2.7")
	for range 3 {
		if blocked, _ := f.begin(src, time.Now().Add(time.Second)); blocked {
			t.Fatal("blocked early")
		}
		f.done(src, "alice", false, time.Now())
	}
	time.Sleep(110 * time.Millisecond) // the capped back-off ended
	if blocked, _ := f.begin(src, time.Now().Add(time.Second)); blocked {
		t.Fatal("the first login after the capped back-off is refused")
	}
	// A second login at once waits for the first's check; it gives up
	// at its deadline.
	if blocked, _ := f.begin(src, time.Now().Add(30*time.Millisecond)); !blocked {
		t.Error("a second login at once was checked too: the streak was forgiven when its capped back-off ended")
		f.done(src, "alice", true, time.Now())
	}
	f.done(src, "alice", true, time.Now())
}

// TestStreakForgivenAfterBackOff: maxBackOff after a back-off ended with
// no failure since, a source has failed_logins checks at once again.
func TestStreakForgivenAfterBackOff(t *testing.T) {
	f := newFailures(2, 20*time.Millisecond)
	f.maxBackOff = 40 * time.Millisecond
	src := netip.MustParseAddr("192.0.2.8")
	for range 2 {
		f.begin(src, time.Now().Add(time.Second))
		f.done(src, "alice", false, time.Now())
	}
	time.Sleep(20*time.Millisecond + 50*time.Millisecond) // the back-off, then more than maxBackOff
	for i := range 2 {
		if blocked, _ := f.begin(src, time.Now().Add(10*time.Millisecond)); blocked {
			t.Fatalf("login %d at once after the streak's forgiveness: blocked", i)
		}
	}
	f.done(src, "alice", true, time.Now())
	f.done(src, "alice", true, time.Now())
}

// aliceUsersFile writes a users file of mode 600 with one login, alice,
// and returns its path.
func aliceUsersFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "users")
	h, err := HashPassword([]byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("alice:"+h+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
