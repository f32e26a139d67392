package gateway

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Taken-over payload in GSO packets. A busy flow's splice takes over what
// arrives while its sockets drain, up to the receive windows the sockets
// advertised: megabytes, which arrive in packets of up to 64 KB (GRO on
// the sender's NIC, GSO on a veth). A raw IP socket sends at most an MTU
// a packet, so the release cut them into one-MSS segments and sent each
// through the IP output path: a splice of the bench's busy flows spent
// 2-10 ms there (the receiver's stack, on a veth, runs in the same call
// for every segment, and every segment draws its share of ACKs through
// the queue). gsoSender sends each of them as one packet instead,
// through a packet socket on the egress device with a virtio-net header
// that asks for segmentation (PACKET_VNET_HDR, as a user of a tap device
// does): the device segments it (TSO), or the kernel does just before
// the device (GSO), and a veth hands it whole to the receiver.
//
// A packet socket skips the IP output path, so the sender builds the
// Ethernet header itself from the kernel's tables: the egress device and
// next hop from the routing table (RTM_GETROUTE, as `ip route get`), the
// next hop's link-layer address from the neighbour table (RTM_GETNEIGH),
// the device's own address and type (RTM_GETLINK). Whatever this does not
// resolve (a device that is not Ethernet, a route with encapsulation, a
// neighbour not known yet) goes the raw way, as before, and so does all
// of it while the kernel holds IPsec policies for output or forwarding:
// the IP output path applies them (xfrm), a packet socket would not.
// The packets also skip netfilter's output and postrouting hooks, which
// the raw socket's went through (the forward hook, where spliced
// packets pass, neither saw).
type gsoSender struct {
	mu   sync.Mutex
	fd   int // AF_PACKET, SOCK_RAW, PACKET_VNET_HDR; -1 until first used
	nl   *netlink.Conn
	xfrm *netlink.Conn // NETLINK_XFRM, for the IPsec policy count
	// marksRoute: marks set at output route packets (markroute.go), so
	// the IP output path must send them.
	marksRoute atomic.Bool
	// frame is the send buffer: the virtio-net header, the Ethernet
	// header and the IP packet.
	frame []byte
}

// egress is where a packet leaves: a device and the Ethernet addresses.
type egress struct {
	ifindex  int
	mtu      int
	src, dst [6]byte
}

const (
	virtioNetHdrLen      = 10 // struct virtio_net_hdr
	virtioNetHdrNeedsCsm = 1  // VIRTIO_NET_HDR_F_NEEDS_CSUM
	virtioGSOTCPv4       = 1  // VIRTIO_NET_HDR_GSO_TCPV4
	virtioGSOTCPv6       = 4  // VIRTIO_NET_HDR_GSO_TCPV6
	ethHeaderLen         = 14
)

// errNoEgress: the destination's way out is not one the sender handles.
var errNoEgress = errors.New("gso: no Ethernet next hop resolved")

// errGSOSetup: the sender's sockets could not be opened (no CAP_NET_RAW,
// or a sandbox that does not allow AF_PACKET or NETLINK_XFRM): every
// taken-over packet goes in segments.
var errGSOSetup = errors.New("gso: cannot open its sockets; taken-over payload goes in segments")

// errIPsec: IPsec policies may apply to the packets; only the IP output
// path applies them.
var errIPsec = errors.New("gso: the kernel has IPsec policies for output or forwarding")

// errMarksRoute: ip rules route by marks that output chains set; only
// the IP output path applies them (markroute.go).
var errMarksRoute = errors.New("gso: ip rules route by marks that output chains set")

func newGSOSender() *gsoSender { return &gsoSender{fd: -1} }

// open makes the packet socket and the netlink connection, on first use
// (a gateway whose splices never take over large packets needs neither).
// Called with mu held.
func (s *gsoSender) open() error {
	if s.fd >= 0 {
		return nil
	}
	// Protocol 0: the socket receives nothing.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: packet socket: %w (a systemd unit needs AF_PACKET in RestrictAddressFamilies)", errGSOSetup, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
		unix.Close(fd)
		return fmt.Errorf("%w: PACKET_VNET_HDR: %w", errGSOSetup, err)
	}
	nl, err := netlink.Dial(unix.NETLINK_ROUTE, nil)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("%w: rtnetlink: %w", errGSOSetup, err)
	}
	xfrm, err := netlink.Dial(unix.NETLINK_XFRM, nil)
	if err != nil {
		unix.Close(fd)
		nl.Close()
		return fmt.Errorf("%w: xfrm netlink (to count IPsec policies): %w", errGSOSetup, err)
	}
	s.fd, s.nl, s.xfrm = fd, nl, xfrm
	s.frame = make([]byte, virtioNetHdrLen+ethHeaderLen+0x10000+splice.IPv6HeaderLen)
	return nil
}

// Close releases the sockets.
func (s *gsoSender) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return nil
	}
	err := errors.Join(unix.Close(s.fd), s.nl.Close(), s.xfrm.Close())
	s.fd, s.nl, s.xfrm = -1, nil, nil
	return err
}

// resolve finds where a packet to dst leaves: the routing table's
// device and next hop, the neighbour table's address for that next hop.
func (s *gsoSender) resolve(dst netip.Addr) (egress, error) {
	var e egress
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.open(); err != nil {
		return e, err
	}
	if err := s.noIPsec(); err != nil {
		return e, err
	}
	if s.marksRoute.Load() {
		return e, errMarksRoute
	}
	ifindex, nextHop, err := s.route(dst)
	if err != nil {
		return e, err
	}
	if e.src, e.mtu, err = s.link(ifindex); err != nil {
		return e, err
	}
	if e.dst, err = s.neighbour(ifindex, nextHop); err != nil {
		return e, err
	}
	e.ifindex = int(ifindex)
	return e, nil
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// route asks the routing table for dst, as `ip route get` does: the
// output device and the next hop (the gateway, or dst itself).
func (s *gsoSender) route(dst netip.Addr) (uint32, netip.Addr, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(unix.RTA_DST, dst.AsSlice())
	attrs, err := ae.Encode()
	if err != nil {
		return 0, dst, err
	}
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = family(dst)
	rtm[1] = uint8(dst.BitLen()) // rtm_dst_len
	msgs, err := s.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETROUTE, Flags: netlink.Request},
		Data:   append(rtm[:], attrs...),
	})
	if err != nil {
		return 0, dst, fmt.Errorf("gso: route to %v: %w", dst, err)
	}
	if len(msgs) != 1 || len(msgs[0].Data) < unix.SizeofRtMsg {
		return 0, dst, errNoEgress
	}
	m := msgs[0].Data
	if m[7] != unix.RTN_UNICAST { // rtm_type: local, unreachable...
		return 0, dst, errNoEgress
	}
	ad, err := netlink.NewAttributeDecoder(m[unix.SizeofRtMsg:])
	if err != nil {
		return 0, dst, err
	}
	var oif uint32
	nextHop := dst
	for ad.Next() {
		switch ad.Type() {
		case unix.RTA_OIF:
			oif = ad.Uint32()
		case unix.RTA_GATEWAY:
			if a, ok := netip.AddrFromSlice(ad.Bytes()); ok {
				nextHop = a.Unmap()
			}
		case unix.RTA_VIA, unix.RTA_MULTIPATH, unix.RTA_ENCAP:
			// Another family's next hop; several; an encapsulation
			// (MPLS, seg6, ...) the output path would add.
			return 0, dst, errNoEgress
		}
	}
	if err := ad.Err(); err != nil {
		return 0, dst, err
	}
	if oif == 0 || nextHop.Is4() != dst.Is4() {
		return 0, dst, errNoEgress
	}
	return oif, nextHop, nil
}

// link returns an Ethernet device's address and MTU.
func (s *gsoSender) link(ifindex uint32) (mac [6]byte, mtu int, err error) {
	var ifi [unix.SizeofIfInfomsg]byte
	binary.NativeEndian.PutUint32(ifi[4:], ifindex)
	msgs, err := s.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETLINK, Flags: netlink.Request},
		Data:   ifi[:],
	})
	if err != nil {
		return mac, 0, fmt.Errorf("gso: link %d: %w", ifindex, err)
	}
	if len(msgs) != 1 || len(msgs[0].Data) < unix.SizeofIfInfomsg {
		return mac, 0, errNoEgress
	}
	m := msgs[0].Data
	if binary.NativeEndian.Uint16(m[2:]) != unix.ARPHRD_ETHER {
		return mac, 0, errNoEgress
	}
	ad, err := netlink.NewAttributeDecoder(m[unix.SizeofIfInfomsg:])
	if err != nil {
		return mac, 0, err
	}
	found := false
	for ad.Next() {
		switch ad.Type() {
		case unix.IFLA_ADDRESS:
			if len(ad.Bytes()) == 6 {
				copy(mac[:], ad.Bytes())
				found = true
			}
		case unix.IFLA_MTU:
			mtu = int(ad.Uint32())
		}
	}
	if err := ad.Err(); err != nil || !found || mtu == 0 {
		return mac, 0, errors.Join(err, errNoEgress)
	}
	return mac, mtu, nil
}

// noIPsec returns errIPsec while the kernel holds IPsec policies for
// output or forwarding (XFRM_MSG_GETSPDINFO: the policy counts).
func (s *gsoSender) noIPsec() error {
	const (
		xfrmMsgGetSPDInfo = 0x25 // XFRM_MSG_GETSPDINFO
		xfrmaSPDInfo      = 1    // XFRMA_SPD_INFO: struct xfrmu_spdinfo
	)
	msgs, err := s.xfrm.Execute(netlink.Message{
		Header: netlink.Header{Type: xfrmMsgGetSPDInfo, Flags: netlink.Request},
		Data:   make([]byte, 4), // u32 flags
	})
	if err != nil {
		return fmt.Errorf("gso: count IPsec policies: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return err
		}
		for ad.Next() {
			// incnt, outcnt, fwdcnt, inscnt, outscnt, fwdscnt
			if b := ad.Bytes(); ad.Type() == xfrmaSPDInfo && len(b) >= 12 {
				if binary.NativeEndian.Uint32(b[4:]) != 0 || binary.NativeEndian.Uint32(b[8:]) != 0 {
					return errIPsec
				}
				return nil
			}
		}
		if err := ad.Err(); err != nil {
			return err
		}
	}
	return errors.New("gso: the kernel did not say how many IPsec policies it holds")
}

// neighbour returns the link-layer address the neighbour table holds for
// nextHop on the device, if it holds a usable one.
func (s *gsoSender) neighbour(ifindex uint32, nextHop netip.Addr) ([6]byte, error) {
	var mac [6]byte
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(unix.NDA_DST, nextHop.AsSlice())
	attrs, err := ae.Encode()
	if err != nil {
		return mac, err
	}
	var ndm [unix.SizeofNdMsg]byte
	ndm[0] = family(nextHop)
	binary.NativeEndian.PutUint32(ndm[4:], ifindex)
	msgs, err := s.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETNEIGH, Flags: netlink.Request},
		Data:   append(ndm[:], attrs...),
	})
	if err != nil {
		// ENOENT: no entry yet; the raw way resolves it.
		return mac, fmt.Errorf("gso: neighbour %v: %w", nextHop, err)
	}
	if len(msgs) != 1 || len(msgs[0].Data) < unix.SizeofNdMsg {
		return mac, errNoEgress
	}
	m := msgs[0].Data
	const usable = unix.NUD_REACHABLE | unix.NUD_STALE | unix.NUD_DELAY | unix.NUD_PROBE | unix.NUD_PERMANENT
	if binary.NativeEndian.Uint16(m[8:])&usable == 0 {
		return mac, errNoEgress
	}
	ad, err := netlink.NewAttributeDecoder(m[unix.SizeofNdMsg:])
	if err != nil {
		return mac, err
	}
	found := false
	for ad.Next() {
		if ad.Type() == unix.NDA_LLADDR && len(ad.Bytes()) == 6 {
			copy(mac[:], ad.Bytes())
			found = true
		}
	}
	if err := ad.Err(); err != nil || !found {
		return mac, errors.Join(err, errNoEgress)
	}
	return mac, nil
}

// gsoCandidate reports whether a packet's TCP payload exceeds mss, so
// that it would leave as several segments, and it can go as one GSO
// packet: no URG (its pointer would be wrong in every segment but the
// first) and no CWR (set on the first segment only, which needs the
// ECN variant of the GSO type).
func gsoCandidate(p *splice.Packet, mss int) bool {
	return p.PayloadLen() > mss && p.TCP().Flags()&(splice.FlagURG|tcpFlagCWR) == 0
}

// send transmits p, a complete IP packet whose TCP payload is longer than
// mss, as one GSO packet of segments of mss bytes on e. It sets the TCP
// checksum field to the pseudo-header sum (the device or the kernel
// completes it per segment), so p's checksum is not valid afterwards.
func (s *gsoSender) send(e egress, p *splice.Packet, mss int) error {
	seg := p.Segment()
	ipLen := cap(p.Bytes()) - cap(seg) // where the segment starts
	tcpLen := len(seg)
	b := p.Bytes()[:ipLen+tcpLen] // without bytes past the IP length
	src, dst := p.Src(), p.Dst()
	sum := splice.Sum(src, splice.Sum(dst, uint64(unix.IPPROTO_TCP)+uint64(tcpLen)))
	p.TCP().SetChecksum(splice.Fold(sum))

	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.open(); err != nil {
		return err
	}
	n := virtioNetHdrLen + ethHeaderLen + len(b)
	if n > len(s.frame) {
		return fmt.Errorf("gso: packet of %d bytes", len(b))
	}
	// Each segment must fit the device (IPv4 options and IPv6 extension
	// headers make the headers longer than the MSS assumes).
	if mss = min(mss, e.mtu-ipLen-p.TCP().HeaderLen()); mss <= 0 {
		return fmt.Errorf("gso: no room for payload in the device's MTU %d", e.mtu)
	}
	f := s.frame[:n]
	f[0] = virtioNetHdrNeedsCsm
	f[1] = virtioGSOTCPv4
	ethType := uint16(unix.ETH_P_IP)
	if p.IsIPv6() {
		f[1], ethType = virtioGSOTCPv6, unix.ETH_P_IPV6
	}
	hdrLen := ethHeaderLen + ipLen + p.TCP().HeaderLen()
	// A packet socket's virtio-net header is in the machine's byte
	// order (legacy virtio).
	binary.NativeEndian.PutUint16(f[2:], uint16(hdrLen))
	binary.NativeEndian.PutUint16(f[4:], uint16(mss))
	binary.NativeEndian.PutUint16(f[6:], uint16(ethHeaderLen+ipLen)) // csum_start
	binary.NativeEndian.PutUint16(f[8:], 16)                         // csum_offset: the TCP checksum
	eth := f[virtioNetHdrLen:]
	copy(eth[0:6], e.dst[:])
	copy(eth[6:12], e.src[:])
	binary.BigEndian.PutUint16(eth[12:], ethType)
	copy(eth[ethHeaderLen:], b)
	sa := unix.SockaddrLinklayer{Protocol: htons(ethType), Ifindex: e.ifindex, Halen: 6}
	copy(sa.Addr[:], e.dst[:])
	return unix.Sendto(s.fd, f, 0, &sa)
}

// tcpFlagCWR is TCP's congestion window reduced flag.
const tcpFlagCWR = 0x80

// htons puts v in network byte order, as sockaddr_ll's protocol wants.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
