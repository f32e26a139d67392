package socks5

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"spliced/config"
)

// TestLinkLocalZone: a client's address from its socket, and a name's
// from the hosts file, carry a link-local address's interface as a zone
// (fe80::2%eth0), which netip.Prefix.Contains never matches: the auth
// entry for fe80::/10 and a deny rule for it did not apply.
func TestLinkLocalZone(t *testing.T) {
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse("test.yaml", []byte(`
services:
  - name: socks
    proxy: socks5
    listen_on: ["127.0.0.1:1080"]
    socks5:
      method: none
      users_file: `+users+`
      auth:
        - sources: ["fe80::/10"]
          method: password
      rules:
        - action: deny
          destinations: ["fe80::/10"]
`))
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Services[0].Section().(*Config)
	zoned := netip.MustParseAddr("fe80::2%eth0")
	if m := c.method(zoned); m != Password {
		t.Errorf("method for %v: %v, want password (auth sources fe80::/10)", zoned, m)
	}
	if act, _ := c.decide("", "", zoned, 80); act != config.Deny {
		t.Errorf("destination %v: %v, want deny", zoned, act)
	}
}
