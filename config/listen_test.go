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

// TestListenPortCollisions: a transparent service's listener binds
// 0.0.0.0 and [::] on its listen port; a direct service's listen_on on
// the same port, or the metrics listener there, cannot bind. Such files
// validated, and the daemon failed at its start (or a reload was
// refused with a bind error, not a configuration error).
func TestListenPortCollisions(t *testing.T) {
	for _, doc := range []string{
		"services:\n" +
			"  - {name: web, listen: 15001, ports: [\"80\"]}\n" +
			"  - {name: fwd, listen_mode: direct, listen_on: [\"10.1.0.1:15001\"], forward: {backends: [\"10.2.0.2:80\"]}}\n",
		"metrics:\n  listen: \"127.0.0.1:15001\"\n" +
			"services:\n  - {name: web, listen: 15001, ports: [\"80\"]}\n",
		"services:\n" +
			"  - {name: a, listen_mode: direct, listen_on: [\"0.0.0.0:1080\"], forward: {backends: [\"10.2.0.2:80\"]}}\n" +
			"  - {name: b, listen_mode: direct, listen_on: [\"10.1.0.1:1080\"], forward: {backends: [\"10.2.0.3:80\"]}}\n",
	} {
		if _, err := Parse("collide.yaml", []byte(doc)); err == nil {
			t.Errorf("accepted:\n%s", doc)
		} else {
			t.Logf("refused: %v", err)
		}
	}
}

// TestListenPortCollisionErrors: each clash is reported once, on the
// later key, naming both listeners and the port.
func TestListenPortCollisionErrors(t *testing.T) {
	const web = "  - {name: web, listen: 15001, ports: [\"80\"]}\n"
	fwd := func(name string, addrs ...string) string {
		return "  - {name: " + name + ", listen_mode: direct, listen_on: [\"" + strings.Join(addrs, `", "`) + "\"], forward: {backends: [\"10.2.0.2:80\"]}}\n"
	}
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"services:\n" + web + fwd("fwd", "10.1.0.1:15001"),
			[]string{`line 3: services[1].listen_on[0]: "10.1.0.1:15001" of service "fwd" wants port 15001, which service "web" (services[0].listen) takes on 0.0.0.0 and [::]`}},
		{"services:\n" + fwd("fwd", "[fd01::1]:15001") + web,
			[]string{`line 3: services[1].listen: "15001" of service "web" wants port 15001 on 0.0.0.0 and [::] (its TPROXY listeners), which service "fwd" (services[0].listen_on[0]) takes on fd01::1`}},
		{"metrics:\n  listen: \"localhost:15001\"\nservices:\n" + web,
			[]string{`line 2: metrics.listen: "localhost:15001" wants port 15001, which service "web" (services[0].listen) takes on 0.0.0.0 and [::]`}},
		{"debug:\n  pprof: \"[::1]:15001\"\nservices:\n" + web,
			[]string{`debug.pprof: "[::1]:15001" wants port 15001`, `service "web"`}},
		{"metrics:\n  listen: \":1080\"\nservices:\n" + fwd("fwd", "10.1.0.1:1080"),
			[]string{`metrics.listen: ":1080" wants port 1080 on every address, which service "fwd" (services[0].listen_on[0]) takes on 10.1.0.1`}},
		{"metrics:\n  listen: \"0.0.0.0:1080\"\nservices:\n" + fwd("fwd", "[fd01::1]:1080"),
			[]string{`metrics.listen: "0.0.0.0:1080" wants port 1080 on every address`}},
		{"metrics:\n  listen: \"127.0.0.1:6060\"\ndebug:\n  pprof: \"127.0.0.1:6060\"\n",
			[]string{`line 4: debug.pprof: "127.0.0.1:6060" wants port 6060, which metrics.listen takes on 127.0.0.1`}},
		{"services:\n" + fwd("fwd", "10.1.0.1:1080", "0.0.0.0:1080"),
			[]string{`services[0].listen_on[1]: "0.0.0.0:1080" of service "fwd" wants port 1080, which service "fwd" (services[0].listen_on[0]) takes on 10.1.0.1`}},
		{"services:\n" + fwd("a", "[::]:1080") + fwd("b", "[fd01::1]:1080"),
			[]string{`services[1].listen_on[0]: "[fd01::1]:1080" of service "b" wants port 1080, which service "a" (services[0].listen_on[0]) takes on ::`}},
	} {
		_, err := Parse("bad.yaml", []byte(c.in))
		if err == nil {
			t.Errorf("accepted:\n%s", c.in)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q lacks %q", err, w)
			}
		}
		if n := strings.Count(err.Error(), "wants port"); n != 1 {
			t.Errorf("%d clashes reported, want 1: %v", n, err)
		}
	}
	// The service checks' own reports are not repeated.
	for _, in := range []string{
		"services:\n" + web + "  - {name: web2, listen: 15001, ports: [\"81\"]}\n",
		"services:\n" + fwd("a", "10.1.0.1:1080") + fwd("b", "10.1.0.1:1080"),
	} {
		_, err := Parse("bad.yaml", []byte(in))
		if err == nil || !strings.Contains(err.Error(), "already") || strings.Contains(err.Error(), "wants port") {
			t.Errorf("%q: %v", in, err)
		}
	}
}

// TestListenPortsApart: listeners on one port that can all bind, or on
// different ports, still load.
func TestListenPortsApart(t *testing.T) {
	const web = "  - {name: web, listen: 15001, ports: [\"80\"]}\n"
	fwd := func(name string, addrs ...string) string {
		return "  - {name: " + name + ", listen_mode: direct, listen_on: [\"" + strings.Join(addrs, `", "`) + "\"], forward: {backends: [\"10.2.0.2:80\"]}}\n"
	}
	for _, in := range []string{
		"metrics:\n  listen: \"127.0.0.1:9410\"\ndebug:\n  pprof: \"127.0.0.1:6060\"\nservices:\n" + web + fwd("fwd", "10.1.0.1:1080", "[fd01::1]:1080"),
		"services:\n" + fwd("fwd", "0.0.0.0:1080", "[::]:1080"),
		"services:\n" + fwd("a", "0.0.0.0:1080") + fwd("b", "[fd01::1]:1080"),
		"services:\n" + fwd("a", "10.1.0.1:1080") + fwd("b", "10.1.0.2:1080"),
		"metrics:\n  listen: \"127.0.0.1:6060\"\ndebug:\n  pprof: \"[::1]:6060\"\n",
		"metrics:\n  listen: \"127.0.0.1:1080\"\nservices:\n" + fwd("fwd", "10.1.0.1:1080"),
	} {
		if _, err := Parse("good.yaml", []byte(in)); err != nil {
			t.Errorf("%q: %v", in, err)
		}
	}
}

// TestDirectListenerIntercepted: a transparent service's TPROXY rule
// matches its ports to every destination it names, the gateway's own
// addresses included, before a connection finds a listener. A direct
// service listening on such an address and port was never reached: in
// the lab, a transparent service on port 8080 to any destination took
// curl's connection to a direct service on 10.1.0.1:8080, connected
// there again from the client's address, timed out after 5 s and reset
// the client. Such a file is refused now; one whose transparent service
// leaves the address out, or may (a prefix for a wildcard listener),
// still loads.
func TestDirectListenerIntercepted(t *testing.T) {
	doc := func(listenOn, ports, extra string) string {
		return `services:
  - name: web
    listen: 15001
    ports: [` + ports + `]
` + extra + `  - name: lb
    listen_mode: direct
    listen_on: ["` + listenOn + `"]
    forward:
      backends: ["10.2.0.2:8080"]
`
	}
	for _, c := range []struct{ doc, want string }{
		{doc("10.1.0.1:8080", `"8080"`, ""), `services[1].listen_on[0]: "10.1.0.1:8080" is intercepted by transparent service "web" (tcp port 8080 from any IPv4 address to any address)`},
		{doc("10.1.0.1:8080", `"8000-8100"`, "    destinations: [10.1.0.0/24]\n"), `(tcp port 8080 from any IPv4 address to 10.1.0.1)`},
		{doc("0.0.0.0:8080", `"8080"`, "    sources: [192.168.1.0/24]\n"), `(tcp port 8080 from 192.168.1.0/24 to any address)`},
		{doc("[fd00:1::1]:8080", `"8080"`, ""), `(tcp port 8080 from any IPv6 address to any address)`},
		// Every destination, written out.
		{doc("0.0.0.0:8080", `"8080"`, "    destinations: [0.0.0.0/0]\n"), `(tcp port 8080 from any IPv4 address to any address)`},
	} {
		_, err := Parse("intercepted.yaml", []byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "another port") {
			t.Errorf("error %v, want %q, for\n%s", err, c.want, c.doc)
		}
	}
	for _, d := range []string{
		doc("10.1.0.1:8080", `"80"`, ""),
		doc("10.1.0.1:8080", `"8080"`, "    destinations: [10.2.0.0/16]\n"),
		doc("10.1.0.1:8080", `"8080"`, "    destinations: [\"fd00::/8\"]\n"),
		doc("10.1.0.1:8080", `"8080"`, "    sources: [\"fd00::/8\"]\n"),
		doc("0.0.0.0:8080", `"8080"`, "    destinations: [10.2.0.0/16]\n"),
		doc("0.0.0.0:8080", `"8080"`, "    destinations: [\"::/0\"]\n"),
		doc("[fd00:1::1]:8080", `"8080"`, "    destinations: [10.0.0.0/8]\n"),
	} {
		if _, err := Parse("ok.yaml", []byte(d)); err != nil {
			t.Errorf("refused: %v\n%s", err, d)
		}
	}
}
