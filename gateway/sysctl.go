package gateway

import (
	"fmt"
	"os"
	"strings"

	"spliced/config"
	"spliced/logging"
)

// acceptLocal is net.ipv4.conf.all.accept_local. A spliced NAT flow
// forwards the client's packets with the gateway's own address as their
// source; IPv4 routing drops such packets as martians unless accept_local
// is set. IPv6 has no such check.
const acceptLocal = "/proc/sys/net/ipv4/conf/all/accept_local"

// needsAcceptLocal reports whether any service may splice NAT flows.
func needsAcceptLocal(cfg *config.Config) bool {
	for _, s := range cfg.Services {
		if s.Upstream == config.NAT && s.Splice.Mode != config.SpliceNever {
			return true
		}
	}
	return false
}

// enableAcceptLocal sets accept_local and returns a function restoring
// the previous value.
func (g *Gateway) enableAcceptLocal() (restore func(), err error) {
	old, err := os.ReadFile(acceptLocal)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", acceptLocal, err)
	}
	if strings.TrimSpace(string(old)) == "1" {
		return func() {}, nil
	}
	if err := os.WriteFile(acceptLocal, []byte("1"), 0o644); err != nil {
		return nil, fmt.Errorf("set %s: %w (spliced NAT flows need it)", acceptLocal, err)
	}
	g.log.Info("enabled net.ipv4.conf.all.accept_local: spliced NAT flows forward packets with the gateway's own source address; restored at shutdown")
	return func() {
		if err := os.WriteFile(acceptLocal, old, 0o644); err != nil {
			g.log.Error("restore net.ipv4.conf.all.accept_local", logging.Err(err))
		}
	}, nil
}
