package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"spliced/splice"
	"spliced/tcprepair"
	"spliced/testnet"
)

// TestGSOSenderDelivers: a packet of 60,000 bytes of payload, sent by
// gsoSender through a veth, reaches a real TCP socket in another
// namespace as the next 60,000 bytes of its stream, whether the device
// passes the GSO packet whole (TSO on, the veth default) or the kernel
// segments it before the device (TSO off), and completes the checksums
// too (checksum offload off: the receiver then verifies them); IPv4 and
// IPv6. The sending
// end is a socket captured with TCP_REPAIR and closed silently, so the
// packet continues its stream as a splice's taken-over payload would.
// What the sender cannot resolve (no neighbour entry, a local
// destination) it refuses, so the release sends it the raw way.
func TestGSOSenderDelivers(t *testing.T) {
	a, b := testnet.Scratch(t), testnet.Scratch(t)
	a.MustRun("ip", "link", "add", "a0", "type", "veth", "peer", "name", "b0")
	a.MustRun("ip", "link", "set", "b0", "netns", b.Name)
	for _, c := range [][]string{
		{"addr", "add", "10.9.0.1/24", "dev", "a0"}, {"addr", "add", "fd00:9::1/64", "dev", "a0", "nodad"}, {"link", "set", "a0", "up"},
	} {
		a.MustRun("ip", c...)
	}
	for _, c := range [][]string{
		{"addr", "add", "10.9.0.2/24", "dev", "b0"}, {"addr", "add", "fd00:9::2/64", "dev", "b0", "nodad"}, {"link", "set", "b0", "up"},
	} {
		b.MustRun("ip", c...)
	}
	// Segments without timestamps: the test builds the packet itself.
	a.MustRun("sysctl", "-qw", "net.ipv4.tcp_timestamps=0")
	s := newGSOSender()
	defer s.Close()
	for _, tc := range []struct {
		name    string
		dst     string
		tso, tx string
	}{
		{"IPv4 whole", "10.9.0.2", "on", "on"},
		{"IPv4 segmented by the kernel", "10.9.0.2", "off", "on"},
		// The receiver checks checksums the kernel completed.
		{"IPv4 segmented and checksummed by the kernel", "10.9.0.2", "off", "off"},
		{"IPv6 whole", "fd00:9::2", "on", "on"},
		{"IPv6 segmented by the kernel", "fd00:9::2", "off", "on"},
		{"IPv6 segmented and checksummed by the kernel", "fd00:9::2", "off", "off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a.MustRun("ethtool", "-K", "a0", "tx", tc.tx, "tso", tc.tso)
			if err := gsoDelivery(a, b, s, netip.MustParseAddr(tc.dst), 0); err != nil {
				t.Fatal(err)
			}
		})
	}
	// A device whose MTU is below what the MSS assumes: the segments are
	// cut to fit it (the receiving veth drops longer frames).
	t.Run("IPv4 MTU below the MSS", func(t *testing.T) {
		a.MustRun("ethtool", "-K", "a0", "tx", "off", "tso", "off")
		a.MustRun("ip", "link", "set", "a0", "mtu", "1280")
		b.MustRun("ip", "link", "set", "b0", "mtu", "1280")
		defer a.MustRun("ip", "link", "set", "a0", "mtu", "1500")
		defer b.MustRun("ip", "link", "set", "b0", "mtu", "1500")
		if err := gsoDelivery(a, b, s, netip.MustParseAddr("10.9.0.2"), 1460); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		err := a.Do(func() error {
			for _, dst := range []string{"10.9.0.99", "10.9.0.1", "fd00:9::99"} {
				if _, err := s.resolve(netip.MustParseAddr(dst)); err == nil {
					return fmt.Errorf("%s resolved; want an error (no neighbour entry, or local)", dst)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// An IPsec policy anywhere: the IP output path must apply it.
		a.MustRun("ip", "xfrm", "policy", "add", "src", "10.9.0.0/24", "dst", "10.8.0.0/24", "dir", "out",
			"tmpl", "src", "10.9.0.1", "dst", "10.9.0.7", "proto", "esp", "mode", "tunnel")
		err = a.Do(func() error {
			if _, err := s.resolve(netip.MustParseAddr("10.9.0.2")); !errors.Is(err, errIPsec) {
				return fmt.Errorf("with an IPsec policy: %v; want %v", err, errIPsec)
			}
			return nil
		})
		a.MustRun("ip", "xfrm", "policy", "flush")
		if err != nil {
			t.Fatal(err)
		}
		// Marks set at output route packets (markroute.go): only the IP
		// output path applies them.
		s.marksRoute.Store(true)
		err = a.Do(func() error {
			if _, err := s.resolve(netip.MustParseAddr("10.9.0.2")); !errors.Is(err, errMarksRoute) {
				return fmt.Errorf("while marks route: %v; want %v", err, errMarksRoute)
			}
			return nil
		})
		s.marksRoute.Store(false)
		if err != nil {
			t.Fatal(err)
		}
	})
}

// gsoDelivery connects a to b, captures a's end, sends the stream's next
// bytes from it as one GSO packet of segments of mss (0: the connection's
// MSS) and checks what b's socket reads.
func gsoDelivery(a, b *testnet.NS, s *gsoSender, dst netip.Addr, mss int) error {
	var ln *net.TCPListener
	if err := b.Do(func() (err error) {
		ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, _ := ln.AcceptTCP()
		accepted <- c
	}()
	payload := make([]byte, 60000)
	for i := range payload {
		payload[i] = byte(i*7 + i>>8)
	}
	var got []byte
	err := a.Do(func() error {
		c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			return err
		}
		defer c.Close()
		peer := <-accepted
		if peer == nil {
			return errors.New("accept failed")
		}
		defer peer.Close()
		// One exchange each way: both ends know each other's
		// link-layer address.
		c.Write([]byte("x"))
		io.ReadFull(peer, make([]byte, 1))
		peer.Write([]byte("y"))
		io.ReadFull(c, make([]byte, 1))
		if err := testnet.Poll(5*time.Second, func() error {
			if _, out, err := tcprepair.Queues(c); err != nil || out != 0 {
				return errors.New("send queue not empty")
			}
			return nil
		}); err != nil {
			return err
		}
		st, err := tcprepair.Capture(c)
		if err != nil {
			return err
		}
		pkt := buildSegment(st, payload)
		var p splice.Packet
		if p.Parse(pkt) != splice.OK {
			return errors.New("built packet does not parse")
		}
		e, err := s.resolve(dst)
		if err != nil {
			return err
		}
		if mss == 0 {
			mss = int(st.MSS)
		}
		if err := s.send(e, &p, mss); err != nil {
			return err
		}
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		got = make([]byte, len(payload))
		n, err := io.ReadFull(peer, got)
		got = got[:n]
		return err
	})
	if err != nil {
		return fmt.Errorf("%w (read %d of %d bytes)", err, len(got), len(payload))
	}
	if !bytes.Equal(got, payload) {
		return errors.New("the receiver read other bytes than were sent")
	}
	return nil
}

// buildSegment is the TCP segment that continues st's stream with
// payload, in an IP packet with a valid checksum.
func buildSegment(st splice.Conn, payload []byte) []byte {
	tcp := make([]byte, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], st.Local.Port())
	binary.BigEndian.PutUint16(tcp[2:], st.Remote.Port())
	binary.BigEndian.PutUint32(tcp[4:], uint32(st.SndNxt))
	binary.BigEndian.PutUint32(tcp[8:], uint32(st.RcvNxt))
	tcp[12] = 5 << 4
	tcp[13] = splice.FlagACK | splice.FlagPSH
	binary.BigEndian.PutUint16(tcp[14:], 1000)
	copy(tcp[20:], payload)
	src, dst := st.Local.Addr().AsSlice(), st.Remote.Addr().AsSlice()
	binary.BigEndian.PutUint16(tcp[16:], splice.TCPChecksum(src, dst, tcp))
	if st.Local.Addr().Is4() {
		ip := make([]byte, 20, 20+len(tcp))
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
		ip[6] = 0x40 // DF
		ip[8] = 64
		ip[9] = 6
		copy(ip[12:], src)
		copy(ip[16:], dst)
		splice.IPv4(ip).UpdateChecksum()
		return append(ip, tcp...)
	}
	ip := make([]byte, 40, 40+len(tcp))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(tcp)))
	ip[6] = 6
	ip[7] = 64
	copy(ip[8:], src)
	copy(ip[24:], dst)
	return append(ip, tcp...)
}
