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
		{"bad proxy", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: socks\n", []string{"line 5: services[0].proxy:", `"socks"`, "forward, ftp or http"}},
		{"ftp transparent", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    upstream: transparent\n", []string{"line 6: services[0].upstream:", "only the gateway's address", "upstream: nat"}},
		{"ftp bad address", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      external: gw.example\n", []string{"line 7: services[0].ftp.external:", `"gw.example"`, "not an address"}},
		{"ftp privileged data ports", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      data_ports: \"20-30\"\n", []string{"line 7: services[0].ftp.data_ports:", "above 1023"}},
		{"ftp line limit", "services:\n  - name: a\n    listen: 1\n    ports: [\"21\"]\n    proxy: ftp\n    ftp:\n      max_line: 10\n", []string{"line 7: services[0].ftp.max_line:", "64-8192"}},
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
