package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

// ftpSize is the size of the files moved each way.
const ftpSize = 50 << 20

// ftpLab is a lab whose server runs vsftpd (anonymous, uploads allowed)
// and whose gateway runs spliced with an FTP service on port 21 (and
// 2121 for fake servers).
type ftpLab struct {
	lab    *testnet.Lab
	d      *testnet.Daemon
	root   string // vsftpd's anonymous root
	xfer   string // vsftpd's log
	big    string // ftpSize random bytes in root, as big.bin
	bigSum string
	up     string // ftpSize random bytes on the client side, to upload
	upSum  string
	work   string // the client's download directory
}

func ftpConfig(mode string) string {
	splice := "never"
	if mode == "splice" {
		splice = "immediate"
	}
	return fmt.Sprintf(`
log:
  level: debug
services:
  - name: ftp
    listen: 15021
    ports: ["21", "2121"]
    proxy: ftp
    ftp:
      data_ports: "41000-41099"
      data_timeout: 10s
    splice:
      mode: %s
`, splice)
}

func startFTPLab(t *testing.T, mode string) *ftpLab {
	t.Helper()
	testnet.Privileged(t, "vsftpd", "curl", "lftp")
	dir := t.TempDir()
	os.Chmod(dir, 0o755) // vsftpd drops to user ftp inside its root
	fl := &ftpLab{root: filepath.Join(dir, "root"), xfer: filepath.Join(dir, "vsftpd.log"), work: filepath.Join(dir, "client")}
	for _, d := range []string{fl.root, filepath.Join(fl.root, "upload"), filepath.Join(dir, "empty"), fl.work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(fl.root, "upload"), 0o777)
	fl.big, fl.bigSum = writeRandom(t, filepath.Join(fl.root, "big.bin"), 1)
	fl.up, fl.upSum = writeRandom(t, filepath.Join(dir, "up.bin"), 2)
	if err := os.WriteFile(filepath.Join(fl.root, "small.txt"), []byte("small file through the gateway\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "vsftpd.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`listen=NO
listen_ipv6=YES
background=NO
anonymous_enable=YES
no_anon_password=YES
local_enable=NO
write_enable=YES
anon_upload_enable=YES
anon_other_write_enable=YES
anon_umask=022
anon_root=%s
secure_chroot_dir=%s
xferlog_enable=YES
xferlog_std_format=NO
log_ftp_protocol=YES
vsftpd_log_file=%s
connect_from_port_20=YES
pasv_min_port=30000
pasv_max_port=30999
seccomp_sandbox=NO
ssl_enable=NO
async_abor_enable=YES
`, fl.root, filepath.Join(dir, "empty"), fl.xfer)), 0o600); err != nil {
		t.Fatal(err)
	}
	fl.lab = testnet.NewT(t, testnet.Options{})
	srv := fl.lab.Server().Command(context.Background(), "vsftpd", conf)
	srv.Stdout, srv.Stderr = os.Stderr, os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	if err := fl.lab.Server().WaitListening(21, 5*time.Second); err != nil {
		t.Fatalf("vsftpd: %v", err)
	}
	fl.d = testnet.StartDaemon(t, fl.lab, ftpConfig(mode))
	return fl
}

// writeRandom writes ftpSize bytes from seed to path and returns the path
// and their SHA-256.
func writeRandom(t *testing.T, path string, seed uint64) (string, string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), testnet.NewRandomStream(seed), ftpSize); err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o644)
	return path, hex.EncodeToString(h.Sum(nil))
}

func fileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// client runs a command in the client namespace with a time limit.
func (fl *ftpLab) client(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := fl.lab.Client().Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s\ndaemon log:\n%s", name, strings.Join(args, " "), err, out, tail(fl.d.Log(), 30))
	}
	return string(out)
}

func (fl *ftpLab) url(v6 bool, path string) string {
	if v6 {
		return fmt.Sprintf("ftp://[%s]/%s", fl.lab.Server().IPv6, path)
	}
	return fmt.Sprintf("ftp://%s/%s", fl.lab.Server().IPv4, path)
}

func (fl *ftpLab) checkSum(t *testing.T, what, path, want string) {
	t.Helper()
	got, err := fileSum(path)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if got != want {
		t.Fatalf("%s: SHA-256 %s, want %s", what, got, want)
	}
}

// peersInLog returns the client addresses vsftpd logged.
func (fl *ftpLab) peersInLog(t *testing.T) map[string]int {
	t.Helper()
	b, err := os.ReadFile(fl.xfer)
	if err != nil {
		t.Fatal(err)
	}
	peers := map[string]int{}
	for _, m := range regexp.MustCompile(`Client "([^"]+)"`).FindAllStringSubmatch(string(b), -1) {
		peers[strings.TrimPrefix(m[1], "::ffff:")]++
	}
	return peers
}

// TestLabFTP: curl and lftp through the FTP proxy to vsftpd, active and
// passive, IPv4 and IPv6 (PORT, PASV, EPRT, EPSV), 50 MB each way verified
// by SHA-256; vsftpd sees only the gateway's address; in splice mode every
// data connection is spliced (proven mid-transfer) while the control
// connection stays proxied across several transfers.
func TestLabFTP(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			fl := startFTPLab(t, mode)
			type transfer struct {
				name string
				v6   bool
				args []string // curl's transfer mode options
				put  bool
			}
			transfers := []transfer{
				{"ipv4 PASV download", false, []string{"--disable-epsv"}, false},
				{"ipv4 EPSV upload", false, nil, true},
				{"ipv4 PORT download", false, []string{"-P", "-", "--disable-eprt"}, false},
				{"ipv4 EPRT upload", false, []string{"-P", "-"}, true},
				{"ipv6 EPSV download", true, nil, false},
				{"ipv6 EPRT upload", true, []string{"-P", "-"}, true},
			}
			before, err := queuedPackets(fl.lab)
			if err != nil {
				t.Fatal(err)
			}
			for i, tr := range transfers {
				name := fmt.Sprintf("t%d.bin", i)
				start := time.Now()
				if tr.put {
					fl.client(t, "curl", append([]string{"-gsS", "--connect-timeout", "10", "-T", fl.up, fl.url(tr.v6, "upload/"+name)}, tr.args...)...)
					fl.checkSum(t, tr.name, filepath.Join(fl.root, "upload", name), fl.upSum)
				} else {
					out := filepath.Join(fl.work, name)
					fl.client(t, "curl", append([]string{"-gsS", "--connect-timeout", "10", "-o", out, fl.url(tr.v6, "big.bin")}, tr.args...)...)
					fl.checkSum(t, tr.name, out, fl.bigSum)
				}
				t.Logf("%s: %s, 50 MB in %v", mode, tr.name, time.Since(start).Round(time.Millisecond))
			}

			// One lftp session, several transfers both ways and in both
			// modes, on one control connection.
			lout := filepath.Join(fl.work, "lftp.bin")
			fl.client(t, "lftp", "-c", fmt.Sprintf(`set ftp:ssl-allow no; set net:max-retries 1; set net:timeout 20; open %s;
set ftp:passive-mode on; get big.bin -o %s; put %s -o upload/lftp1.bin;
set ftp:passive-mode off; put %s -o upload/lftp2.bin; bye`, fl.url(false, ""), lout, fl.up, fl.up))
			fl.checkSum(t, "lftp passive download", lout, fl.bigSum)
			fl.checkSum(t, "lftp passive upload", filepath.Join(fl.root, "upload", "lftp1.bin"), fl.upSum)
			fl.checkSum(t, "lftp active upload", filepath.Join(fl.root, "upload", "lftp2.bin"), fl.upSum)
			var lftpSession map[string]any
			testnet.Eventually(t, 5*time.Second, func() error {
				lftpSession = nil
				for _, l := range fl.d.Lines() {
					if l["msg"] == "ftp session closed" {
						if n, _ := l["transfers"].(float64); n >= 3 { // get, 2 puts
							lftpSession = l
						}
					}
				}
				if lftpSession == nil {
					return fmt.Errorf("no ftp session with 3 transfers closed")
				}
				return nil
			})

			gw4, gw6 := fl.lab.GatewayServerSide[0].IPv4.String(), fl.lab.GatewayServerSide[0].IPv6.String()
			peers := fl.peersInLog(t)
			if len(peers) == 0 {
				t.Fatalf("vsftpd logged no client")
			}
			for p, n := range peers {
				if p != gw4 && p != gw6 {
					t.Errorf("vsftpd logged client %s (%d times); it must only see the gateway (%s, %s)", p, n, gw4, gw6)
				}
			}

			opened, spliced := 0, 0
			// A splice logs its line once the flow's packets are
			// released: a short transfer may end before it.
			testnet.Poll(10*time.Second, func() error {
				opened, spliced = 0, 0
				for _, l := range fl.d.Lines() {
					switch l["msg"] {
					case "ftp data connection opened":
						opened++
					case "flow spliced":
						spliced++
					}
				}
				if mode == "splice" && spliced < opened {
					return fmt.Errorf("%d of %d data connections spliced", spliced, opened)
				}
				return nil
			})
			if opened != len(transfers)+3 {
				t.Errorf("%d data connections opened, want %d", opened, len(transfers)+3)
			}
			want := 0
			if mode == "splice" {
				want = opened
			}
			if spliced != want {
				t.Errorf("mode %s: %d of %d data connections spliced, want %d", mode, spliced, opened, want)
			}
			if ctl := fl.d.FindLog(func(l map[string]any) bool {
				return l["msg"] == "flow spliced" && l["service"] == "ftp" && fmt.Sprint(l["server"]) == fl.lab.Server().IPv4.String()+":21"
			}); ctl != nil {
				t.Errorf("a control connection was spliced: %v", ctl)
			}
			after, err := queuedPackets(fl.lab)
			if err != nil {
				t.Fatal(err)
			}
			if mode == "splice" && after-before < ftpSize/65536 {
				t.Errorf("queues saw %d packets for %d spliced transfers", after-before, spliced)
			}
			t.Logf("%s: %d data connections, %d spliced, %d packets queued; vsftpd saw %v", mode, opened, spliced, after-before, peers)
		})
	}
}

// TestLabFTPSplicedMidTransfer: while a rate-limited download runs, its
// data connection has no socket on the gateway and the queue counters
// grow; the control connection is still a proxied socket.
func TestLabFTPSplicedMidTransfer(t *testing.T) {
	t.Parallel()
	fl := startFTPLab(t, "splice")
	out := filepath.Join(fl.work, "slow.bin")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := fl.lab.Client().Command(ctx, "curl", "-sS", "--limit-rate", "15M", "-o", out, fl.url(false, "big.bin"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	proofErr := provenSpliced(fl.lab, fl.d, false)
	ctl, ssErr := fl.lab.Gateway.Run("ss", "-tanH", "state", "established", "sport", "= :21")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("curl: %v: %s", err, stderr.String())
	}
	if proofErr != nil {
		t.Fatal(proofErr)
	}
	if ssErr != nil || !strings.Contains(ctl, ":21") {
		t.Errorf("no proxied control connection on the gateway during the transfer: %v %q", ssErr, ctl)
	}
	fl.checkSum(t, "rate-limited download", out, fl.bigSum)
}

// ftpConn is a raw FTP control connection from the client namespace.
type ftpConn struct {
	t *testing.T
	c *net.TCPConn
	r *bufio.Reader
}

func (fl *ftpLab) dialFTP(t *testing.T, port uint16) *ftpConn {
	t.Helper()
	c, err := fl.lab.Client().Dial(netip.AddrPortFrom(fl.lab.Server().IPv4, port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fc := &ftpConn{t: t, c: c, r: bufio.NewReader(c)}
	fc.expect("220")
	return fc
}

// reply reads one whole reply and returns its last line.
func (fc *ftpConn) reply() string {
	fc.t.Helper()
	fc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		line, err := fc.r.ReadString('\n')
		if err != nil {
			fc.t.Fatalf("reading a reply: %v (got %q)", err, line)
		}
		if len(line) >= 4 && line[3] == ' ' {
			return strings.TrimSpace(line)
		}
	}
}

func (fc *ftpConn) expect(code string) string {
	fc.t.Helper()
	r := fc.reply()
	if !strings.HasPrefix(r, code+" ") {
		fc.t.Fatalf("reply %q, want %s", r, code)
	}
	return r
}

func (fc *ftpConn) send(line string) {
	fc.t.Helper()
	if _, err := fc.c.Write([]byte(line + "\r\n")); err != nil {
		fc.t.Fatal(err)
	}
}

func (fc *ftpConn) login() {
	fc.t.Helper()
	fc.send("USER anonymous")
	if r := fc.reply(); strings.HasPrefix(r, "331 ") {
		fc.send("PASS x")
		fc.expect("230")
	} else if !strings.HasPrefix(r, "230 ") {
		fc.t.Fatalf("USER: %q", r)
	}
}

// expectClosed checks that the gateway closed the connection.
func (fc *ftpConn) expectClosed() {
	fc.t.Helper()
	fc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(fc.r)
	if err != nil {
		fc.t.Fatalf("connection not closed cleanly: %v (read %q)", err, rest)
	}
}

// TestLabFTPHostile: what a hostile or broken client or server sends gets
// a refusal or ends the session, and never opens anything towards a third
// host.
func TestLabFTPHostile(t *testing.T) {
	t.Parallel()
	fl := startFTPLab(t, "splice")
	warned := func(t *testing.T, msg string) {
		t.Helper()
		testnet.Eventually(t, 5*time.Second, func() error {
			if fl.d.FindLog(func(l map[string]any) bool { return strings.Contains(fmt.Sprint(l["msg"]), msg) }) == nil {
				return fmt.Errorf("no log line with %q", msg)
			}
			return nil
		})
	}
	serverSaw := func(t *testing.T, cmd string) bool {
		t.Helper()
		b, err := os.ReadFile(fl.xfer)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), `"`+cmd)
	}

	t.Run("PORT naming a third host", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.login()
		fc.send("PORT 10,2,0,99,156,64")
		fc.expect("500")
		fc.send("EPRT |1|10.2.0.99|40000|")
		fc.expect("500")
		warned(t, "FTP bounce")
		fc.send("NOOP")
		fc.expect("200") // the session goes on
		if serverSaw(t, "PORT 10,2,0,99") || serverSaw(t, "EPRT |1|10.2.0.99") {
			t.Errorf("the server received the bounce command")
		}
	})

	t.Run("PORT with port 21", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.login()
		fc.send("PORT 10,1,0,2,0,21")
		fc.expect("500")
		warned(t, "privileged port")
		fc.send("NOOP")
		fc.expect("200")
	})

	t.Run("commands in 1-byte segments", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.c.SetNoDelay(true)
		slow := func(line string) {
			for _, b := range []byte(line + "\r\n") {
				if _, err := fc.c.Write([]byte{b}); err != nil {
					t.Fatal(err)
				}
				time.Sleep(2 * time.Millisecond)
			}
		}
		slow("USER anonymous")
		fc.expect("230") // vsftpd asks no password of anonymous here
		slow("PASV")
		r := fc.expect("227")
		data := dialPASV(t, fl, r)
		slow("RETR small.txt")
		fc.expect("150")
		got, err := io.ReadAll(data)
		if err != nil || string(got) != "small file through the gateway\n" {
			t.Fatalf("data %q, %v", got, err)
		}
		fc.expect("226")
	})

	t.Run("600-byte line", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.login()
		fc.send("CWD " + strings.Repeat("a", 596))
		fc.expect("421")
		fc.expectClosed()
		warned(t, "command line longer than max_line")
	})

	t.Run("NUL byte", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.login()
		fc.send("CWD up\x00load")
		fc.expect("421")
		fc.expectClosed()
		warned(t, "NUL byte in a command line")
	})

	t.Run("AUTH TLS refused", func(t *testing.T) {
		fc := fl.dialFTP(t, 21)
		fc.send("AUTH TLS")
		fc.expect("534")
		fc.login() // plain FTP goes on
	})

	t.Run("PASV reply naming another host", func(t *testing.T) {
		// A fake server on port 2121 whose 227 names 10.2.0.99; its
		// data listener is on its own address.
		srvAddr := netip.AddrPortFrom(fl.lab.Server().IPv4, 2121)
		ln, err := fl.lab.Server().Listen(srvAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		dataLn, err := fl.lab.Server().Listen(netip.AddrPortFrom(fl.lab.Server().IPv4, 0))
		if err != nil {
			t.Fatal(err)
		}
		defer dataLn.Close()
		dataPort := dataLn.Addr().(*net.TCPAddr).Port
		dataPeer := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			r := bufio.NewReader(c)
			fmt.Fprint(c, "220 fake server\r\n")
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				switch strings.Fields(line)[0] {
				case "PASV":
					fmt.Fprintf(c, "227 Entering Passive Mode (10,2,0,99,%d,%d)\r\n", dataPort>>8, dataPort&0xff)
					d, err := dataLn.Accept()
					if err != nil {
						return
					}
					dataPeer <- d.RemoteAddr().String()
					fmt.Fprint(d, "from the control connection's server")
					d.Close()
				default:
					fmt.Fprint(c, "200 ok\r\n")
				}
			}
		}()
		fc := fl.dialFTP(t, 2121)
		fc.send("PASV")
		r := fc.expect("227")
		if strings.Contains(r, "10,2,0,99") {
			t.Fatalf("the client got the other host's address: %q", r)
		}
		data := dialPASV(t, fl, r)
		got, err := io.ReadAll(data)
		if err != nil || string(got) != "from the control connection's server" {
			t.Fatalf("data %q, %v", got, err)
		}
		if peer := <-dataPeer; !strings.HasPrefix(peer, fl.lab.GatewayServerSide[0].IPv4.String()+":") {
			t.Errorf("the server's data connection came from %s, want the gateway", peer)
		}
		warned(t, "ignored the address in the server's 227 reply")
	})

	t.Run("data connection from another host", func(t *testing.T) {
		// A second client asks for nothing but connects to the first
		// client's passive port: refused, and the first client's data
		// connection still works.
		fc := fl.dialFTP(t, 21)
		fc.login()
		fc.send("PASV")
		r := fc.expect("227")
		ap := parse227Test(t, r)
		intruder, err := fl.lab.Server().Dial(ap, 5*time.Second)
		if err == nil {
			intruder.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := intruder.Read(make([]byte, 1)); err == nil || n > 0 {
				t.Errorf("an intruder's data connection was served")
			}
			intruder.Close()
		}
		warned(t, "refused a data connection from an unexpected peer")
		data := dialPASV(t, fl, r)
		fc.send("RETR small.txt")
		fc.expect("150")
		got, _ := io.ReadAll(data)
		if string(got) != "small file through the gateway\n" {
			t.Fatalf("data %q", got)
		}
		fc.expect("226")
	})
}

// TestLabFTPAbort: a client aborts a download as lftp does (RFC 959
// 4.1.3): "IAC IP IAC" and then "DM" as TCP urgent data, ABOR after them,
// and it stops reading the data connection. vsftpd does not read its
// control connection while it sends a file: with async_abor_enable (which
// its manual advises for clients that hang when they cancel) only the
// SIGURG of the urgent byte makes it read the ABOR, which it then takes
// only with the four Telnet bytes in front. The gateway sent the server
// a plain "ABOR": vsftpd kept blocking on the data connection the client
// no longer read and never answered.
func TestLabFTPAbort(t *testing.T) {
	t.Parallel()
	fl := startFTPLab(t, "splice")
	fc := fl.dialFTP(t, 21)
	fc.login()
	fc.send("TYPE I")
	fc.expect("200")
	fc.send("PASV")
	data := dialPASV(t, fl, fc.expect("227"))
	fc.send("RETR big.bin")
	fc.expect("150")
	if _, err := io.ReadFull(data, make([]byte, 1<<20)); err != nil {
		t.Fatalf("the download did not start: %v", err)
	}
	// lftp's abort: the client stops reading the data connection.
	if _, err := fc.c.Write([]byte("\xff\xf4\xff")); err != nil {
		t.Fatal(err)
	}
	raw, err := fc.c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Write(func(fd uintptr) bool {
		serr = unix.Send(int(fd), []byte{0xf2}, unix.MSG_OOB)
		return true
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	fc.send("ABOR")
	fc.expect("426") // the RETR's
	fc.expect("226") // the ABOR's
	fc.send("NOOP")
	fc.expect("200")
}

var re227 = regexp.MustCompile(`\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)`)

func parse227Test(t *testing.T, reply string) netip.AddrPort {
	t.Helper()
	m := re227.FindStringSubmatch(reply)
	if m == nil {
		t.Fatalf("no address in %q", reply)
	}
	var n [6]int
	for i := range n {
		fmt.Sscan(m[i+1], &n[i])
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(n[0]), byte(n[1]), byte(n[2]), byte(n[3])}), uint16(n[4]<<8|n[5]))
}

// dialPASV connects the client to the address of a 227 reply, which must
// be the gateway's.
func dialPASV(t *testing.T, fl *ftpLab, reply string) *net.TCPConn {
	t.Helper()
	ap := parse227Test(t, reply)
	if ap.Addr() != fl.lab.GatewayClientSide[0].IPv4 {
		t.Fatalf("227 names %v, want the gateway's internal address %v", ap, fl.lab.GatewayClientSide[0].IPv4)
	}
	c, err := fl.lab.Client().Dial(ap, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	return c
}

// TestLabFTPWithKernelHelper: an operator's ruleset that gives port 21 to
// the kernel's FTP conntrack helper and masquerades towards the servers
// changes nothing: the helper sees the control connections end at the
// gateway's sockets (nothing to NAT there), the data connections the
// proxy sets up are its own, and spliced ones are untracked. Transfers
// stay intact, active and passive, and vsftpd still sees only the
// gateway.
func TestLabFTPWithKernelHelper(t *testing.T) {
	t.Parallel()
	fl := startFTPLab(t, "splice")
	nft(t, &fl.lab.Gateway.NS,
		"add table inet operator",
		`add ct helper inet operator ftp21 { type "ftp" protocol tcp; l3proto inet; }`,
		"add chain inet operator pre { type filter hook prerouting priority filter; }",
		"add chain inet operator out { type filter hook output priority filter; }",
		`add rule inet operator pre tcp dport 21 ct helper set "ftp21"`,
		`add rule inet operator out tcp dport 21 ct helper set "ftp21"`,
		"add table ip opnat",
		"add chain ip opnat post { type nat hook postrouting priority srcnat; }",
		`add rule ip opnat post oifname "s0" masquerade`)
	for i, mode := range [][]string{{"--disable-epsv"}, {"-P", "-", "--disable-eprt"}} {
		out := filepath.Join(fl.work, fmt.Sprintf("h%d.bin", i))
		fl.client(t, "curl", append([]string{"-sS", "--connect-timeout", "10", "-o", out, fl.url(false, "big.bin")}, mode...)...)
		fl.checkSum(t, fmt.Sprintf("download with %v", mode), out, fl.bigSum)
	}
	gw := fl.lab.GatewayServerSide[0].IPv4.String()
	for p, n := range fl.peersInLog(t) {
		if p != gw {
			t.Errorf("vsftpd logged client %s (%d times), want only %s", p, n, gw)
		}
	}
	helped, err := fl.lab.Gateway.Run("conntrack", "-L", "-p", "tcp", "--dport", "21")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(helped, "helper=ftp") {
		t.Logf("conntrack entries of port 21:\n%s", helped)
		t.Fatalf("the kernel's FTP helper was not attached to the control connections: the test proves nothing")
	}
}

// TestLabFTPLogFlood: 300 malformed PORT commands, and 300 naming
// another host (FTP bounce), from one client leave the daemon's log (at
// info) a handful of lines; the first such line after the limiter's 10 s
// interval reports how many were suppressed.
func TestLabFTPLogFlood(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	// A fake server: a greeting, 221 and a close for QUIT, 200 to
	// anything else (nothing else reaches it here).
	ln, err := lab.Server().Listen(netip.AddrPortFrom(lab.Server().IPv4, 2121))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprint(c, "220 fake\r\n")
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if strings.HasPrefix(sc.Text(), "QUIT") {
						fmt.Fprint(c, "221 bye\r\n")
						return
					}
					fmt.Fprint(c, "200 ok\r\n")
				}
			}()
		}
	}()
	d := testnet.StartDaemon(t, lab, ftpConfig("copy"), "-log-level", "info")
	session := func(cmds ...string) {
		c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, 2121), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		r := bufio.NewReader(c)
		if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "220") {
			t.Fatalf("greeting %q, %v", l, err)
		}
		for _, cmd := range cmds {
			fmt.Fprintf(c, "%s\r\n", cmd)
			if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "5") {
				t.Fatalf("%s: %q, %v", cmd, l, err)
			}
		}
		fmt.Fprint(c, "QUIT\r\n")
		io.ReadAll(r)
	}
	const flood = 300
	var cmds []string
	for i := range flood {
		cmds = append(cmds, fmt.Sprintf("PORT 1,2,3,%d", i), fmt.Sprintf("PORT 10,2,0,99,156,%d", i%256))
	}
	before := len(d.Lines())
	start := time.Now()
	session(cmds...)
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "ftp session closed" }); err != nil {
		t.Fatal(err)
	}
	lines := d.Lines()[before:]
	var msgs []string
	for _, l := range lines {
		msgs = append(msgs, fmt.Sprint(l["level"], " ", l["msg"]))
	}
	t.Logf("%d malformed and %d bounce PORTs in %v: %d log lines: %q", flood, flood, time.Since(start).Round(time.Millisecond), len(lines), msgs)
	if len(lines) > 6 {
		t.Errorf("%d log lines for %d refused commands, want at most 6", len(lines), 2*flood)
	}
	// After the interval, the next refusal carries the count.
	// (Waiting for the limiter's interval, not for readiness.)
	time.Sleep(time.Until(start.Add(10*time.Second + 100*time.Millisecond)))
	session("PORT 1,2,3")
	var suppressed any
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		suppressed = l["suppressed"]
		return l["msg"] == "refused a malformed PORT" && suppressed != nil
	}); err != nil {
		t.Fatalf("no line reports the suppressed count: %v\n%s", err, tail(d.Log(), 10))
	}
	if suppressed != float64(flood-1) {
		t.Errorf("suppressed %v, want %d", suppressed, flood-1)
	}
	t.Logf("after the interval: one line with suppressed=%v", suppressed)
}
