package config

import (
	"strings"
	"testing"
)

// TestListenerKeysValidated: metrics.listen, debug.pprof and
// control.socket were taken as written. spliced -check (the unit's
// ExecStartPre) passed such a file; the daemon then installed its table
// and started every service before the listener failed and it stopped. A
// pprof address on every interface of a router (its LAN clients' side)
// was accepted without a word, though the README says they expose the
// daemon's internals.
func TestListenerKeysValidated(t *testing.T) {
	for _, doc := range []string{
		"metrics:\n  listen: not-an-address\n",
		"metrics:\n  listen: \"127.0.0.1:99999\"\n",
		"debug:\n  pprof: \"0.0.0.0:6060\"\n",
		"debug:\n  pprof: \":6060\"\n",
		"control:\n  socket: spliced.sock\n",
	} {
		if _, err := Parse("listeners.yaml", []byte(doc)); err == nil {
			t.Errorf("accepted:\n%s", doc)
		}
	}
}

// TestListenerKeysErrors: each refused listener key names the key, the
// value and what would do.
func TestListenerKeysErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"metrics:\n  listen: 9410\n", `line 2: metrics.listen: "9410" is not host:port`},
		{"metrics:\n  listen: \"127.0.0.1:0\"\n", `metrics.listen: "127.0.0.1:0" has port "0"`},
		{"metrics:\n  listen: \"127.0.0.1:http\"\n", `has port "http", not a port number 1-65535`},
		{"metrics:\n  listen: \"gate way:9410\"\n", `has host "gate way"`},
		{"debug:\n  pprof: \"10.1.0.1:6060\"\n", "line 2: debug.pprof: \"10.1.0.1:6060\" is not a loopback address: Go's profiling handlers expose the daemon's memory contents"},
		{"debug:\n  pprof: \"localhost:6060\"\n", "must stay on 127.0.0.1 or ::1"},
		{"debug:\n  pprof: \"[::]:6060\"\n", "is not a loopback address"},
		{"debug:\n  pprof: \"127.0.0.1\"\n", "debug.pprof: \"127.0.0.1\" is not host:port"},
		{"control:\n  socket: run/spliced.sock\n", `line 2: control.socket: "run/spliced.sock" is not an absolute path`},
		{"control:\n  socket: /run/" + strings.Repeat("x", 120) + "\n", "longer than the 107 bytes"},
	} {
		_, err := Parse("bad.yaml", []byte(c.in))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.in, err, c.want)
		}
	}
}

// TestListenerKeysAccepted: the usual values still load.
func TestListenerKeysAccepted(t *testing.T) {
	for _, doc := range []string{
		"metrics:\n  listen: \"127.0.0.1:9410\"\n",
		"metrics:\n  listen: \":9410\"\n",
		"metrics:\n  listen: \"[fd01::1]:9410\"\n",
		"metrics:\n  listen: \"localhost:9410\"\n",
		"debug:\n  pprof: \"127.0.0.1:6060\"\n",
		"debug:\n  pprof: \"[::1]:6060\"\n",
		"debug:\n  pprof: \"[::ffff:127.0.0.1]:6060\"\n",
		"control:\n  socket: \"off\"\n",
		"control:\n  socket: /tmp/spliced.sock\n",
	} {
		if _, err := Parse("good.yaml", []byte(doc)); err != nil {
			t.Errorf("%q: %v", doc, err)
		}
	}
}
