package socks5

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"spliced/testnet"
)

// resolvConfEnv, in a test process's environment, names a file that
// TestSearchDomainNotAppended's child mounts over /etc/resolv.conf.
const resolvConfEnv = "SPLICED_TEST_RESOLV_CONF"

// TestSearchDomainNotAppended: the rules judge the name the client
// sent, so the resolver must look up that name and no other. Go's
// resolver (the system one, and the one of socks5.resolver, which only
// replaces the server) appends resolv.conf's search domains to a name
// with fewer dots than ndots, or one that did not resolve as it is: with
// "search internal.example", a deny rule for internal.example did not
// hold against CONNECT "wiki", which resolved as wiki.internal.example
// and was connected. The test runs itself again in a mount namespace of
// its own, with a resolv.conf that has a search domain.
func TestSearchDomainNotAppended(t *testing.T) {
	if conf := os.Getenv(resolvConfEnv); conf != "" {
		if err := syscall.Mount(conf, "/etc/resolv.conf", "", syscall.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s over /etc/resolv.conf: %v", conf, err)
		}
		searchDomainChild(t)
		return
	}
	testnet.Privileged(t)
	conf := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(conf, []byte("nameserver 127.0.0.1\nsearch internal.test\noptions ndots:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSearchDomainNotAppended$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), resolvConfEnv+"="+conf)
	// A mount namespace of the child's own: Go makes its mounts private,
	// so the bind mount never shows on the host.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("in a mount namespace with \"search internal.test\": %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: TestSearchDomainNotAppended")) {
		t.Fatalf("the child did not run the test:\n%s", out)
	}
}

// searchDomainChild is TestSearchDomainNotAppended under a resolv.conf
// with "search internal.test".
func searchDomainChild(t *testing.T) {
	echo, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	var accepts atomic.Int64
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			accepts.Add(1)
			c.Close()
		}
	}()
	port := echo.Addr().(*net.TCPAddr).AddrPort().Port()
	// Only the internal name exists: "wiki" is an internal host to
	// anyone who appends the search domain.
	l := serveWithDNS(t, map[string][]netip.Addr{"wiki.internal.test": {netip.MustParseAddr("127.0.0.1")}}, `
        - action: deny
          domains: [internal.test]
        - action: allow
          destinations: [127.0.0.1/32]
`)
	for _, name := range []string{"wiki", "WIKI", "wiki."} {
		got := l.talk(t, "127.0.0.1", cat(greetNone, connectName(name, port)), false)
		if len(got) >= 4 && got[3] == byte(Succeeded) {
			t.Errorf("CONNECT %q: connected (as wiki.internal.test, which a rule denies); got %x", name, got)
		}
	}
	if n := accepts.Load(); n != 0 {
		t.Fatalf("a host of a denied domain was reached %d times", n)
	}
}
