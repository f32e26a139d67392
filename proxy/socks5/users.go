package socks5

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// HashCost is the bcrypt cost of the hashes HashPassword makes: about
// 60-90 ms of one core per check on the development VM, which the per-source back-off keeps from
// becoming a lever for brute force.
const HashCost = 10

// HashPassword returns the users-file hash of a password (bcrypt).
func HashPassword(pass []byte) (string, error) {
	if len(pass) == 0 || len(pass) > 72 {
		return "", fmt.Errorf("password must be 1-72 bytes (bcrypt's limit), not %d", len(pass))
	}
	h, err := bcrypt.GenerateFromPassword(pass, HashCost)
	return string(h), err
}

// users maps names to bcrypt hashes.
type users map[string][]byte

// loadUsers reads a users file: "name:hash" lines, blank lines and #
// comments ignored. Errors name the line and what to fix.
func loadUsers(path string) (users, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot be read (%v); create it with user:hash lines (spliced -hash-password makes a hash)", err)
	}
	u := users{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, hash, ok := strings.Cut(line, ":")
		if !ok || name == "" || len(name) > 255 {
			return nil, fmt.Errorf("line %d is not user:hash; write one user per line as name:$2a$... (spliced -hash-password makes the hash)", n)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("line %d: the hash of user %q is not a bcrypt hash (%v); make one with spliced -hash-password", n, name, err)
		}
		if _, dup := u[name]; dup {
			return nil, fmt.Errorf("line %d: user %q is listed twice; keep one", n, name)
		}
		u[name] = []byte(hash)
	}
	return u, sc.Err()
}

// dummyHash is checked for unknown users, so that a missing user costs
// the same time as a wrong password.
var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("spliced-dummy-password"), HashCost)
	return h
})

// check reports whether pass is user's password.
func (u users) check(user string, pass []byte) bool {
	h, ok := u[user]
	if !ok {
		bcrypt.CompareHashAndPassword(dummyHash(), pass)
		return false
	}
	return bcrypt.CompareHashAndPassword(h, pass) == nil
}

// failures tracks failed logins per source address, for back-off. It
// holds at most maxTracked sources; when full it forgets those whose
// back-off ended, then the oldest.
type failures struct {
	mu      sync.Mutex
	limit   int
	backOff time.Duration
	m       map[netip.Addr]*failure
}

type failure struct {
	count int
	last  time.Time
	until time.Time // backed off until then
}

const maxTracked = 4096

// blocked reports whether logins from src are backed off now, and until
// when.
func (f *failures) blocked(src netip.Addr, now time.Time) (bool, time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.m[src]
	if e == nil || !now.Before(e.until) {
		return false, time.Time{}
	}
	return true, e.until
}

// fail records a failed login from src and returns the back-off now in
// force (0 if none).
func (f *failures) fail(src netip.Addr, now time.Time) time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.m[src]
	if e == nil {
		if len(f.m) >= maxTracked {
			f.evict(now)
		}
		e = &failure{}
		f.m[src] = e
	}
	if now.Sub(e.last) > maxBackOff { // an old streak is forgiven
		e.count = 0
	}
	e.count++
	e.last = now
	if e.count < f.limit {
		return 0
	}
	d := f.backOff << min(e.count-f.limit, 10)
	d = min(d, maxBackOff)
	e.until = now.Add(d)
	return d
}

// succeed forgets the failures of src.
func (f *failures) succeed(src netip.Addr) {
	f.mu.Lock()
	delete(f.m, src)
	f.mu.Unlock()
}

func (f *failures) evict(now time.Time) {
	var oldest netip.Addr
	var at time.Time
	for a, e := range f.m {
		if now.After(e.until) && now.Sub(e.last) > f.backOff {
			delete(f.m, a)
			continue
		}
		if at.IsZero() || e.last.Before(at) {
			oldest, at = a, e.last
		}
	}
	if len(f.m) >= maxTracked {
		delete(f.m, oldest)
	}
}
