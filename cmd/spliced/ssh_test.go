package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"spliced/api"
	"spliced/proxy/socks5"
	"spliced/testnet"
)

// sshPort is where the lab's sshd listens in the server namespace.
const sshPort = 2222

// sshFileSize is the size of each file scp copies.
const sshFileSize = 50 << 20

// sshLab is a lab with an sshd on the server and spliced's SOCKS5
// service on the gateway's client-side addresses, port 1080, which lets
// the lab's client in without a login (nc -X 5 offers no other method).
type sshLab struct {
	lab *testnet.Lab
	d   *testnet.Daemon
	gw  [2]netip.AddrPort // SOCKS5 service, IPv4 and IPv6
	key string            // the client's private key
	dir string            // the server side's files (the remote paths)
}

// startSSHD runs sshd in h's namespace with a configuration, host key
// and authorized key of its own in dir, as root, and stops it and every
// session process it forked in t.Cleanup.
func startSSHD(t *testing.T, h *testnet.Host, dir, pubKey string) {
	t.Helper()
	sshd, err := exec.LookPath("sshd")
	if err != nil {
		t.Fatal(err)
	}
	// sshd re-executes itself and needs an absolute path; its
	// privilege-separated child chroots to /run/sshd, which Debian's
	// package creates only when the service starts (the tests never
	// start it on the host). It is left in place, as the package's.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatal(err)
	}
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spliced lab host", "-f", hostKey).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	auth := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(auth, []byte(pubKey), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "sshd_config")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`Port %d
AddressFamily any
ListenAddress 0.0.0.0
ListenAddress ::
HostKey %s
PidFile %s
AuthorizedKeysFile %s
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
PrintMotd no
LogLevel VERBOSE
`, sshPort, hostKey, filepath.Join(dir, "sshd.pid"), auth)), 0o600); err != nil {
		t.Fatal(err)
	}
	var logMu sync.Mutex
	var log bytes.Buffer
	cmd := h.Command(context.Background(), sshd, "-D", "-e", "-f", cfg)
	cmd.Stdout = &lockedWriter{mu: &logMu, w: &log}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshd: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		// Sessions run in processes of their own (sshd calls setsid):
		// stop what is left of them in the namespace, which holds
		// nothing else of ours.
		killSSHDSessions(t, h)
		if t.Failed() {
			logMu.Lock()
			t.Logf("sshd log:\n%s", log.String())
			logMu.Unlock()
		}
	})
	if err := testnet.Poll(10*time.Second, func() error {
		select {
		case <-exited:
			logMu.Lock()
			defer logMu.Unlock()
			return fmt.Errorf("sshd exited: %s", log.String())
		default:
		}
		return h.WaitListening(sshPort, 0)
	}); err != nil {
		t.Fatal(err)
	}
}

// killSSHDSessions kills the sshd processes left in h's namespace and
// waits until they are gone.
func killSSHDSessions(t *testing.T, h *testnet.Host) {
	t.Helper()
	left := func() []int {
		out, _ := exec.Command("ip", "netns", "pids", h.Name).Output()
		var pids []int
		for _, f := range strings.Fields(string(out)) {
			var pid int
			if _, err := fmt.Sscan(f, &pid); err != nil {
				continue
			}
			comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if err == nil && strings.HasPrefix(string(comm), "sshd") {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	for _, pid := range left() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := testnet.Poll(10*time.Second, func() error {
		if pids := left(); len(pids) > 0 {
			return fmt.Errorf("sshd processes still in %s: %v", h.Name, pids)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func startSSHLab(t *testing.T, mode string) *sshLab {
	t.Helper()
	sl := &sshLab{lab: testnet.NewT(t, testnet.Options{}), dir: t.TempDir()}
	keyDir := t.TempDir()
	sl.key = filepath.Join(keyDir, "id_ed25519")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spliced lab client", "-f", sl.key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	pub, err := os.ReadFile(sl.key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	startSSHD(t, sl.lab.Server(), t.TempDir(), string(pub))

	// Logins are required, except from the lab client's subnets.
	hash, err := socks5.HashPassword([]byte("s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte("alice:"+hash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cl := sl.lab.Client()
	gw := sl.lab.GatewayClientSide[0]
	sl.gw = [2]netip.AddrPort{netip.AddrPortFrom(gw.IPv4, 1080), netip.AddrPortFrom(gw.IPv6, 1080)}
	splice := "never"
	if mode == "splice" {
		splice = "immediate"
	}
	sl.d = testnet.StartDaemon(t, sl.lab, fmt.Sprintf(`
log:
  level: debug
services:
  - name: socks
    proxy: socks5
    listen_on: ["%s", "%s"]
    splice:
      mode: %s
    socks5:
      users_file: %s
      method: password
      auth:
        - sources: [%s, %s]
          method: none
`, sl.gw[0], sl.gw[1], splice, users,
		netip.PrefixFrom(cl.IPv4, 24).Masked(), netip.PrefixFrom(cl.IPv6, 64).Masked()))
	return sl
}

// sshArgs are the options of ssh and scp: no configuration file, agent
// or known hosts of the machine's, the test's key, and nc speaking
// SOCKS5 to the gateway.
func (sl *sshLab) sshArgs(v6 bool) []string {
	gw := sl.gw[0]
	if v6 {
		gw = sl.gw[1]
	}
	return []string{"-F", "none",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
		"-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "LogLevel=ERROR",
		"-o", "ConnectTimeout=20", "-i", sl.key,
		"-o", fmt.Sprintf("ProxyCommand=nc -X 5 -x %s %%h %%p", gw)}
}

// command runs name (ssh or scp) with args in the client namespace and
// returns its standard output.
func (sl *sshLab) command(stdin io.Reader, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := sl.lab.Client().Command(ctx, name, args...)
	cmd.Env = sshEnv()
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// sshEnv is the test's environment without an ssh agent.
func sshEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SSH_AUTH_SOCK=") {
			env = append(env, kv)
		}
	}
	return env
}

// target is the server's address as ssh and scp name it.
func (sl *sshLab) target(v6 bool) (ssh, scp string) {
	a := sl.lab.Server().Addr(v6)
	if v6 {
		return "root@" + a.String(), "root@[" + a.String() + "]"
	}
	return "root@" + a.String(), "root@" + a.String()
}

// randomFile writes size bytes of seeded random data to path and
// returns their SHA-256.
func randomFile(t *testing.T, path string, seed uint64, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), testnet.NewRandomStream(seed), size); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// engines returns the daemon's proxy and splice engine counters (the
// splice engine's are zero when no service splices).
func engines(t *testing.T, d *testnet.Daemon) (proxied, spliced api.Engine) {
	t.Helper()
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Engines {
		switch e.Name {
		case "proxy":
			proxied = e
		case "splice":
			spliced = e
		}
	}
	return proxied, spliced
}

// TestLabSOCKSSSH: OpenSSH through the SOCKS5 gateway, as people use
// it: ssh -o ProxyCommand='nc -X 5 -x GW:1080 %h %p' (OpenBSD's netcat,
// no login: the service lets the lab's client subnets in with method
// none) to an sshd in the server namespace. Over IPv4 and IPv6, copied
// and spliced: a remote command whose output names the gateway as the
// peer, and scp of 50 MB of random data each way, SHA-256 checked. In
// splice mode the engine's counters show the bytes went through the
// splice engine, not the proxy, and a live session has no socket left
// on the gateway while its packets pass the queues.
func TestLabSOCKSSSH(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "sshd", "ssh", "scp", "ssh-keygen", "nc", "ss")
	src := t.TempDir()
	upFile := filepath.Join(src, "up.bin")
	upSum := randomFile(t, upFile, 22, sshFileSize)
	for _, mode := range []string{"copy", "splice"} {
		t.Run(mode, func(t *testing.T) {
			sl := startSSHLab(t, mode)
			downFile := filepath.Join(sl.dir, "down.bin")
			downSum := randomFile(t, downFile, 23, sshFileSize)
			for _, v6 := range []bool{false, true} {
				name := map[bool]string{false: "v4", true: "v6"}[v6]
				t.Run(name, func(t *testing.T) {
					sshTarget, scpTarget := sl.target(v6)
					args := sl.sshArgs(v6)
					port := fmt.Sprint(sshPort)

					// A remote command: the server sees the gateway's
					// server-side address as the peer (the SOCKS5
					// service connects from its own address).
					out, err := sl.command(nil, "ssh", append(args, "-p", port, sshTarget, "echo ssh-ok $SSH_CONNECTION")...)
					if err != nil {
						t.Fatal(err)
					}
					f := strings.Fields(lastLine(out, "ssh-ok "))
					gwSrv := sl.lab.GatewayServerSide[0].Addr(v6).String()
					if len(f) != 5 || f[1] != gwSrv || f[3] != sl.lab.Server().Addr(v6).String() || f[4] != port {
						t.Fatalf("remote command printed %q, want ssh-ok %s PORT %s %d", out, gwSrv, sl.lab.Server().Addr(v6), sshPort)
					}
					t.Logf("remote command: %s", strings.TrimSpace(lastLine(out, "ssh-ok ")))

					// scp up: the server computes the SHA-256 of what it
					// received.
					p0, s0 := engines(t, sl.d)
					remote := filepath.Join(sl.dir, "up-"+name+".bin")
					start := time.Now()
					if _, err := sl.command(nil, "scp", append(args, "-q", "-P", port, upFile, scpTarget+":"+remote)...); err != nil {
						t.Fatal(err)
					}
					upTime := time.Since(start)
					out, err = sl.command(nil, "ssh", append(args, "-p", port, sshTarget, "sha256sum "+remote)...)
					if err != nil {
						t.Fatal(err)
					}
					if got := strings.Fields(lastLine(out, "")); len(got) == 0 || got[0] != upSum {
						t.Fatalf("scp up: the server's sha256sum says %q, want %s", out, upSum)
					}
					os.Remove(remote)
					p1, s1 := engines(t, sl.d)

					// scp down.
					local := filepath.Join(t.TempDir(), "down.bin")
					start = time.Now()
					if _, err := sl.command(nil, "scp", append(args, "-q", "-P", port, scpTarget+":"+downFile, local)...); err != nil {
						t.Fatal(err)
					}
					downTime := time.Since(start)
					sum, err := fileSum(local)
					if err != nil {
						t.Fatal(err)
					}
					if sum != downSum {
						t.Fatalf("scp down: SHA-256 %s, want %s", sum, downSum)
					}
					os.Remove(local)
					p2, s2 := engines(t, sl.d)
					t.Logf("%s %s: scp %d MB up in %v, down in %v", mode, name, sshFileSize>>20,
						upTime.Round(time.Millisecond), downTime.Round(time.Millisecond))

					// Which engine moved the bytes. ssh's framing and MACs
					// only add to the file's size.
					moved := func(e0, e1 api.Engine) (c2s, s2c uint64) { return e1.BytesC2S - e0.BytesC2S, e1.BytesS2C - e0.BytesS2C }
					pUp, _ := moved(p0, p1)
					sUp, _ := moved(s0, s1)
					_, pDown := moved(p1, p2)
					_, sDown := moved(s1, s2)
					t.Logf("%s %s: proxy engine moved %d up, %d down; splice engine %d up, %d down (%d splices)",
						mode, name, pUp, pDown, sUp, sDown, s2.Splices-s0.Splices)
					if mode == "copy" {
						if pUp < sshFileSize || pDown < sshFileSize {
							t.Errorf("the proxy moved %d bytes up and %d down, want at least %d each", pUp, pDown, sshFileSize)
						}
						if s2.Splices != 0 || sUp != 0 || sDown != 0 {
							t.Errorf("splice engine busy in copy mode: %+v", s2)
						}
						return
					}
					if sUp < sshFileSize || sDown < sshFileSize {
						t.Errorf("the splice engine moved %d bytes up and %d down, want at least %d each", sUp, sDown, sshFileSize)
					}
					// The proxy relays at most what arrived before the
					// splice: ssh's banners, never the file.
					if pUp >= 1<<20 || pDown >= 1<<20 {
						t.Errorf("the proxy moved %d bytes up and %d down in splice mode", pUp, pDown)
					}
					if s1.Splices <= s0.Splices || s2.Splices <= s1.Splices {
						t.Errorf("splices %d, %d, %d: not one per scp", s0.Splices, s1.Splices, s2.Splices)
					}
					if strings.Contains(sl.d.Log(), "flow stays proxied") {
						t.Error("a flow stayed proxied in splice mode")
					}
					sl.provenSplicedSession(t, v6)
				})
			}
		})
	}
}

// lastLine returns the last line of out that starts with prefix.
func lastLine(out, prefix string) string {
	var last string
	for _, l := range strings.Split(out, "\n") {
		if l != "" && strings.HasPrefix(l, prefix) {
			last = l
		}
	}
	return last
}

// provenSplicedSession holds an ssh session open (remote cat echoing
// its input) once it is spliced, shows that the gateway has no socket
// of the flow left, and that the session's bytes then pass the queues:
// echoed data arrives intact and the queue counter grows.
func (sl *sshLab) provenSplicedSession(t *testing.T, v6 bool) {
	t.Helper()
	sshTarget, _ := sl.target(v6)
	spliced := func() int { return strings.Count(sl.d.Log(), `"msg":"flow spliced"`) }
	before := spliced()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := sl.lab.Client().Command(ctx, "ssh", append(sl.sshArgs(v6), "-p", fmt.Sprint(sshPort), sshTarget, "cat")...)
	cmd.Env = sshEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		in.Close()
		cancel()
		cmd.Wait()
	}()
	out := bufio.NewReader(outPipe)
	echo := func(line string) error {
		if _, err := io.WriteString(in, line+"\n"); err != nil {
			return err
		}
		got, err := out.ReadString('\n')
		if err != nil {
			return fmt.Errorf("echo: %w (ssh: %s)", err, strings.TrimSpace(stderr.String()))
		}
		if got != line+"\n" {
			return fmt.Errorf("echo %q, want %q", got, line)
		}
		return nil
	}
	// The session is up (authenticated, cat running) when a line comes
	// back; its flow was spliced right after the SOCKS5 reply.
	if err := echo("first"); err != nil {
		t.Fatal(err)
	}
	testnet.Eventually(t, 10*time.Second, func() error {
		if n := spliced(); n <= before {
			return fmt.Errorf("no new flow spliced (%d before)", before)
		}
		return nil
	})
	var client string
	for _, l := range sl.d.Lines() {
		if l["msg"] == "flow spliced" {
			client = fmt.Sprint(l["client"])
		}
	}
	queued, err := queuedPackets(sl.lab)
	if err != nil {
		t.Fatal(err)
	}
	ss, err := sl.lab.Gateway.Run("ss", "-tanH", "state", "all")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(ss, "\n") {
		if strings.Contains(line, client+" ") || strings.HasSuffix(line, client) {
			t.Errorf("the gateway still has a socket of spliced session %s: %s", client, line)
		}
	}
	line := strings.Repeat("0123456789abcdef", 4096) // 64 KiB
	for i := 0; i < 4; i++ {
		if err := echo(fmt.Sprint(i, line)); err != nil {
			t.Fatal(err)
		}
	}
	after, err := queuedPackets(sl.lab)
	if err != nil {
		t.Fatal(err)
	}
	if after <= queued {
		t.Errorf("the spliced session's packets did not pass the queues (%d -> %d)", queued, after)
	}
	t.Logf("spliced session %s: no socket on the gateway, %d packets queued while 256 KiB echoed", client, after-queued)
}
