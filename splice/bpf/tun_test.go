//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

// The program attached at tcx ingress of real tun devices (layer 3: no
// link-layer header, as a VPN's, WireGuard's or PPP's), in an anonymous
// network namespace of one locked thread (nothing of the host's or the
// lab's namespaces is touched). BPF_PROG_TEST_RUN cannot show this: it
// always hands the program an Ethernet frame.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/splice"
)

// inFreshNetns runs fn on a locked thread that unshared its network
// namespace; the thread is never unlocked, so it dies with the goroutine.
func inFreshNetns(t *testing.T, fn func() error) {
	t.Helper()
	requireRoot(t)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func openTunDev(name string, flags uint16) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, err
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(flags)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("tun %s: %w", name, err)
	}
	return fd, nil
}

// readAll reads the packets fd gives within d.
func readAll(fd int, d time.Duration) [][]byte {
	var out [][]byte
	deadline := time.Now().Add(d)
	buf := make([]byte, 70000)
	for time.Now().Before(deadline) {
		n, err := unix.Read(fd, buf)
		if err != nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		b := buf[:n]
		if n > 40 && ((b[0]>>4 == 4 && b[9] == 6) || (b[0]>>4 == 6 && b[6] == 6)) {
			out = append(out, bytes.Clone(b)) // TCP only: no ND, MLD
		}
	}
	return out
}

// l3lab is two tun devices in the test's namespace: packets written to
// in arrive at its ingress (rin, where the client's addresses route);
// what the stack or the program sends to the server's addresses comes
// out of out (rout).
type l3lab struct {
	dp      *Datapath
	in, out int
}

// setupL3 makes the devices, routes and sysctls and loads the program;
// vnet: rin takes a virtio_net_hdr before each packet (GSO writes);
// redirect: Options.Redirect.
func setupL3(vnet, redirect bool) (*l3lab, error) {
	l := &l3lab{}
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI)
	inFlags := flags
	if vnet {
		inFlags |= unix.IFF_VNET_HDR
	}
	var err error
	if l.in, err = openTunDev("rin", inFlags); err != nil {
		return nil, err
	}
	if l.out, err = openTunDev("rout", flags); err != nil {
		return nil, err
	}
	for _, c := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "link", "set", "rin", "up"},
		{"ip", "link", "set", "rout", "up"},
		{"ip", "addr", "add", "192.0.2.1/32", "dev", "rin"},
		{"ip", "addr", "add", "10.2.0.1/32", "dev", "rout"},
		{"ip", "route", "add", "10.1.0.0/16", "dev", "rin"},
		{"ip", "route", "add", "8.0.0.0/16", "dev", "rin"},
		{"ip", "route", "add", "10.2.0.0/16", "dev", "rout"},
		{"ip", "-6", "route", "add", "fd00:1::/64", "dev", "rin"},
		{"ip", "-6", "route", "add", "fd00:1:86dd::/64", "dev", "rin"},
		{"ip", "-6", "route", "add", "fd00:2::/64", "dev", "rout"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
		{"sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"},
		{"sysctl", "-qw", "net.ipv4.conf.all.accept_local=1"}, // as the daemon sets it
		{"sysctl", "-qw", "net.ipv4.conf.rin.rp_filter=0"},
	} {
		if err := sh(c...); err != nil {
			return nil, err
		}
	}
	if l.dp, err = Load(Options{fakeClock: true, Redirect: redirect}); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *l3lab) close() {
	if l.dp != nil {
		l.dp.Close()
	}
	unix.Close(l.in)
	unix.Close(l.out)
}

func counters(dp *Datapath) [NumCounters]uint64 {
	c, _ := dp.Counters()
	return c
}

func diffCounters(a, b [NumCounters]uint64) map[int]uint64 {
	m := map[int]uint64{}
	for i := range a {
		if b[i] != a[i] {
			m[i] = b[i] - a[i]
		}
	}
	return m
}

// flowFor makes a NAT or transparent flow between c and s and puts it in dp.
func flowFor(dp *Datapath, c, s, up netip.AddrPort, id uint64) (splice.Flow, [2]splice.Key, error) {
	p := splice.Params{
		Client: splice.Conn{Local: s, Remote: c, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 5000},
		Server: splice.Conn{Local: up, Remote: s, SndNxt: 0x7ffffff0, RcvNxt: 0xffffff00, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 900000},
	}
	f, err := splice.NewFlow(&p, fixtureStart)
	if err != nil {
		return f, [2]splice.Key{}, err
	}
	keys := p.Keys()
	return f, keys, dp.PutFlow(id, keys, f.State())
}

// engineOut is what the Go engine makes of pkt, with the TTL (hop limit)
// the stack's forwarding takes off.
func engineOut(f *splice.Flow, keys [2]splice.Key, pkt []byte) ([]byte, splice.Verdict) {
	b := bytes.Clone(pkt)
	var p splice.Packet
	if st := p.Parse(b); st != splice.OK {
		return nil, 255
	}
	v := f.Rewrite(&p, splice.C2S, &keys[1], fixtureStart, true)
	out := bytes.Clone(p.Bytes())
	if out[0]>>4 == 4 {
		out[8]--
		splice.IPv4(out).UpdateChecksum()
	} else {
		out[7]--
	}
	return out, v
}

// TestTunDevices: a spliced flow's packet that arrives on a tun device,
// in stack and in redirect mode, NAT and transparent, IPv4 and IPv6, and
// from addresses whose bytes spell an EtherType where an Ethernet header
// has one: the program forwards it, through the stack (no redirect from
// a device without a link-layer header), byte for byte as the Go engine
// rewrites it (but the TTL, which the stack's forwarding lowers).
func TestTunDevices(t *testing.T) {
	for _, tc := range []struct {
		name     string
		redirect bool
	}{{"stack", false}, {"redirect", true}} {
		t.Run(tc.name, func(t *testing.T) {
			inFreshNetns(t, func() error {
				l, err := setupL3(false, tc.redirect)
				if err != nil {
					return err
				}
				defer l.close()
				at, err := l.dp.Attach([]string{"rin", "rout"})
				if err != nil {
					return err
				}
				defer at.Detach()
				if err := l.dp.setNow(fixtureStart); err != nil {
					return err
				}
				var errs []string
				for i, c := range []struct {
					name    string
					client  string
					server  string
					up      string
					wantCtr int
				}{
					{"v4 nat", "10.1.0.2:40000", "10.2.0.2:80", "10.2.0.1:50000", int(splice.Forward)},
					{"v4 transparent", "10.1.0.3:40000", "10.2.0.2:80", "10.1.0.3:40001", int(splice.Forward)},
					{"v6 nat", "[fd00:1::2]:40000", "[fd00:2::2]:80", "[fd00:2::1]:50000", int(splice.Forward)},
					// A client whose address starts 8.0: bytes 12-13 of its
					// packets spell 0x0800, as an Ethernet frame's EtherType
					// would (the program took them for Ethernet frames and
					// passed every one, until it read the network header).
					{"v4 nat from 8.0.1.2", "8.0.1.2:40000", "10.2.0.2:80", "10.2.0.1:50000", int(splice.Forward)},
					// The same for IPv6: source bytes 4-5 are 0x86dd.
					{"v6 nat from fd00:1:86dd::2", "[fd00:1:86dd::2]:40000", "[fd00:2::2]:80", "[fd00:2::1]:50000", int(splice.Forward)},
				} {
					cl, sv, up := netip.MustParseAddrPort(c.client), netip.MustParseAddrPort(c.server), netip.MustParseAddrPort(c.up)
					f, keys, err := flowFor(l.dp, cl, sv, up, uint64(900+i))
					if err != nil {
						return err
					}
					pkt := seg{src: cl, dst: sv, seq: 1000, ack: 0xfffffff0, flags: 0x10, win: 500, payload: []byte("hello, world")}.bytes()
					want, ev := engineOut(&f, keys, pkt)
					before := counters(l.dp)
					if _, err := unix.Write(l.in, pkt); err != nil {
						return fmt.Errorf("%s: write: %w", c.name, err)
					}
					got := readAll(l.out, 300*time.Millisecond)
					d := diffCounters(before, counters(l.dp))
					t.Logf("%s: counters %v, %d packets out, engine %v", c.name, d, len(got), ev)
					if d[c.wantCtr] != 1 {
						errs = append(errs, fmt.Sprintf("%s: counters %v, want %d", c.name, d, c.wantCtr))
					}
					if c.wantCtr == int(splice.Forward) {
						if d[CounterRedirect] != 0 {
							errs = append(errs, c.name+": redirected from a tun device")
						}
						if len(got) != 1 || !bytes.Equal(got[0], want) {
							errs = append(errs, fmt.Sprintf("%s: output\n got % x\nwant % x", c.name, got, want))
						}
					}
					l.dp.DeleteFlow(uint64(900+i), keys)
				}
				if len(errs) > 0 {
					return fmt.Errorf("%s", strings.Join(errs, "\n"))
				}
				return nil
			})
		})
	}
}

// TestTunGSO: a GSO packet written to a tun device with a virtio_net_hdr
// (as a VM or a VPN with offloads does), CHECKSUM_PARTIAL at ingress;
// rewritten by the program (NAT: addresses in the pseudo-header) and
// segmented on the way out. Every segment carries a valid checksum.
func TestTunGSO(t *testing.T) {
	inFreshNetns(t, func() error {
		l, err := setupL3(true, false)
		if err != nil {
			return err
		}
		defer l.close()
		at, err := l.dp.Attach([]string{"rin", "rout"})
		if err != nil {
			return err
		}
		defer at.Detach()
		if err := l.dp.setNow(fixtureStart); err != nil {
			return err
		}
		var errs []string
		for i, c := range []struct{ name, client, server, up string }{
			{"v4 nat", "10.1.0.2:40000", "10.2.0.2:80", "10.2.0.1:50000"},
			{"v6 nat", "[fd00:1::2]:40000", "[fd00:2::2]:80", "[fd00:2::1]:50000"},
		} {
			cl, sv, up := netip.MustParseAddrPort(c.client), netip.MustParseAddrPort(c.server), netip.MustParseAddrPort(c.up)
			f, keys, err := flowFor(l.dp, cl, sv, up, uint64(950+i))
			if err != nil {
				return err
			}
			payload := make([]byte, 3000)
			for j := range payload {
				payload[j] = byte(j * 7)
			}
			pkt := seg{src: cl, dst: sv, seq: 1000, ack: 0xfffffff0, flags: 0x10, win: 500, payload: payload}.bytes()
			_, ev := engineOut(&f, keys, pkt)
			ipl := 20
			gsoType := uint8(1) // VIRTIO_NET_HDR_GSO_TCPV4
			if cl.Addr().Is6() {
				ipl, gsoType = 40, 4 // TCPV6
			}
			// The check field: the pseudo-header sum only (NEEDS_CSUM).
			tcp := pkt[ipl:]
			src, dst := cl.Addr().AsSlice(), sv.Addr().AsSlice()
			var ph []byte
			ph = append(ph, src...)
			ph = append(ph, dst...)
			if cl.Addr().Is4() {
				ph = append(ph, 0, 6, byte(len(tcp)>>8), byte(len(tcp)))
			} else {
				ph = append(ph, 0, 0, byte(len(tcp)>>8), byte(len(tcp)), 0, 0, 0, 6)
			}
			binary.BigEndian.PutUint16(tcp[16:], splice.Fold(splice.Sum(ph, 0)))
			hdr := make([]byte, 10) // struct virtio_net_hdr
			hdr[0] = 1              // VIRTIO_NET_HDR_F_NEEDS_CSUM
			hdr[1] = gsoType
			binary.LittleEndian.PutUint16(hdr[2:], uint16(ipl+20)) // hdr_len
			binary.LittleEndian.PutUint16(hdr[4:], 1000)           // gso_size
			binary.LittleEndian.PutUint16(hdr[6:], uint16(ipl))    // csum_start
			binary.LittleEndian.PutUint16(hdr[8:], 16)             // csum_offset
			before := counters(l.dp)
			if _, err := unix.Write(l.in, append(hdr, pkt...)); err != nil {
				return fmt.Errorf("%s: write: %w", c.name, err)
			}
			got := readAll(l.out, 300*time.Millisecond)
			d := diffCounters(before, counters(l.dp))
			t.Logf("%s: counters %v, %d packets out, engine %v", c.name, d, len(got), ev)
			if d[int(splice.Forward)] != 1 {
				errs = append(errs, fmt.Sprintf("%s: counters %v", c.name, d))
			}
			if len(got) != 3 {
				errs = append(errs, fmt.Sprintf("%s: %d segments out, want 3", c.name, len(got)))
			}
			for j, o := range got {
				var p splice.Packet
				if st := p.Parse(o); st != splice.OK {
					errs = append(errs, fmt.Sprintf("%s: segment %d does not parse: %v", c.name, j, st))
					continue
				}
				k := p.KeyOf()
				osrc, odst := o[12:16], o[16:20]
				if o[0]>>4 == 6 {
					osrc, odst = o[8:24], o[24:40]
				}
				seg := o[ipl:]
				if sum := splice.TCPChecksum(osrc, odst, seg); sum != 0 && sum != 0xffff {
					// TCPChecksum over a segment with its check field in
					// place is 0 when it is right.
					errs = append(errs, fmt.Sprintf("%s: segment %d (%v) bad TCP checksum (residual %#x)", c.name, j, k, sum))
				}
				t.Logf("%s: segment %d: %v len %d", c.name, j, k, len(o))
			}
			l.dp.DeleteFlow(uint64(950+i), keys)
		}
		if len(errs) > 0 {
			return fmt.Errorf("%s", strings.Join(errs, "\n"))
		}
		return nil
	})
}

// TestRedirectIntoTun: with the redirect, a packet from an Ethernet
// device into a tun device (MTU 1500) is redirected whenever it fits the
// route's MTU. The program let the kernel check the skb against the
// egress device (is_skb_forwardable: skb->len, the ingress Ethernet
// header included, against the device's MTU, its link-layer header, 0 on
// a tun, and 4 bytes of slack): packets of 1491-1500 bytes went to the
// stack.
func TestRedirectIntoTun(t *testing.T) {
	inFreshNetns(t, func() error {
		l, err := setupL3(false, true)
		if err != nil {
			return err
		}
		defer l.close()
		for _, c := range [][]string{
			{"ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"},
			{"ip", "link", "set", "va", "up"},
			{"ip", "link", "set", "vb", "up"},
			{"ip", "route", "del", "10.1.0.0/16"},
			{"ip", "route", "add", "10.1.0.0/16", "dev", "vb"},
		} {
			if err := sh(c...); err != nil {
				return err
			}
		}
		at, err := l.dp.Attach([]string{"vb", "rout"})
		if err != nil {
			return err
		}
		defer at.Detach()
		l.dp.setNow(fixtureStart)
		va, _ := interfacesByName()("va")
		vb, _ := interfacesByName()("vb")
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cl, sv, up := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"), netip.MustParseAddrPort("10.2.0.1:50000")
		_, keys, err := flowFor(l.dp, cl, sv, up, 88)
		if err != nil {
			return err
		}
		defer l.dp.DeleteFlow(88, keys)
		seq := uint32(1000)
		var errs []string
		for _, iplen := range []int{1400, 1490, 1491, 1500} {
			payload := make([]byte, iplen-20-32) // 32: TCP header with timestamps
			pkt := seg{src: cl, dst: sv, seq: seq, ack: 0xfffffff0, flags: 0x10, win: 500, opts: tsOpt(5001, 900000), payload: payload}.bytes()
			if len(pkt) != iplen {
				return fmt.Errorf("built %d bytes, want %d", len(pkt), iplen)
			}
			seq += uint32(len(payload))
			fr := append(append(append([]byte(nil), vb.HardwareAddr...), va.HardwareAddr...), 0x08, 0x00)
			fr = append(fr, pkt...)
			before := counters(l.dp)
			if err := unix.Sendto(fd, fr, 0, &unix.SockaddrLinklayer{Ifindex: va.Index, Halen: 6}); err != nil {
				return err
			}
			got := readAll(l.out, 200*time.Millisecond)
			d := diffCounters(before, counters(l.dp))
			t.Logf("IP length %d: counters %v, %d out on the tun", iplen, d, len(got))
			if d[int(splice.Forward)] != 1 || d[CounterRedirect] != 1 {
				errs = append(errs, fmt.Sprintf("IP length %d (tun MTU 1500): counters %v, want forwarded and redirected", iplen, d))
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("%s", strings.Join(errs, "\n"))
		}
		return nil
	})
}
