package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"

	"spliced/config"
	"spliced/logging"
)

// fwmarkAccept is net.ipv4.tcp_fwmark_accept (IPv6's TCP obeys it too):
// set, a socket accepted from a SYN takes the SYN's firewall mark.
const fwmarkAccept = "/proc/sys/net/ipv4/tcp_fwmark_accept"

// FwmarkAcceptProblem describes why intercepted connections fail with
// this namespace's net.ipv4.tcp_fwmark_accept, or is "" when they do
// not. An intercepted SYN carries spliced's mark, which routes it to the
// gateway's own sockets (kernel.mark, the route table's local route);
// with tcp_fwmark_accept on, the connection's socket takes that mark, and
// its SYN-ACK, routed by it, goes back into the gateway instead of out to
// the client: no intercepted connection opens.
func FwmarkAcceptProblem(cfg *config.Config) (string, error) {
	intercepts := false
	for _, s := range cfg.Services {
		intercepts = intercepts || s.ListenMode != config.ListenDirect
	}
	if !intercepts {
		return "", nil
	}
	b, err := os.ReadFile(fwmarkAccept)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", fwmarkAccept, err)
	}
	if strings.TrimSpace(string(b)) == "0" {
		return "", nil
	}
	return "net.ipv4.tcp_fwmark_accept is on: the gateway's sockets of intercepted connections take spliced's mark from the client's SYN, and their answers are routed back into the gateway (spliced's route table) instead of out: no intercepted connection opens. Turn it off (sysctl -w net.ipv4.tcp_fwmark_accept=0, and in /etc/sysctl.d), or give the services listen_mode: direct", nil
}

// checkFwmarkAccept reports what FwmarkAcceptProblem finds (see
// problemState); statusWarnings lists it. Under rulesMu, as
// checkFirewall.
func (g *Gateway) checkFwmarkAccept() {
	problem, err := FwmarkAcceptProblem(g.config())
	if err != nil {
		g.log.Debug("cannot check net.ipv4.tcp_fwmark_accept", logging.Err(err))
		return
	}
	g.fwmarkAccept.update(g.log, problem, slog.LevelError, "intercepted connections fail",
		"net.ipv4.tcp_fwmark_accept is off again: intercepted connections open")
}

// problemState is the problem a periodic check of the gateway's settings
// last found ("" none): a new or different one is logged at level with
// its detail, its end once, and the status lists it while it lasts.
type problemState struct{ last atomic.Pointer[string] }

// update records problem, logging what changed.
func (s *problemState) update(log *slog.Logger, problem string, level slog.Level, found, gone string) {
	was := ""
	if p := s.last.Load(); p != nil {
		was = *p
	}
	switch {
	case problem != "" && problem != was:
		log.Log(context.Background(), level, found, "detail", problem)
	case problem == "" && was != "":
		log.Info(gone)
	}
	s.last.Store(&problem)
}

// warnings is the status's line for the problem, if any.
func (s *problemState) warnings() []string {
	if p := s.last.Load(); p != nil && *p != "" {
		return []string{*p}
	}
	return nil
}
