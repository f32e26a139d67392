// Package logging builds spliced's slog loggers and holds the attribute
// keys every component shares, so that log lines of the daemon, the proxies
// and the splice engine can be filtered by the same names.
//
// Text goes through tint (colored) on a terminal and JSON elsewhere (a
// journal, a file, a test harness reading the daemon's output).
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

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
	if format == "auto" {
		format = "json"
		if f, ok := w.(*os.File); ok && isTerminal(f) {
			format = "text"
		}
	}
	switch format {
	case "text":
		return slog.New(tint.NewTextHandler(w, &tint.Options{Level: lvl, TimeFormat: time.TimeOnly})), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl})), nil
	}
	return nil, fmt.Errorf("log format %q: use auto, text or json", format)
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
type Limiter struct {
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
	dropped  map[string]int
}

// NewLimiter returns a Limiter allowing one event per key per interval.
func NewLimiter(interval time.Duration) *Limiter {
	return &Limiter{interval: interval, last: map[string]time.Time{}, dropped: map[string]int{}}
}

// Allow reports whether an event for key may be logged now, and how many
// events for key were suppressed since the last one allowed.
func (l *Limiter) Allow(key string) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if t, seen := l.last[key]; seen && now.Sub(t) < l.interval {
		l.dropped[key]++
		return false, 0
	}
	l.last[key] = now
	suppressed = l.dropped[key]
	delete(l.dropped, key)
	return true, suppressed
}
