package logging

import (
	"bytes"
	"log/slog"
	"net/netip"
	"testing"
)

// TestWithLazy: a logger of With writes the same lines as slog's With,
// and making one formats nothing (no allocation beyond the logger).
func TestWithLazy(t *testing.T) {
	addr := netip.MustParseAddrPort("10.0.0.1:443")
	var eager, lazy bytes.Buffer
	for _, c := range []struct {
		buf *bytes.Buffer
		mk  func(*slog.Logger) *slog.Logger
	}{
		{&eager, func(l *slog.Logger) *slog.Logger { return l.With(KeyFlow, 7, KeyClient, addr, slog.Int("n", 2)) }},
		{&lazy, func(l *slog.Logger) *slog.Logger { return With(l, KeyFlow, 7, KeyClient, addr, slog.Int("n", 2)) }},
	} {
		base := slog.New(slog.NewJSONHandler(c.buf, &slog.HandlerOptions{Level: slog.LevelInfo,
			ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
				if a.Key == slog.TimeKey {
					return slog.Attr{}
				}
				return a
			}}))
		log := c.mk(base)
		log.Debug("not written")
		log.Info("first", "k", "v")
		log.With("sub", 1).WithGroup("g").Info("second", "x", 3)
		log.Info("third")
	}
	if eager.String() != lazy.String() || eager.Len() == 0 {
		t.Errorf("lazy With wrote\n%s\nslog's With wrote\n%s", lazy.String(), eager.String())
	}
	base := slog.New(slog.NewJSONHandler(&bytes.Buffer{}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	eagerAllocs := testing.AllocsPerRun(100, func() { base.With(KeyFlow, 7, KeyClient, addr, KeyServer, addr) })
	lazyAllocs := testing.AllocsPerRun(100, func() {
		With(base, KeyFlow, 7, KeyClient, addr, KeyServer, addr).Debug("not written")
	})
	if lazyAllocs >= eagerAllocs {
		t.Errorf("lazy With: %.0f allocations, slog's With %.0f", lazyAllocs, eagerAllocs)
	}
	t.Logf("allocations: lazy %.0f, slog's With %.0f", lazyAllocs, eagerAllocs)
}
