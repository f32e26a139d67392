package gateway

import (
	"testing"

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
