package rules

import (
	"encoding/binary"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

// TestICMPSocketRuleSkipsListeners: the prerouting rule "meta l4proto
// icmp socket transparent 1 ... accept" must deliver locally only ICMP
// errors about packets of the gateway's own transparent sockets. nft's
// socket expression also finds a listening socket bound to the wildcard
// address (the TPROXY listeners on 0.0.0.0:15001...), so an error the
// gateway forwarded to a host whose quoted source port was a listener's
// port was taken by the gateway and never reached that host (a path MTU
// black hole for that connection). Hence "socket wildcard 0".
func TestICMPSocketRuleSkipsListeners(t *testing.T) {
	testnet.Privileged(t, "nft", "ip")
	lab := testnet.NewT(t, testnet.Options{})
	spec := sampleSpec(t)
	m := NewManager(spec, WithNetNS(lab.Gateway.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	const listenerPort = 40123 // a transparent listener, as proxy.ListenTransparent opens it
	if err := lab.Gateway.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			return err
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: listenerPort}); err != nil {
			return err
		}
		return unix.Listen(fd, 8)
	}); err != nil {
		t.Fatal(err)
	}
	client, server := lab.Client().IPv4, lab.Server().IPv4
	var rx int
	if err := lab.Client().Do(func() (err error) {
		rx, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rx)
	unix.SetsockoptTimeval(rx, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 300000})
	var tx int
	if err := lab.Server().Do(func() (err error) {
		tx, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(tx)

	// A router on the server's side tells the client that its segment
	// client:port -> server:80 (a flow the gateway merely forwards) was
	// too big.
	reaches := func(port uint16) bool {
		msg := make([]byte, 8+20+8)
		msg[0], msg[1] = 3, 4
		binary.BigEndian.PutUint16(msg[6:], 1400)
		q := msg[8:]
		q[0], q[8], q[9] = 0x45, 64, 6
		binary.BigEndian.PutUint16(q[2:], 1500)
		copy(q[12:], client.AsSlice())
		copy(q[16:], server.AsSlice())
		binary.BigEndian.PutUint16(q[20:], port)
		binary.BigEndian.PutUint16(q[22:], 80)
		binary.BigEndian.PutUint32(q[24:], 12345)
		var s uint32
		for i := 0; i < len(msg); i += 2 {
			s += uint32(binary.BigEndian.Uint16(msg[i:]))
		}
		for s > 0xffff {
			s = s>>16 + s&0xffff
		}
		binary.BigEndian.PutUint16(msg[2:], ^uint16(s))
		to := &unix.SockaddrInet4{Addr: client.As4()}
		for try := 0; try < 3; try++ {
			if err := unix.Sendto(tx, msg, 0, to); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(time.Second)
			buf := make([]byte, 2048)
			for time.Now().Before(deadline) {
				n, _, err := unix.Recvfrom(rx, buf, 0)
				if err != nil {
					break
				}
				b := buf[:n]
				hl := int(b[0]&0xf) * 4
				if n >= hl+8+28 && b[hl] == 3 && b[hl+1] == 4 && binary.BigEndian.Uint16(b[hl+8+20:]) == port {
					return true
				}
			}
		}
		return false
	}
	if !reaches(40999) {
		t.Fatal("control: an error about port 40999 did not reach the client")
	}
	if !reaches(listenerPort) {
		t.Errorf("an ICMP error forwarded to the client about its port %d (a transparent listener's port on the gateway) never reached it: the icmp socket rule took it for the gateway", listenerPort)
	}
}
