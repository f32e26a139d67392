package logging

import (
	"context"
	"log/slog"
	"sync"
)

// With is log.With(args...) that formats the attributes only when the
// logger first writes a line. slog's JSON and text handlers format the
// attributes of With at once (addresses to strings, JSON quoting), which
// per connection of a proxy is a few percent of its CPU, while most
// connections never log a line at the daemon's level.
func With(log *slog.Logger, args ...any) *slog.Logger {
	return slog.New(&lazyHandler{inner: log.Handler(), args: args})
}

// lazyHandler is inner with args added, made on first use.
type lazyHandler struct {
	inner slog.Handler
	args  []any
	once  sync.Once
	with  slog.Handler
}

func (h *lazyHandler) resolved() slog.Handler {
	h.once.Do(func() {
		// A logger made of the attributes parses args as slog.With does
		// (key-value pairs, slog.Attr, !BADKEY).
		h.with = slog.New(h.inner).With(h.args...).Handler()
		h.args = nil
	})
	return h.with
}

func (h *lazyHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.inner.Enabled(ctx, level)
}

func (h *lazyHandler) Handle(ctx context.Context, r slog.Record) error {
	return h.resolved().Handle(ctx, r)
}

func (h *lazyHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return h.resolved().WithAttrs(attrs)
}

func (h *lazyHandler) WithGroup(name string) slog.Handler {
	return h.resolved().WithGroup(name)
}
