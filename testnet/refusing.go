package testnet

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// RefusingPort returns a loopback address whose connections are refused
// (a reset answers the SYN) for as long as the test runs: a socket bound
// there that does not listen, which no other socket can bind while it
// holds the port. A port found free by listening and closing is no such
// thing: a listener of another test, in this process or another package's
// (go test runs them at once), may take it next. CI saw it: a SOCKS5
// CONNECT to such a port, which had to be refused, connected.
func RefusingPort(t testing.TB) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
}
