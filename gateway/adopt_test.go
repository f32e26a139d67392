package gateway

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"spliced/config"
	"spliced/splice/bpf"
)

// TestFlowMetaRoundTrip: the record a promoted flow leaves for a
// restarted daemon fits the meta map's value and reads back unchanged;
// a truncated or foreign record is refused.
func TestFlowMetaRoundTrip(t *testing.T) {
	for _, m := range []flowMeta{
		{Service: "web", Proxy: "http", Started: 1796205934420366797, SplicedAt: 1796205934420366798, Queue: 3, Watch: true},
		{Service: "abcdefghijklmnopqrstuvwx", Proxy: "forward", Started: -1, Queue: 65535},
		{},
	} {
		b := m.marshal()
		if len(b) > bpf.MetaSize {
			t.Fatalf("%+v: %d bytes, more than %d", m, len(b), bpf.MetaSize)
		}
		var got flowMeta
		if err := got.unmarshal(b); err != nil || got != m {
			t.Fatalf("round trip of %+v: %+v, %v", m, got, err)
		}
		for n := range len(b) {
			if err := got.unmarshal(b[:n]); err == nil {
				t.Fatalf("%+v: a record cut to %d bytes was accepted", m, n)
			}
		}
		b[0] = 9
		if err := got.unmarshal(b); err == nil {
			t.Fatal("a record of another version was accepted")
		}
	}
}

// TestWarnOtherPins: the start names the pins other tables left under
// its bpffs, for the bpf datapath and for the nfqueue datapath's record
// of spliced flows (kill -9, then kernel.table changed: the old record
// and table stay until spliced -cleanup with the old configuration),
// and not its own.
func TestWarnOtherPins(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"spliced/spliced", "spliced/oldbpf", "spliced-nfqueue/spliced", "spliced-nfqueue/oldnfq"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := config.LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Kernel.BPFFS, cfg.Kernel.Table = root, "spliced"
	var buf bytes.Buffer
	warnOtherPins(cfg, slog.New(slog.NewTextHandler(&buf, nil)))
	out := buf.String()
	for _, want := range []string{"spliced/oldbpf", "spliced-nfqueue/oldnfq"} {
		if !strings.Contains(out, filepath.Join(root, want)) {
			t.Errorf("the pins in %s are not named:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "level=WARN"); n != 2 {
		t.Errorf("%d warnings, want 2 (not this table's own pins):\n%s", n, out)
	}
}
