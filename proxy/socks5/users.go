package socks5

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"spliced/config"
)

// HashCost is the bcrypt cost of the hashes HashPassword makes: about
// 60-90 ms of one core per check on the development VM, which the per-source back-off keeps from
// becoming a lever for brute force.
const HashCost = 10

// MaxHashCost bounds the cost of the users file's hashes. Each step
// doubles a check: cost 14 takes about 1-1.5 s of a core, and the 31
// bcrypt accepts about 40 hours, spent at every load (the dummy hash
// for unknown users has the file's cost) and at every login.
const MaxHashCost = 14

// HashPassword returns the users-file hash of a password (bcrypt).
func HashPassword(pass []byte) (string, error) {
	if len(pass) == 0 || len(pass) > 72 {
		return "", fmt.Errorf("password must be 1-72 bytes (bcrypt's limit), not %d", len(pass))
	}
	h, err := bcrypt.GenerateFromPassword(pass, HashCost)
	return string(h), err
}

// users maps names to bcrypt hashes. dummy is checked for names not in
// it: a hash of the cost the file's hashes have.
type users struct {
	hash  map[string][]byte
	dummy []byte
}

// maxUsersFileSize bounds a users file, as config.MaxFileSize does the
// configuration: a line per user is far less, and a path naming
// something else (a device, a log) must not be read into memory.
const maxUsersFileSize = config.MaxFileSize

// loadUsers reads a users file: "name:hash" lines, blank lines and #
// comments ignored. Errors name the line and what to fix.
func loadUsers(path string) (users, error) {
	f, err := os.Open(path)
	if err != nil {
		return users{}, fmt.Errorf("cannot be read (%v); create it with user:hash lines (spliced -hash-password makes a hash)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return users{}, fmt.Errorf("cannot be read (%v); create it with user:hash lines (spliced -hash-password makes a hash)", err)
	}
	if err := checkUsersFile(path, fi); err != nil {
		return users{}, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxUsersFileSize+1))
	if err != nil {
		return users{}, fmt.Errorf("cannot be read (%v); create it with user:hash lines (spliced -hash-password makes a hash)", err)
	}
	if len(data) > maxUsersFileSize {
		return users{}, fmt.Errorf("is larger than %d MiB; a users file is a user:hash line per user: check the path", maxUsersFileSize>>20)
	}
	u := users{hash: map[string][]byte{}}
	costs := map[int]int{} // users by cost
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, hash, ok := strings.Cut(line, ":")
		if !ok || name == "" || len(name) > 255 {
			return users{}, fmt.Errorf("line %d is not user:hash; write one user per line as name:$2a$... (spliced -hash-password makes the hash)", n)
		}
		cost, err := bcrypt.Cost([]byte(hash))
		if err != nil {
			return users{}, fmt.Errorf("line %d: the hash of user %q is not a bcrypt hash (%v); make one with spliced -hash-password", n, name, err)
		}
		if cost > MaxHashCost {
			return users{}, fmt.Errorf("line %d: the hash of user %q has bcrypt cost %d, more than %d: loading the file and every login would take 2^%d times a cost-%d check (60-90 ms); make a hash of cost %d with spliced -hash-password",
				n, name, cost, MaxHashCost, cost-HashCost, HashCost, HashCost)
		}
		if _, dup := u.hash[name]; dup {
			return users{}, fmt.Errorf("line %d: user %q is listed twice; keep one", n, name)
		}
		u.hash[name] = []byte(hash)
		costs[cost]++
	}
	if err := sc.Err(); err != nil {
		return users{}, err
	}
	common := HashCost
	for c, n := range costs {
		if n > costs[common] || n == costs[common] && c > common {
			common = c
		}
	}
	u.dummy = dummyHash(common)
	return u, nil
}

// checkUsersFile refuses a users file that someone other than the
// daemon could change, and so add a login: one that belongs to another
// user than root or the daemon's own (tests run as any user), or that
// its group or others may write to. Errors say how to fix it.
func checkUsersFile(path string, fi os.FileInfo) error {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && st.Uid != uint32(os.Geteuid()) {
		return fmt.Errorf("belongs to user %d, who could add logins to it; make it root's: chown root %s", st.Uid, path)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("is writable by others than its owner (mode %v), who could add logins to it; chmod 600 %s", perm, path)
	}
	return nil
}

// dummies holds a dummy hash per cost, made once: unknown users are
// checked against one of the cost the users file's hashes have, so that
// a missing user costs the same time as a wrong password (a file of
// htpasswd's cost-5 hashes next to a cost-10 dummy told them apart).
var dummies sync.Map // int -> []byte

func dummyHash(cost int) []byte {
	if h, ok := dummies.Load(cost); ok {
		return h.([]byte)
	}
	h, _ := bcrypt.GenerateFromPassword([]byte("spliced-dummy-password"), cost)
	dummies.Store(cost, h)
	return h
}

// check reports whether pass is user's password.
func (u users) check(user string, pass []byte) bool {
	h, ok := u.hash[user]
	if !ok {
		dummy := u.dummy
		if dummy == nil {
			dummy = dummyHash(HashCost)
		}
		bcrypt.CompareHashAndPassword(dummy, pass)
		return false
	}
	return bcrypt.CompareHashAndPassword(h, pass) == nil
}

// failures tracks failed logins per source address, for back-off. It
// holds at most maxTracked sources (and those with a check running);
// when full it forgets those whose back-off ended, then the oldest.
type failures struct {
	mu      sync.Mutex
	limit   int
	backOff time.Duration
	// maxBackOff caps a back-off, and a streak is forgiven that long
	// after its back-off ended with no failure since (maxBackOff; tests
	// shorten it).
	maxBackOff time.Duration
	m          map[netip.Addr]*failure
}

type failure struct {
	count    int
	last     time.Time
	until    time.Time // backed off until then
	checking int       // checks begun and not yet done
	// wake, when not nil, is closed when a check of the source ends:
	// logins waiting for their turn look again.
	wake chan struct{}
	// user is whose password the failures of the streak guessed; mixed
	// says they guessed several users'. A login forgives only its own
	// user's mistakes.
	user  string
	mixed bool
}

const maxTracked = 4096

// source is the source a client's failures count against: its IPv4
// address, or the /64 of its IPv6 address, which one host commonly holds
// whole (and could otherwise change for every guess). A link-local /64
// is that of the client's link: fe80::/64 is every link's, and without
// its zone a client's failures on one link (a guest network) backed off
// the link-local clients of all the others.
func source(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is4() {
		return a.WithZone("")
	}
	p, err := a.Prefix(64) // drops the zone
	if err != nil {
		return a
	}
	if a.IsLinkLocalUnicast() {
		return p.Addr().WithZone(a.Zone())
	}
	return p.Addr()
}

func newFailures(limit int, backOff time.Duration) *failures {
	return &failures{limit: max(limit, 1), backOff: backOff, maxBackOff: maxBackOff, m: map[netip.Addr]*failure{}}
}

// begin is called before a password check from src. It reports whether
// src is backed off now, and until when; if not, the check may run and
// its result must be given to done. At most failed_logins minus the
// streak's failures checks of one source run at once, and one once a
// back-off has ended (its failure backs the source off again): a burst
// of logins sent together waits for the checks ahead of it, so that it
// cannot get more guesses than the back-off allows. No login waits past
// deadline: one still waiting then is refused as blocked with a zero
// until.
func (f *failures) begin(src netip.Addr, deadline time.Time) (blocked bool, until time.Time) {
	src = source(src)
	f.mu.Lock()
	for {
		now := time.Now()
		e := f.m[src]
		if e == nil {
			if len(f.m) >= maxTracked {
				f.evict(now)
			}
			e = &failure{}
			f.m[src] = e
		}
		if now.Before(e.until) {
			f.mu.Unlock()
			return true, e.until
		}
		count := e.count
		if f.forgiven(e, now) {
			count = 0
		}
		// A back-off that ended leaves count at failed_logins or
		// more: its source gets one check at a time, each failure
		// backing it off again for twice as long.
		if e.checking < max(f.limit-count, 1) {
			e.checking++
			f.mu.Unlock()
			return false, time.Time{}
		}
		// Wait for a check of the source to end (e.checking > 0, so
		// done will come and e stays in the map until then).
		wait := deadline.Sub(now)
		if wait <= 0 {
			f.mu.Unlock()
			return true, time.Time{}
		}
		if e.wake == nil {
			e.wake = make(chan struct{})
		}
		wake := e.wake
		f.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-wake:
			t.Stop()
		case <-t.C:
		}
		f.mu.Lock()
	}
}

// done records the result of a check begun with begin, for user. It
// returns the back-off now in force (0 if none).
func (f *failures) done(src netip.Addr, user string, ok bool, now time.Time) time.Duration {
	src = source(src)
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.m[src] // there: an entry with a check running is never deleted
	e.checking--
	if e.wake != nil {
		close(e.wake)
		e.wake = nil
	}
	defer f.forget(src, e)
	if f.forgiven(e, now) {
		e.count, e.user, e.mixed = 0, "", false
	}
	if ok {
		if !e.mixed && (e.count == 0 || e.user == user) {
			e.count, e.user, e.until = 0, "", time.Time{}
		}
		return 0
	}
	if e.count == 0 {
		e.user = user
	} else if e.user != user {
		e.mixed = true
	}
	e.count++
	e.last = now
	if e.count < f.limit {
		return 0
	}
	d := f.backOff << min(e.count-f.limit, 10)
	d = min(d, f.maxBackOff)
	e.until = now.Add(d)
	return d
}

// forgiven reports whether e's streak is old enough to be forgiven:
// maxBackOff after its last failure and after its back-off ended. Timed
// from the failure alone, a streak backed off for the longest time was
// forgiven the moment its back-off ended, and its source had
// failed_logins guesses at once again instead of one.
func (f *failures) forgiven(e *failure, now time.Time) bool {
	since := e.last
	if e.until.After(since) {
		since = e.until
	}
	return now.Sub(since) > f.maxBackOff
}

// forget deletes an entry that holds nothing.
func (f *failures) forget(src netip.Addr, e *failure) {
	if e.count == 0 && e.checking == 0 && f.m[src] == e {
		delete(f.m, src)
	}
}

func (f *failures) evict(now time.Time) {
	var oldest netip.Addr
	var at time.Time
	for a, e := range f.m {
		if e.checking > 0 {
			continue
		}
		if now.After(e.until) && now.Sub(e.last) > f.backOff {
			delete(f.m, a)
			continue
		}
		if at.IsZero() || e.last.Before(at) {
			oldest, at = a, e.last
		}
	}
	if len(f.m) >= maxTracked && !at.IsZero() {
		delete(f.m, oldest)
	}
}
