package config

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestDefaultLoads(t *testing.T) {
	cfg, err := LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Kernel.Table != "spliced" || cfg.Kernel.Mark != DefaultMark || cfg.Limits.MaxFlows != DefaultMaxFlows || len(cfg.Services) != 0 {
		t.Fatalf("unexpected default: %+v", cfg)
	}
}

const good = `
kernel:
  table: spl_test
services:
  - name: web
    listen: 15001
    ports: ["80", "8000-8100"]
    destinations: [10.2.0.0/16, "fd00:2::/32"]
    upstream: nat
    idle_timeout: 30s
    splice:
      linger: 2s
    access:
      rules:
        - action: deny
          destinations: [10.2.9.0/24]
          ports: ["22"]
  - name: other
    listen: 15002
    ports: ["80"]
    destinations: [10.3.0.0/16]
`

func TestParseGood(t *testing.T) {
	cfg, err := Parse("good.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	web := cfg.Service("web")
	if web == nil || web.Listen != 15001 || len(web.Ports) != 2 || web.Ports[1] != (PortRange{8000, 8100}) {
		t.Fatalf("web = %+v", web)
	}
	if web.Upstream != NAT || web.IdleTimeout.D() != 30*time.Second || web.ConnectTimeout.D() != DefaultConnectTimeout {
		t.Fatalf("web timeouts/mode = %+v", web)
	}
	if web.Splice.Linger.D() != 2*time.Second || cfg.Service("other").Splice.Linger.D() != DefaultLinger {
		t.Errorf("splice.linger %v and %v, want 2s and the default", web.Splice.Linger, cfg.Service("other").Splice.Linger)
	}
	if web.Backlog != DefaultBacklog {
		t.Errorf("default backlog %d, want %d", web.Backlog, DefaultBacklog)
	}
	if cfg.Service("other").Upstream != Transparent {
		t.Fatalf("default upstream not transparent")
	}
	src := netip.MustParseAddr("10.1.0.2")
	if got := web.Access.Decide(src, netip.MustParseAddrPort("10.2.9.1:22")); got != Deny {
		t.Errorf("deny rule: got %s", got)
	}
	if got := web.Access.Decide(src, netip.MustParseAddrPort("10.2.9.1:80")); got != Allow {
		t.Errorf("default allow: got %s", got)
	}
}

// TestParseErrors checks that each malformed file gives one clear error
// naming the file, the line, the key, the value and what would be valid.
func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want []string
	}{
		{"unknown key", "services:\n  - name: web\n    listn: 15001\n", []string{"bad.yaml: line 3: services[0].listn:", `did you mean "listen"`, "valid keys here:"}},
		{"client IPv6 prefix out of range", "limits:\n  client_ipv6_prefix: 16\n", []string{"line 2: limits.client_ipv6_prefix:", `"16"`, "32-128"}},
		{"negative per-client cap", "limits:\n  max_flows_per_client: -1\n", []string{"line 2: limits.max_flows_per_client:", `"-1"`, "0 for no cap"}},
		{"bad port", "services:\n  - name: web\n    listen: 70000\n    ports: [\"80\"]\n", []string{"line 3: services[0].listen:", `"70000"`, "use 1-65535"}},
		{"bad port in list", "services:\n  - name: web\n    listen: 1\n    ports: [\"80\", \"90-20\"]\n", []string{"line 4: services[0].ports[1]:", `"90-20"`, "first <= last"}},
		{"overlap", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n  - name: b\n    listen: 2\n    ports: [\"70-90\"]\n", []string{"line 7: services[1].ports:", `overlaps service "a"`, "tcp port 80", "narrow"}},
		{"overlap in one family of two", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    sources: [10.0.0.0/8, fd00::/8]\n  - name: b\n    listen: 2\n    ports: [\"80\"]\n    destinations: [2001:db8::/32]\n", []string{`overlaps service "a"`, "from fd00::/8 to 2001:db8::/32"}},
		{"overlap by prefix", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    destinations: [10.0.0.0/8]\n  - name: b\n    listen: 2\n    ports: [\"80\"]\n    destinations: [10.2.0.0/16]\n", []string{`overlaps service "a"`, "10.2.0.0/16"}},
		{"bad prefix", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    destinations: [10.0.0.1/8]\n", []string{"line 5: services[0].destinations[0]:", "host bits", "10.0.0.0/8"}},
		{"bad mode", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    upstream: magic\n", []string{"line 5: services[0].upstream:", `"magic"`, "transparent", "nat"}},
		{"not a number", "kernel:\n  route_table: abc\n", []string{"line 2: kernel.route_table:", `"abc"`, "whole number"}},
		{"system table", "kernel:\n  route_table: 254\n", []string{"line 2: kernel.route_table:", "system routing table"}},
		{"duplicate name", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n  - name: a\n    listen: 2\n    ports: [\"81\"]\n", []string{"line 5: services[1].name:", "unique"}},
		{"duplicate listen", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n  - name: b\n    listen: 1\n    ports: [\"81\"]\n", []string{"line 6: services[1].listen:", `service "a"`}},
		{"no ports", "services:\n  - name: a\n    listen: 1\n", []string{"services[0]:", "has no ports"}},
		{"yaml syntax", "services:\n  - name: a\n   listen: 1\n", []string{"bad.yaml: line 3:", "is not valid YAML"}},
		{"bad duration", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    idle_timeout: soon\n", []string{"line 5: services[0].idle_timeout:", `"soon"`, `"5s"`}},
		{"bad listen mode", "services:\n  - name: a\n    listen_mode: direkt\n", []string{"line 3: services[0].listen_mode:", `"direkt"`, "transparent", "direct"}},
		{"listen_on when transparent", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    listen_on: [\"10.1.0.1:80\"]\n", []string{"line 5: services[0].listen_on:", "only for listen_mode: direct"}},
		{"direct forward without backends", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n", []string{"services[0].forward:", "has no backends", "forward.backends"}},
		{"backend is the listener", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    forward:\n      backends: [\"10.2.0.2:80\", \"10.1.0.1:80\"]\n", []string{"line 6: services[0].forward.backends[1]:", `"10.1.0.1:80"`, "own listen_on address 10.1.0.1:80", "limits.max_flows"}},
		{"backend loopback under a wildcard listener", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"0.0.0.0:8080\"]\n    forward:\n      backends: [\"127.0.0.1:8080\"]\n", []string{"services[0].forward.backends[0]:", "own listen_on address 0.0.0.0:8080", "port of its own"}},
		{"backend unspecified", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    forward:\n      backends: [\"0.0.0.0:8080\"]\n", []string{"services[0].forward.backends[0]:", "not an address to connect to"}},
		{"backends when transparent", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    forward:\n      backends: [\"10.2.0.2:80\"]\n", []string{"line 6: services[0].forward.backends:", "only for listen_mode: direct"}},
		{"direct forward transparent upstream", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    upstream: transparent\n    forward:\n      backends: [\"10.2.0.2:80\"]\n", []string{"line 5: services[0].upstream:", "set upstream: nat"}},
		{"direct with ports", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    ports: [\"80\"]\n    forward:\n      backends: [\"10.2.0.2:80\"]\n", []string{"services[0]:", "is a direct service", "remove them"}},
		{"listen_on twice", "services:\n  - name: a\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    forward:\n      backends: [\"10.2.0.2:80\"]\n  - name: b\n    listen_mode: direct\n    listen_on: [\"10.1.0.1:80\"]\n    forward:\n      backends: [\"10.2.0.2:80\"]\n", []string{"line 9: services[1].listen_on[0]:", `service "a"`}},
		{"key twice", "log:\n  level: info\n  level: debug\n", []string{"line 3: log.level:", "twice"}},
		{"queue length", "kernel:\n  queue_len: 2\nservices: []\n", []string{"line 2: kernel.queue_len:", "8-1048576"}},
		{"datapath", "kernel:\n  datapath: ebpf\n", []string{"line 2: kernel.datapath:", `"ebpf"`, "nfqueue", "bpf", "auto"}},
		{"bpf forward", "kernel:\n  datapath: bpf\n  bpf_forward: route\n", []string{"line 3: kernel.bpf_forward:", `"route"`, "redirect", "stack"}},
		{"resend", "kernel:\n  resend: tso\n", []string{"line 2: kernel.resend:", `"tso"`, "gso", "raw"}},
		{"interfaces without bpf", "kernel:\n  interfaces: [eth0]\n", []string{"kernel.interfaces:", "needs kernel.datapath bpf or auto"}},
		{"loopback interface", "kernel:\n  datapath: bpf\n  interfaces: [eth0, lo]\n", []string{"kernel.interfaces[1]:", "loopback"}},
		{"interface twice", "kernel:\n  datapath: auto\n  interfaces: [eth0, eth0]\n", []string{"kernel.interfaces[1]:", "twice"}},
		{"bad interface name", "kernel:\n  datapath: auto\n  interfaces: [\"eth0:1\"]\n", []string{"kernel.interfaces[0]:", "not an interface name"}},
		{"relative bpffs", "kernel:\n  bpffs: sys/fs/bpf\n", []string{"kernel.bpffs:", "not a clean absolute path"}},
		{"mark on the bpf bit", "kernel:\n  datapath: bpf\n  mark: 0x20000001\n", []string{"line 3: kernel.mark:", "0x20000000"}},
		{"drain beyond divert timeout", "kernel:\n  divert_timeout: 4s\nservices:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      mode: immediate\n", []string{"services[0].splice.drain_timeout:", `"5s"`, "half of kernel.divert_timeout (4s)", "2s or less"}},
		{"linger too short", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      linger: 200ms\n", []string{"services[0].splice.linger:", `"200ms"`, "1s to 1m"}},
		{"linger too long", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      linger: 2m\n", []string{"services[0].splice.linger:", `"2m0s"`, "1s to 1m"}},
		{"socket buffer too small", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      mode: bytes\n      bytes: 1MiB\n      socket_buffer: 4KiB\n", []string{"services[0].splice.socket_buffer:", `"4096"`, "16KiB to 64MiB"}},
		{"socket buffer without splicing", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      socket_buffer: 256KiB\n", []string{"services[0].splice.socket_buffer:", "never splices", "set splice.mode"}},
		{"listen backlog", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    backlog: 100000\n", []string{"line 5: services[0].backlog:", "1-65535"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("bad.yaml", []byte(c.in))
			if err == nil {
				t.Fatalf("no error for:\n%s", c.in)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add(Default)
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.yaml", data)
		if err == nil && cfg == nil {
			t.Fatal("nil config without error")
		}
		if err != nil && !strings.HasPrefix(err.Error(), "config fuzz.yaml: ") {
			t.Fatalf("error without file name: %v", err)
		}
	})
}

// TestDefaultQueues: kernel.queues defaults to one queue per CPU, at
// most MaxQueues: on a machine with more CPUs the default failed the
// validation of kernel.queues (1-64) and the daemon did not start with
// an empty configuration.
func TestDefaultQueues(t *testing.T) {
	for cpus, want := range map[int]int{1: 1, 2: 2, 64: 64, 65: 64, 96: 64, 512: 64} {
		if got := defaultQueues(cpus); got != want {
			t.Errorf("%d CPUs: %d queues, want %d", cpus, got, want)
		}
		c, err := Parse("t.yaml", []byte(fmt.Sprintf("kernel:\n  queues: %d\n", defaultQueues(cpus))))
		if err != nil {
			t.Errorf("%d CPUs: the default number of queues does not validate: %v", cpus, err)
		} else if c.Kernel.Queues != want {
			t.Errorf("%d CPUs: parsed %d queues", cpus, c.Kernel.Queues)
		}
	}
}

// TestAccessLinkLocalZone: a flow's addresses come from its socket, and
// a link-local one carries its interface as a zone (fe80::1%eth0, as
// the net package reports the kernel's scope ID). netip.Prefix.Contains
// matches no zoned address, so a deny rule for fe80::/10 let every
// link-local client through to the default allow.
func TestAccessLinkLocalZone(t *testing.T) {
	cfg, err := Parse("zone.yaml", []byte(`
services:
  - name: web
    listen: 15001
    ports: ["80"]
    access:
      rules:
        - action: deny
          sources: ["fe80::/10"]
        - action: deny
          destinations: ["fe80::1"]
`))
	if err != nil {
		t.Fatal(err)
	}
	a := &cfg.Services[0].Access
	global := netip.MustParseAddr("2001:db8::2")
	for _, tc := range []struct {
		src  netip.Addr
		dst  netip.AddrPort
		want Action
	}{
		{netip.MustParseAddr("fe80::2%eth0"), netip.MustParseAddrPort("[2001:db8::1]:80"), Deny},
		{global, netip.MustParseAddrPort("[fe80::1%eth0]:80"), Deny},
		{global, netip.MustParseAddrPort("[fe80::2%eth0]:80"), Allow},
		{global, netip.MustParseAddrPort("[2001:db8::1]:80"), Allow},
	} {
		if got := a.Decide(tc.src, tc.dst); got != tc.want {
			t.Errorf("%v -> %v: %s, want %s", tc.src, tc.dst, got, tc.want)
		}
	}
	// An allow rule matches a zoned address too.
	allow := Access{Default: Deny, Rules: []AccessRule{{Action: Allow, Sources: []Prefix{{netip.MustParsePrefix("fe80::/64")}}}}}
	if got := allow.Decide(netip.MustParseAddr("fe80::2%2"), netip.MustParseAddrPort("[2001:db8::1]:443")); got != Allow {
		t.Errorf("allow rule for fe80::/64: %s, want allow", got)
	}
}

// TestNoOverlapAcrossFamilies checks that services on the same port whose
// prefixes leave them different address families load: no flow can match
// both, since a flow's source and destination share a family.
func TestNoOverlapAcrossFamilies(t *testing.T) {
	for name, svcs := range map[string]string{
		"v4 sources, v6 destinations": "    sources: [10.0.0.0/8]\n  - name: b\n    listen: 2\n    ports: [\"80\"]\n    destinations: [2001:db8::/32]\n",
		"v6 sources, v4 sources":      "    sources: [fd00::/8]\n  - name: b\n    listen: 2\n    ports: [\"80\"]\n    sources: [10.0.0.0/8]\n",
		"v4 only, v6 only":            "    sources: [10.0.0.0/8]\n    destinations: [10.2.0.0/16]\n  - name: b\n    listen: 2\n    ports: [\"80\"]\n    sources: [fd00::/8]\n    destinations: [fd02::/64]\n",
	} {
		in := "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n" + svcs
		if _, err := Parse("ok.yaml", []byte(in)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}
