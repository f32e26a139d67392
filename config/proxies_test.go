package config_test

import (
	"strings"
	"testing"

	"spliced/config"
	_ "spliced/proxy/all"
	"spliced/proxy/ftp"
)

// TestProxyParseErrors: errors in proxy sections, which the proxies'
// packages decode and validate, read like every other config error.
func TestProxyParseErrors(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want []string
	}{
		{"bad proxy", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: socks\n", []string{"line 5: services[0].proxy:", `"socks"`, "forward, ftp, http or socks5"}},
		{"ftp transparent", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    upstream: transparent\n", []string{"line 6: services[0].upstream:", "only the gateway's address", "upstream: nat"}},
		{"ftp bad address", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      external: gw.example\n", []string{"line 7: services[0].ftp.external:", `"gw.example"`, "not an address"}},
		{"ftp privileged data ports", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      data_ports: \"20-30\"\n", []string{"line 7: services[0].ftp.data_ports:", "above 1023"}},
		{"ftp line limit", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      max_line: 10\n", []string{"line 7: services[0].ftp.max_line:", "64-8192"}},
		{"socks5 without users", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      method: password\n", []string{"line 6: services[0].socks5:", "no users_file", "-hash-password"}},
		{"socks5 users file missing", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      users_file: /nonexistent/users\n", []string{"line 6: services[0].socks5.users_file:", "cannot be read"}},
		{"socks5 bad method", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      method: plain\n", []string{"line 6: services[0].socks5.method:", "none or password"}},
		{"socks5 bad resolver", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      resolver: dns.example\n", []string{"line 6: services[0].socks5.resolver:", "address and port"}},
		{"socks5 unknown key", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      user_file: x\n", []string{"line 6: services[0].socks5.user_file:", `did you mean "users_file"`}},
		{"socks5 transparent", "services:\n  - name: s\n    proxy: socks5\n    listen_mode: transparent\n    listen: 1\n    ports: [\"1080\"]\n", []string{"line 4: services[0].listen_mode:", "not a listen mode of proxy socks5", "use direct"}},
		{"socket buffer on http", "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    proxy: http\n    splice:\n      mode: immediate\n      socket_buffer: 256KiB\n    http:\n      routes:\n        - path: /\n          backends: [\"10.2.0.2:80\"]\n", []string{"services[0].splice.socket_buffer:", "forward and socks5", "remove it"}},
		{"http route host in octal", httpRoute("010.0.0.5"), []string{"line 10: services[0].http.routes[0].host:", `"010.0.0.5"`, "10.0.0.5"}},
		{"http route host as one number", httpRoute("167772165"), []string{"services[0].http.routes[0].host:", "four decimal numbers"}},
		{"http route host with port", httpRoute("a.example:80"), []string{"services[0].http.routes[0].host:", "without its port"}},
		{"http route host with empty label", httpRoute("a..example"), []string{"services[0].http.routes[0].host:", "not a host name or an IP address"}},
		{"http route host with slash", httpRoute("a.example/x"), []string{"services[0].http.routes[0].host:", "not a host name or an IP address"}},
		{"socks5 no listen_on", "services:\n  - name: s\n    proxy: socks5\n", []string{"services[0]:", "no listen_on"}},
		{"socks5 domain is an address", socks5Domain("10.0.0.5"), []string{"line 8: services[0].socks5.rules[0].domains[0]:", `"10.0.0.5"`, "destinations"}},
		{"socks5 domain ends in a number", socks5Domain("0x0a.0.0.5"), []string{"services[0].socks5.rules[0].domains[0]:", "destinations"}},
		{"socks5 domain is one number", socks5Domain("167772165"), []string{"services[0].socks5.rules[0].domains[0]:", "destinations"}},
		{"socks5 bad domain", "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      rules:\n        - action: deny\n          domains: [\"bad domain\"]\n", []string{"line 8: services[0].socks5.rules[0].domains[0]:", "not a domain name"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := config.Parse("bad.yaml", []byte(c.in))
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

// socks5Domain is a socks5 service whose one rule denies domain.
func socks5Domain(domain string) string {
	return "services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    socks5:\n      rules:\n        - action: deny\n          domains: [\"" + domain + "\"]\n"
}

// TestSOCKS5RuleDomains: a rule's domains may be any name a request can
// carry as a domain: any case, a trailing dot, labels of digits, a
// hyphen or an underscore before a last label that is not a number.
func TestSOCKS5RuleDomains(t *testing.T) {
	for _, d := range []string{"Internal.Example.", "10.0.0.5.example", "a_b.example", "x-1.example", "example", "0x0a.example"} {
		if _, err := config.Parse("good.yaml", []byte(socks5Domain(d))); err != nil {
			t.Errorf("rule domain %q: %v", d, err)
		}
	}
}

// httpRoute is an http service whose one route denies host.
func httpRoute(host string) string {
	return "services:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    proxy: http\n    http:\n      routes:\n        - path: /\n          action: deny\n          host: \"" + host + "\"\n"
}

// TestHTTPRouteHosts: a route's host may be any spelling a request's
// Host can match: a name (any case, a trailing dot), an IPv4 address in
// dotted decimal, an IPv6 address with or without brackets.
func TestHTTPRouteHosts(t *testing.T) {
	for _, h := range []string{"", "Secret.Example.", "10.0.0.5", "[2001:db8::1]", "2001:db8::1", "::ffff:10.0.0.5", "10.0.0.5.example", "a_b.example"} {
		if _, err := config.Parse("good.yaml", []byte(httpRoute(h))); err != nil {
			t.Errorf("route host %q: %v", h, err)
		}
	}
}

// TestFTPDefaults: an ftp service needs no ftp keys; its upstream is nat
// and its limits have their documented defaults.
func TestFTPDefaults(t *testing.T) {
	cfg, err := config.Parse("ftp.yaml", []byte("services:\n  - name: ftp\n    listen: 15021\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      internal: 10.1.0.1\n      external: \"\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Services[0]
	f := s.Section().(*ftp.Config)
	if s.Proxy != "ftp" || s.Upstream != config.NAT || f.DataPorts != (config.PortRange{First: ftp.DefaultDataFirst, Last: ftp.DefaultDataLast}) ||
		f.MaxLine != ftp.DefaultMaxLine || f.MaxSessions != ftp.DefaultMaxSessions || f.DataTimeout.D() != ftp.DefaultDataTimeout ||
		f.SessionTimeout.D() != ftp.DefaultSessionTimeout || f.Internal.String() != "10.1.0.1" || f.External.IsValid() {
		t.Errorf("ftp service %+v", s)
	}
	fwd, err := config.Parse("fwd.yaml", []byte("services:\n  - name: web\n    listen: 15001\n    ports: [\"80\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s := fwd.Services[0]; s.Proxy != config.ProxyForward || s.Upstream != config.Transparent {
		t.Errorf("forward service %+v", s)
	}
}

// TestDrainTimeoutOnRequest: once one service splices, the gateway
// splices a flow of any forward or socks5 service on request (splicectl
// splice), with that service's drain_timeout, even one whose splice.mode
// is never. Such a service with the default drain_timeout (5s) under a
// divert_timeout of 4s was accepted, and a flow spliced on request could
// lose its divert entries while it drained and stall. An http or ftp
// service that never splices takes no request, and stays accepted.
func TestDrainTimeoutOnRequest(t *testing.T) {
	const splicing = "kernel:\n  divert_timeout: 4s\nservices:\n  - name: a\n    listen: 1\n    ports: [\"80\"]\n    splice:\n      mode: immediate\n      drain_timeout: 2s\n"
	for _, c := range []struct {
		name, service, err string
	}{
		{"forward", "  - name: b\n    listen: 2\n    ports: [\"81\"]\n", "services[1].splice.drain_timeout"},
		{"socks5", "  - name: b\n    proxy: socks5\n    listen_on: [\"10.1.0.1:1080\"]\n    splice:\n      mode: never\n", "services[1].splice.drain_timeout"},
		{"forward within", "  - name: b\n    listen: 2\n    ports: [\"81\"]\n    splice:\n      drain_timeout: 2s\n", ""},
		{"http", "  - name: b\n    listen: 2\n    ports: [\"81\"]\n    proxy: http\n    http:\n      routes:\n        - path: /\n          backends: [\"10.2.0.2:80\"]\n", ""},
		{"ftp", "  - name: b\n    listen: 2\n    ports: [\"21\"]\n    proxy: ftp\n", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := config.Parse("t.yaml", []byte(splicing+c.service))
			switch {
			case c.err == "" && err != nil:
				t.Errorf("refused: %v", err)
			case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "splicectl splice")):
				t.Errorf("error %v, want one for %s naming the splice on request", err, c.err)
			}
		})
	}
	// Without a splicing service nothing is spliced, on request either.
	if _, err := config.Parse("t.yaml", []byte("kernel:\n  divert_timeout: 4s\nservices:\n  - name: b\n    listen: 2\n    ports: [\"81\"]\n")); err != nil {
		t.Errorf("no service splices: %v", err)
	}
}
