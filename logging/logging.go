// Package logging builds spliced's slog loggers and holds the attribute
// keys every component shares, so that log lines of the daemon, the proxies
// and the splice engine can be filtered by the same names.
//
// Text goes through tint (colored) on a terminal and JSON elsewhere (a
// journal, a file, a test harness reading the daemon's output).
package logging

import (
	"encoding"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lmittmann/tint"
	"golang.org/x/sys/unix"
)

// Attribute keys shared by all components.
const (
	KeyComponent = "component"
	KeyService   = "service"
	KeyFlow      = "flow"
	KeyClient    = "client"
	KeyServer    = "server"
	KeyUpstream  = "upstream"
	KeyMode      = "mode"
	KeyBytesC2S  = "bytes_c2s"
	KeyBytesS2C  = "bytes_s2c"
	KeyDuration  = "duration"
	KeyReason    = "reason"
	KeyTable     = "table"
	KeyQueue     = "queue"
	KeyFile      = "file"
)

// New returns a logger writing to w. format is auto, text or json; level is
// debug, info, warn or error.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	f, ok := w.(*os.File)
	terminal := ok && isTerminal(f)
	if format == "auto" {
		format = "json"
		if terminal {
			format = "text"
		}
	}
	switch format {
	case "text":
		return slog.New(newText(w, lvl, terminal)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl})), nil
	}
	return nil, fmt.Errorf("log format %q: use auto, text or json", format)
}

// newText returns tint's handler, colored only for a terminal (colors in
// a journal or a file are noise), with every value a client may have
// chosen made safe for a terminal by escapeAttr.
func newText(w io.Writer, lvl slog.Level, color bool) slog.Handler {
	return tint.NewTextHandler(w, &tint.Options{
		Level:       lvl,
		TimeFormat:  time.TimeOnly,
		NoColor:     !color,
		ReplaceAttr: escapeAttr,
	})
}

// escapeAttr keeps terminal control sequences a client put in a value (a
// SOCKS5 user name, an HTTP path, an error quoting either) out of the
// text log. tint writes ESC unquoted, and in its colored mode turns every
// "\x1b" of a quoted value back into ESC (so a value with the four
// characters \x1b and a space is as bad as a real ESC); the message it
// writes as it is. A string that holds a control byte (C0 or DEL), any
// other unprintable character, invalid UTF-8 or the text \x1b becomes a
// []byte, which tint quotes with strconv.Quote and nothing more: every
// such byte is written as an escape, and nothing is turned back. An
// error or other value whose text holds one is replaced by its text,
// made safe the same way. The message, which tint never quotes, is
// quoted here when it needs it.
func escapeAttr(groups []string, a slog.Attr) slog.Attr {
	var s string
	switch a.Value.Kind() {
	case slog.KindString:
		s = a.Value.String()
	case slog.KindAny:
		switch v := a.Value.Any().(type) {
		case []byte:
			return a // quoted by tint
		case encoding.TextMarshaler:
			b, err := v.MarshalText()
			if err != nil {
				return a
			}
			s = string(b)
		default:
			s = fmt.Sprintf("%+v", v) // as tint formats it
		}
	default:
		return a
	}
	if !needsEscape(s) {
		return a
	}
	if len(groups) == 0 && a.Key == slog.MessageKey {
		a.Value = slog.StringValue(strconv.Quote(s))
	} else {
		a.Value = slog.AnyValue([]byte(s))
	}
	return a
}

// needsEscape reports whether s holds anything a terminal could take for
// a control sequence, or that tint's colored quoting would turn into one.
func needsEscape(s string) bool {
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return true
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return true
		}
		i += n
	}
	return strings.Contains(s, `\x1b`)
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Err is the attribute for an error value (tint colors it).
func Err(err error) slog.Attr { return tint.Err(err) }

// Limiter passes at most one event per interval per key and counts the
// ones it suppressed, for log lines that traffic can trigger (a hostile
// client must not be able to flood the log).
//
// Its memory is bounded whatever the keys: keys are often a destination
// or a peer, which a scanner chooses. It holds at most a fixed number of
// keys (DefaultLimiterKeys unless set otherwise); when full it first
// forgets the keys whose interval is over (their suppressed counts move
// to a shared overflow slot, so no count is lost), and a key that still
// finds no room shares that overflow slot: one event per interval for all
// such keys together, the suppressed count then covering them all.
type Limiter struct {
	interval time.Duration
	max      int
	now      func() time.Time // time.Now; tests set it

	mu       sync.Mutex
	keys     map[string]*limitEntry
	overflow limitEntry // shared by keys that find no room
	pruned   time.Time  // last prune
	total    uint64     // events suppressed so far, all keys
}

type limitEntry struct {
	last    time.Time
	dropped int
}

// DefaultLimiterKeys is the number of keys a Limiter holds by default.
const DefaultLimiterKeys = 1024

// NewLimiter returns a Limiter allowing one event per key per interval,
// holding at most DefaultLimiterKeys keys.
func NewLimiter(interval time.Duration) *Limiter {
	return NewLimiterSize(interval, DefaultLimiterKeys)
}

// NewLimiterSize is NewLimiter holding at most n keys (at least 1).
func NewLimiterSize(interval time.Duration, n int) *Limiter {
	return &Limiter{interval: interval, max: max(n, 1), now: time.Now, keys: map[string]*limitEntry{}}
}

// Allow reports whether an event for key may be logged now, and how many
// events for key (or, in the overflow slot, for keys without room) were
// suppressed since the last one allowed.
func (l *Limiter) Allow(key string) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	e := l.keys[key]
	if e == nil {
		if len(l.keys) >= l.max {
			l.prune(now)
		}
		if len(l.keys) >= l.max {
			e = &l.overflow
		} else {
			e = &limitEntry{}
			l.keys[key] = e
		}
	}
	if !e.last.IsZero() && now.Sub(e.last) < l.interval {
		e.dropped++
		l.total++
		return false, 0
	}
	e.last = now
	suppressed, e.dropped = e.dropped, 0
	return true, suppressed
}

// prune forgets the keys whose interval is over: the next event for them
// is allowed anyway. Their suppressed counts go to the overflow slot. It
// runs at most once per tenth of the interval, so a full table of fresh
// keys costs one scan now and then, not one per event.
func (l *Limiter) prune(now time.Time) {
	if !l.pruned.IsZero() && now.Sub(l.pruned) < l.interval/10 {
		return
	}
	l.pruned = now
	for k, e := range l.keys {
		if now.Sub(e.last) >= l.interval {
			l.overflow.dropped += e.dropped
			delete(l.keys, k)
		}
	}
}

// Len returns the number of keys the Limiter holds.
func (l *Limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}

// Suppressed returns how many events were suppressed so far, all keys
// together.
func (l *Limiter) Suppressed() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}
