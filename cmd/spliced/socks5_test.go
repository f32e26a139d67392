package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/internal/dnstest"
	"spliced/proxy/socks5"
	"spliced/testnet"
)

// socksLab is a lab with nginx on the server, a DNS server naming it
// www.lab.test, and spliced running a SOCKS5 service in direct mode on
// the gateway's client-side addresses, port 1080.
type socksLab struct {
	lab   *testnet.Lab
	d     *testnet.Daemon
	sum   string // SHA-256 of /file.bin
	gw    [2]netip.AddrPort
	users string
}

const socksFileSize = 20 << 20

func startSOCKSLab(t *testing.T, mode string) *socksLab {
	t.Helper()
	testnet.Privileged(t, "nginx", "curl")
	sl := &socksLab{lab: testnet.NewT(t, testnet.Options{})}
	srv := sl.lab.Server()

	root := t.TempDir()
	os.Chmod(root, 0o755)
	os.MkdirAll(filepath.Join(root, "www"), 0o755)
	f, err := os.Create(filepath.Join(root, "www", "file.bin"))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	io.CopyN(io.MultiWriter(f, h), testnet.NewRandomStream(15), socksFileSize)
	f.Close()
	sl.sum = hex.EncodeToString(h.Sum(nil))
	stop, err := srv.StartNginx(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)

	var pc net.PacketConn
	if err := srv.Do(func() (err error) {
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(srv.IPv4, 53).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	dns := dnstest.Serve(pc, map[string][]netip.Addr{
		"www.lab.test":    {srv.IPv4, srv.IPv6},
		"denied.lab.test": {srv.IPv4},
	})
	t.Cleanup(func() { dns.Close() })

	hash, err := socks5.HashPassword([]byte("s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	sl.users = filepath.Join(t.TempDir(), "users")
	os.WriteFile(sl.users, []byte("alice:"+hash+"\n"), 0o600)

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
      resolver: "%s"
      rules:
        - action: deny
          ports: ["8081"]
        - action: deny
          domains: [denied.lab.test]
`, sl.gw[0], sl.gw[1], splice, sl.users, netip.AddrPortFrom(srv.IPv4, 53)))
	return sl
}

// curl fetches url through the proxy in the client namespace and returns
// the SHA-256 of what arrived.
func (sl *socksLab) curl(t *testing.T, proxyURL, url string, extra ...string) (string, error) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := append([]string{"-sS", "--connect-timeout", "10", "-x", proxyURL, "-o", out, url}, extra...)
	msg, err := sl.lab.Client().Command(ctx, "curl", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("curl %s: %w: %s", strings.Join(args, " "), err, msg)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return "", err
	}
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:]), nil
}

// TestLabSOCKS: curl through the SOCKS5 gateway to nginx, by name
// (--socks5-hostname: the gateway resolves) and by address, over IPv4
// and IPv6, copied and spliced, SHA-256 checked. In splice mode, one
// rate-limited transfer proves the splice mid-transfer: the gateway
// holds no socket of the flow while data still moves.
func TestLabSOCKS(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"copy", "splice"} {
		t.Run(mode, func(t *testing.T) {
			sl := startSOCKSLab(t, mode)
			srv := sl.lab.Server()
			for _, c := range []struct {
				name, proxy, url string
			}{
				{"v4 hostname", "socks5h://alice:s3cret@" + sl.gw[0].String(), fmt.Sprintf("http://www.lab.test:%d/file.bin", testnet.NginxPort)},
				{"v4 address", "socks5://alice:s3cret@" + sl.gw[0].String(), fmt.Sprintf("http://%s/file.bin", netip.AddrPortFrom(srv.IPv4, testnet.NginxPort))},
				{"v6 hostname", "socks5h://alice:s3cret@" + sl.gw[1].String(), fmt.Sprintf("http://www.lab.test:%d/file.bin", testnet.NginxPort)},
				{"v6 address", "socks5://alice:s3cret@" + sl.gw[1].String(), fmt.Sprintf("http://%s/file.bin", netip.AddrPortFrom(srv.IPv6, testnet.NginxPort))},
			} {
				t.Run(c.name, func(t *testing.T) {
					start := time.Now()
					sum, err := sl.curl(t, c.proxy, c.url)
					if err != nil {
						t.Fatal(err)
					}
					t.Logf("%d MB in %v", socksFileSize>>20, time.Since(start).Round(time.Millisecond))
					if sum != sl.sum {
						t.Fatalf("SHA-256 %s, want %s", sum, sl.sum)
					}
				})
			}
			if mode != "splice" {
				return
			}
			// Names resolve to both families; the gateway picks the
			// client leg's, so every flow splices.
			if strings.Contains(sl.d.Log(), "flow stays proxied") {
				t.Error("a flow stayed proxied in splice mode")
			}
			t.Run("proven spliced", func(t *testing.T) {
				// Built before the rate-limited transfer starts: the build
				// takes seconds (more under -race) of its ~5.
				splicectl := testnet.Binary(t, "splicectl")
				spliced := func() int { return strings.Count(sl.d.Log(), `"msg":"flow spliced"`) }
				before := spliced()
				done := make(chan error, 1)
				var sum string
				go func() {
					var err error
					sum, err = sl.curl(t, "socks5h://alice:s3cret@"+sl.gw[0].String(), fmt.Sprintf("http://www.lab.test:%d/file.bin", testnet.NginxPort), "--limit-rate", "4M")
					done <- err
				}()
				testnet.Eventually(t, 10*time.Second, func() error {
					if n := spliced(); n <= before {
						return fmt.Errorf("no new flow spliced (%d before)", before)
					}
					return nil
				})
				if err := provenSplicedLast(sl.lab, sl.d); err != nil {
					t.Error(err)
				}
				// splicectl flows shows the spliced flow with its user
				// and the gateway's listen address as the client leg's end.
				out, err := exec.Command(splicectl, "-s", sl.d.Socket, "flows").CombinedOutput()
				if err != nil || !strings.Contains(string(out), "spliced") || !strings.Contains(string(out), "alice") || !strings.Contains(string(out), sl.gw[0].String()) {
					t.Errorf("splicectl flows: %v\n%s", err, out)
				}
				// The transfer's result is read once, whether it came
				// early (an error of the test) or not.
				select {
				case err = <-done:
					t.Error("the transfer ended before the splice was checked; it is rate-limited to last ~5 s")
				default:
					err = <-done
				}
				if err != nil {
					t.Fatal(err)
				}
				if sum != sl.sum {
					t.Fatalf("SHA-256 %s, want %s", sum, sl.sum)
				}
			})
		})
	}
}

// provenSplicedLast is provenSpliced for the last flow spliced: the
// gateway has no socket whose peer is its client, and the queues see its
// packets.
func provenSplicedLast(lab *testnet.Lab, d *testnet.Daemon) error {
	var client string
	for _, l := range d.Lines() {
		if l["msg"] == "flow spliced" {
			client = fmt.Sprint(l["client"])
		}
	}
	return splicedAway(lab, client)
}

// TestLabSOCKSRefused: a denied destination gets 0x02 and the server
// sees no connection; a wrong password is refused (curl fails, the
// daemon logs it); a user added to the users file logs in after SIGHUP.
func TestLabSOCKSRefused(t *testing.T) {
	t.Parallel()
	sl := startSOCKSLab(t, "splice")
	srv := sl.lab.Server()
	denied := netip.AddrPortFrom(srv.IPv4, 8081)
	ln, err := srv.Listen(denied)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
			accepted <- struct{}{}
		}
	}()
	for _, v6 := range []bool{false, true} {
		gw := sl.gw[0]
		if v6 {
			gw = sl.gw[1]
		}
		c, err := sl.lab.Client().Dial(gw, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		req := []byte{5, 1, 2, 1, 5, 'a', 'l', 'i', 'c', 'e', 6, 's', '3', 'c', 'r', 'e', 't', 5, 1, 0, 1}
		req = append(req, denied.Addr().AsSlice()...)
		req = binary.BigEndian.AppendUint16(req, denied.Port())
		c.Write(req)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(c)
		c.Close()
		want := []byte{5, 2, 1, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0}
		if !bytes.Equal(got, want) {
			t.Fatalf("via %s: got %x, want %x", gw, got, want)
		}
	}
	if _, err := sl.curl(t, "socks5h://alice:s3cret@"+sl.gw[0].String(), "http://denied.lab.test:8081/"); err == nil {
		t.Fatal("curl reached a denied name")
	}
	select {
	case <-accepted:
		t.Fatal("the server saw a connection to a denied destination")
	case <-time.After(200 * time.Millisecond):
	}

	_, err = sl.curl(t, "socks5h://alice:wrong@"+sl.gw[0].String(), fmt.Sprintf("http://www.lab.test:%d/file.bin", testnet.NginxPort))
	if err == nil || !strings.Contains(err.Error(), "exit status") {
		t.Fatalf("wrong password: %v", err)
	}
	if err := sl.d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "socks5: login failed" }); err != nil {
		t.Fatal(err)
	}

	// A user added to the users file logs in after SIGHUP.
	url := fmt.Sprintf("http://www.lab.test:%d/file.bin", testnet.NginxPort)
	if _, err := sl.curl(t, "socks5h://carol:pw@"+sl.gw[0].String(), url); err == nil {
		t.Fatal("carol logged in before she was added")
	}
	hash, _ := socks5.HashPassword([]byte("pw"))
	f, _ := os.OpenFile(sl.users, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "carol:%s\n", hash)
	f.Close()
	if err := sl.d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := sl.d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == "socks5: users file reloaded" }); err != nil {
		t.Fatal(err)
	}
	sum, err := sl.curl(t, "socks5h://carol:pw@"+sl.gw[1].String(), url)
	if err != nil {
		t.Fatal(err)
	}
	if sum != sl.sum {
		t.Fatalf("SHA-256 %s, want %s", sum, sl.sum)
	}
}
