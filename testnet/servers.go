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

// StartNginx runs nginx (one process, no master) in the host's namespace,
// serving root/www on NginxPort over IPv4 and IPv6, with keep-alive for as
// many requests as a test sends. Its configuration, pid, logs and
// temporary files live under root. stop kills it.
func (h *Host) StartNginx(root string) (stop func(), err error) {
	conf := filepath.Join(root, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
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
    server {
        listen %[2]d;
        listen [::]:%[2]d;
        root %[1]s/www;
    }
}
`, root, NginxPort)), 0o644); err != nil {
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
