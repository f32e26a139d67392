package testnet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// WaitListening waits until something listens on TCP port in the
// namespace.
func (n *NS) WaitListening(port uint16, within time.Duration) error {
	return Poll(within, func() error {
		out, err := n.Run("ss", "-ltnH", "sport", fmt.Sprintf("= :%d", port))
		if err != nil || !strings.Contains(out, fmt.Sprintf(":%d", port)) {
			return fmt.Errorf("nothing listens on port %d in %s", port, n.Name)
		}
		return nil
	})
}

// NginxPort is where StartNginx listens.
const NginxPort = 8080

// NginxConfig is a configuration of nginx in the foreground whose pid,
// logs and temporary files live under root, with keep-alive for as many
// requests as a test sends, no access log, and http (server and upstream
// blocks) in its http block. workers 0 is one process and no master;
// otherwise a master (as root, its workers too) runs that many workers.
func NginxConfig(root string, workers int, http string) string {
	procs := "master_process off;\nworker_processes 1;\n"
	if workers > 0 {
		procs = fmt.Sprintf("master_process on;\nworker_processes %d;\nuser root;\n", workers)
	}
	return fmt.Sprintf(`daemon off;
%[2]spid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
%[3]s}
`, root, procs, http)
}

// StartNginx runs nginx (one process, no master) in the host's namespace,
// serving root/www on NginxPort over IPv4 and IPv6, with keep-alive for as
// many requests as a test sends. Its configuration, pid, logs and
// temporary files live under root. stop kills it.
func (h *Host) StartNginx(root string) (stop func(), err error) {
	conf := filepath.Join(root, "nginx.conf")
	server := fmt.Sprintf(`    server {
        listen %[2]d;
        listen [::]:%[2]d;
        root %[1]s/www;
    }
`, root, NginxPort)
	if err := os.WriteFile(conf, []byte(NginxConfig(root, 0, server)), 0o644); err != nil {
		return nil, err
	}
	cmd := h.Command(context.Background(), "nginx", "-c", conf)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	stop = func() { cmd.Process.Kill(); cmd.Wait() }
	if err := h.WaitListening(NginxPort, 10*time.Second); err != nil {
		stop()
		return nil, fmt.Errorf("nginx: %w", err)
	}
	return stop, nil
}
