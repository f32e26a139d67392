package httpproxy

import "testing"

// TestAllocsPerRequest: the steps of the request path made
// allocation-free stay so.
func TestAllocsPerRequest(t *testing.T) {
	for _, c := range []struct {
		name string
		f    func()
	}{
		{"normalizePath of a plain path", func() { normalizePath("/static/css/site-2.css") }},
		{"normalizePath of the root", func() { normalizePath("/") }},
	} {
		if n := testing.AllocsPerRun(100, c.f); n != 0 {
			t.Errorf("%s: %.0f allocations, want 0", c.name, n)
		}
	}
}
