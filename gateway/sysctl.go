package gateway

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"spliced/api"
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

// acceptLocalRecord is where the value accept_local had before spliced
// set it is kept while spliced runs, per table and network namespace
// (beside the table's lock, and named by the namespace as it is), so that
// after a kill -9 the next daemon or -cleanup can restore it. The
// namespace's cookie is never reused; its inode, the name before, is
// once the namespace is gone, and a record left by a daemon killed in a
// namespace since deleted would pass to the next one with that inode.
func acceptLocalRecord(table string) string {
	return runPath("table-"+table, "accept_local")
}

// enableAcceptLocal sets accept_local and returns a function restoring
// the value it had before spliced set it: the one recorded by a daemon
// that died without restoring it, else the present one.
func (g *Gateway) enableAcceptLocal(table string) (restore func(), err error) {
	cur, err := os.ReadFile(acceptLocal)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", acceptLocal, err)
	}
	old := cur
	rec := acceptLocalRecord(table)
	if rec != "" {
		if saved, err := os.ReadFile(rec); err == nil && len(strings.TrimSpace(string(saved))) > 0 {
			old = saved // set by a daemon that was killed
			g.log.Info("net.ipv4.conf.all.accept_local was set by a spliced that did not stop cleanly; its earlier value is restored at shutdown", "value", strings.TrimSpace(string(saved)))
		} else if strings.TrimSpace(string(cur)) != "1" {
			if err := os.MkdirAll(RunDir, 0o755); err == nil {
				if err := os.WriteFile(rec, old, 0o600); err != nil {
					g.log.Warn("cannot record net.ipv4.conf.all.accept_local: after a kill -9 it stays 1", logging.Err(err))
					rec = ""
				}
			}
		}
	}
	if strings.TrimSpace(string(old)) == "1" {
		return func() {}, nil
	}
	if strings.TrimSpace(string(cur)) != "1" {
		if err := os.WriteFile(acceptLocal, []byte("1"), 0o644); err != nil {
			if rec != "" {
				os.Remove(rec)
			}
			return nil, fmt.Errorf("set %s: %w (spliced NAT flows need it)", acceptLocal, err)
		}
	}
	g.log.Info("enabled net.ipv4.conf.all.accept_local: spliced NAT flows forward packets with the gateway's own source address; restored at shutdown")
	return func() {
		if err := os.WriteFile(acceptLocal, old, 0o644); err != nil {
			g.log.Error("restore net.ipv4.conf.all.accept_local", logging.Err(err))
			return
		}
		if rec != "" {
			os.Remove(rec)
		}
	}, nil
}

// restoreAcceptLocal gives accept_local back the value a killed daemon
// recorded before it set it (spliced -cleanup).
func restoreAcceptLocal(table string) error {
	rec := acceptLocalRecord(table)
	if rec == "" {
		return nil
	}
	saved, err := os.ReadFile(rec)
	if err != nil {
		return nil // nothing recorded: nothing to restore
	}
	if err := os.WriteFile(acceptLocal, saved, 0o644); err != nil {
		return fmt.Errorf("restore %s: %w", acceptLocal, err)
	}
	return os.Remove(rec)
}

// sysctlCheckEvery is how often checkAcceptLocal reads accept_local: no
// event says a sysctl changed, and a read costs a few microseconds.
const sysctlCheckEvery = time.Second

// checkAcceptLocal sets accept_local again when someone set it back to 0
// while spliced NAT flows need it (an operator, a hardening script):
// their packets, which carry the gateway's own address once rewritten,
// were dropped as martians, and every such flow stalled for good without
// a word (TestLabAcceptLocalResetWhileRunning). With kernel.repair off,
// or when it cannot be set, it says so and the status lists it until it
// is 1 again. The value it had before spliced goes back at the stop, as
// before.
func (g *Gateway) checkAcceptLocal() {
	if !g.acceptLocalNeeded.Load() {
		return
	}
	b, err := os.ReadFile(acceptLocal)
	if err != nil || strings.TrimSpace(string(b)) == "1" {
		g.acceptLocalOff.update(g.log, "", slog.LevelError, "", "net.ipv4.conf.all.accept_local is 1 again: spliced NAT flows' packets pass")
		return
	}
	const what = "net.ipv4.conf.all.accept_local was set to 0 while spliced runs: spliced NAT flows forward packets with the gateway's own source address, which the kernel drops as martians without it"
	if g.config().Kernel.Repair != "off" {
		if err = os.WriteFile(acceptLocal, []byte("1"), 0o644); err == nil {
			g.log.Warn(what+"; set to 1 again (its value before spliced is restored at shutdown)", "value", strings.TrimSpace(string(b)))
			g.repairs.Add(1)
			g.events.publish(api.Event{Kind: api.EventDrift, Detail: "net.ipv4.conf.all.accept_local set to 0"})
			g.events.publish(api.Event{Kind: api.EventRepaired, Detail: "net.ipv4.conf.all.accept_local set to 1 again"})
			return
		}
	}
	problem := what + "; set it to 1 (sysctl -w net.ipv4.conf.all.accept_local=1): spliced restores its earlier value when it stops"
	if err != nil {
		problem += fmt.Sprintf(" (spliced could not: %v)", err)
	}
	g.acceptLocalOff.update(g.log, problem, slog.LevelError, "spliced NAT flows' packets are dropped", "")
}
