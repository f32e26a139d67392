package testnet

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// Tunnel joins namespaces a and b by a pair of tun devices, devA in a and
// devB in b, up with the given MTU and without addresses, and carries
// each packet one sends to the other: a layer-3 link, whose packets start
// with their IP header (no link-layer header), as those of a VPN (tun
// mode, WireGuard), PPP or an IP tunnel. Routes through it are the
// test's. It lasts until the test's cleanup.
func Tunnel(t testing.TB, a *NS, devA string, b *NS, devB string, mtu int) {
	t.Helper()
	fa, err := openTun(a, devA, mtu)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := openTun(b, devB, mtu)
	if err != nil {
		fa.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	carry := func(from, to *os.File) {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := from.Read(buf)
			if err != nil {
				return // closed at the cleanup
			}
			// A packet the other device refuses is lost, as on a link.
			to.Write(buf[:n])
		}
	}
	wg.Add(2)
	go carry(fa, fb)
	go carry(fb, fa)
	t.Cleanup(func() {
		fa.Close()
		fb.Close()
		wg.Wait()
	})
}

// openTun creates tun device name in ns (IFF_TUN, no packet information
// header), brings it up with mtu and returns its file, non-blocking so
// that Close ends a Read.
func openTun(ns *NS, name string, mtu int) (*os.File, error) {
	var f *os.File
	err := ns.Do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(name)
		if err == nil {
			ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
			err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
		}
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("create tun device %s: %w", name, err)
		}
		f = os.NewFile(uintptr(fd), "tun "+name)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("in %s: %w", ns.Name, err)
	}
	if out, err := ns.Run("ip", "link", "set", name, "mtu", strconv.Itoa(mtu), "up"); err != nil {
		f.Close()
		return nil, errors.Join(fmt.Errorf("%s: ip link set %s up: %w", ns.Name, name, err), errors.New(out))
	}
	return f, nil
}
