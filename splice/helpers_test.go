package splice

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// seg describes a test packet; bytes() builds it with a correct checksum
// computed by refChecksum, independent of the package's own code.
type seg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	win      uint16
	urg      uint16 // the urgent pointer
	opts     []byte // raw TCP options; padded with EOL to a multiple of 4
	payload  []byte
	ipOpts   []byte // IPv4 options (multiple of 4)
	hopByHop bool   // IPv6: add an 8-byte hop-by-hop header before TCP
	partial  bool   // store only the pseudo-header sum, as CHECKSUM_PARTIAL
}

func (s seg) bytes() []byte {
	opts := append([]byte(nil), s.opts...)
	for len(opts)%4 != 0 {
		opts = append(opts, OptEOL)
	}
	tcp := make([]byte, 20+len(opts)+len(s.payload))
	binary.BigEndian.PutUint16(tcp[0:], s.src.Port())
	binary.BigEndian.PutUint16(tcp[2:], s.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], s.seq)
	binary.BigEndian.PutUint32(tcp[8:], s.ack)
	tcp[12] = byte((20 + len(opts)) / 4 << 4)
	tcp[13] = s.flags
	binary.BigEndian.PutUint16(tcp[14:], s.win)
	binary.BigEndian.PutUint16(tcp[18:], s.urg)
	copy(tcp[20:], opts)
	copy(tcp[20+len(opts):], s.payload)
	src, dst := s.src.Addr().AsSlice(), s.dst.Addr().AsSlice()
	if s.partial {
		binary.BigEndian.PutUint16(tcp[16:], refFold(refPseudo(src, dst, len(tcp))))
	} else {
		binary.BigEndian.PutUint16(tcp[16:], ^refFold(refSum(tcp, refPseudo(src, dst, len(tcp)))))
	}
	if s.src.Addr().Is4() {
		hl := 20 + len(s.ipOpts)
		ip := make([]byte, hl, hl+len(tcp))
		ip[0] = 0x40 | byte(hl/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(tcp)))
		ip[6] = 0x40 // DF
		ip[8] = 64
		ip[9] = 6
		copy(ip[12:], src)
		copy(ip[16:], dst)
		copy(ip[20:], s.ipOpts)
		binary.BigEndian.PutUint16(ip[10:], ^refFold(refSum(ip, 0)))
		return append(ip, tcp...)
	}
	ext := []byte(nil)
	next := byte(6)
	if s.hopByHop {
		ext = []byte{6, 0, 1, 4, 0, 0, 0, 0} // next=TCP, len 0, PadN
		next = 0
	}
	ip := make([]byte, 40, 40+len(ext)+len(tcp))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(tcp)))
	ip[6] = next
	ip[7] = 64
	copy(ip[8:], src)
	copy(ip[24:], dst)
	return append(append(ip, ext...), tcp...)
}

// refSum is a plain 16-bit one's-complement sum, the reference for Sum.
func refSum(b []byte, s uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func refFold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

func refPseudo(src, dst []byte, n int) uint32 {
	return refSum(dst, refSum(src, 0)) + 6 + uint32(n)
}

// decoded checks a rewritten packet with an independent decoder
// (gopacket) and an independent checksum, and returns the TCP layer.
func decoded(t *testing.T, b []byte) *layers.TCP {
	t.Helper()
	first := layers.LayerTypeIPv4
	if b[0]>>4 == 6 {
		first = layers.LayerTypeIPv6
	}
	pkt := gopacket.NewPacket(b, first, gopacket.Default)
	if el := pkt.ErrorLayer(); el != nil {
		t.Fatalf("gopacket cannot decode the rewritten packet: %v", el.Error())
	}
	tcpL, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if !ok {
		t.Fatalf("no TCP layer in rewritten packet")
	}
	var src, dst []byte
	if ip4, ok := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
		src, dst = ip4.SrcIP.To4(), ip4.DstIP.To4()
		if refFold(refSum(b[:ip4.IHL*4], 0)) != 0xffff {
			t.Fatalf("IPv4 header checksum invalid")
		}
	} else {
		ip6 := pkt.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
		src, dst = ip6.SrcIP.To16(), ip6.DstIP.To16()
	}
	segment := append(tcpL.Contents, tcpL.Payload...)
	if got := refFold(refSum(segment, refPseudo(src, dst, len(segment)))); got != 0xffff {
		t.Fatalf("TCP checksum invalid after rewrite (sum %#04x)", got)
	}
	return tcpL
}

func tsOpt(val, ecr uint32) []byte {
	b := []byte{OptNOP, OptNOP, OptTimestamps, 10, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[4:], val)
	binary.BigEndian.PutUint32(b[8:], ecr)
	return b
}

func sackOpt(blocks ...uint32) []byte {
	b := []byte{OptNOP, OptNOP, OptSACK, byte(2 + 4*len(blocks))}
	for _, v := range blocks {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

// findOpt returns the option of the given kind in a TCP layer.
func findOpt(tcp *layers.TCP, kind layers.TCPOptionKind) (layers.TCPOption, bool) {
	for _, o := range tcp.Options {
		if o.OptionType == kind {
			return o, true
		}
	}
	return layers.TCPOption{}, false
}

// addresses of the test topology
var (
	cAddr4 = netip.MustParseAddrPort("10.1.0.2:40000")
	sAddr4 = netip.MustParseAddrPort("10.2.0.2:80")
	gAddr4 = netip.MustParseAddrPort("10.2.0.1:50000")
	cAddr6 = netip.MustParseAddrPort("[fd00:1::2]:40000")
	sAddr6 = netip.MustParseAddrPort("[fd00:2::2]:80")
	gAddr6 = netip.MustParseAddrPort("[fd00:2::1]:50000")
)

// fixture is a splice with sequence numbers near the wrap.
type fixture struct {
	p    Params
	e    *Entry
	c, s netip.AddrPort // client and server
	up   netip.AddrPort // upstream local: what the server sees
}

type fixOpt func(*Params)

func newFixture(t testing.TB, v6, nat bool, opts ...fixOpt) *fixture {
	t.Helper()
	c, s, g := cAddr4, sAddr4, gAddr4
	if v6 {
		c, s, g = cAddr6, sAddr6, gAddr6
	}
	up := netip.AddrPortFrom(c.Addr(), 40001) // transparent, other port
	if nat {
		up = g
	}
	p := Params{
		Client: Conn{Local: s, Remote: c, SndNxt: 0xfffffff0, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 5000},
		Server: Conn{Local: up, Remote: s, SndNxt: 0x7ffffff0, RcvNxt: 0xffffff00, SndWnd: 64000, RcvWnd: 64000,
			SndWscale: 7, RcvWscale: 7, MSS: 1460, SACK: true, Timestamps: true, TSval: 900000},
	}
	for _, o := range opts {
		o(&p)
	}
	tab := NewTable()
	e, err := tab.Add(1, &p, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{p: p, e: e, c: c, s: s, up: up}
}

// c2s builds a packet from the client as it arrives at the gateway.
func (f *fixture) c2s(seq, ack uint32, flags uint8) seg {
	return seg{src: f.c, dst: f.s, seq: seq, ack: ack, flags: flags, win: 500}
}

// s2c builds a packet from the server as it arrives at the gateway.
func (f *fixture) s2c(seq, ack uint32, flags uint8) seg {
	return seg{src: f.s, dst: f.up, seq: seq, ack: ack, flags: flags, win: 500}
}

// run parses and processes b in place, returning the verdict. Every
// forwarded packet is checked differentially: gopacket decodes it, its
// checksums verify with the reference sum, and every option other than
// timestamps and SACK is byte-identical to the input.
func (f *fixture) run(t *testing.T, b []byte, d Dir, csumComplete bool) Verdict {
	t.Helper()
	return f.runAt(t, b, d, csumComplete, 1)
}

// runAt is run at a given time (unix nanoseconds).
func (f *fixture) runAt(t *testing.T, b []byte, d Dir, csumComplete bool, now int64) Verdict {
	t.Helper()
	var p Packet
	if st := p.Parse(b); st != OK {
		t.Fatalf("parse: %v", st)
	}
	e, dir, ok := lookupIn(f.e, p.KeyOf())
	if !ok || dir != d {
		t.Fatalf("key %v: found=%v dir=%v, want %v", p.KeyOf(), ok, dir, d)
	}
	in := append([]byte(nil), p.TCP().Options()...)
	v := e.Process(&p, d, now, csumComplete)
	if v == Forward {
		decoded(t, b)
		sameOptions(t, in, p.TCP().Options())
	}
	return v
}

// sameOptions walks two option areas in lockstep (as Linux parses them):
// timestamps and SACK may be translated or replaced by NOPs; every other
// byte must be identical.
func sameOptions(t *testing.T, in, out []byte) {
	t.Helper()
	if len(in) != len(out) {
		t.Fatalf("options length changed %d -> %d", len(in), len(out))
	}
	for i := 0; i < len(in); {
		kind := in[i]
		if kind == OptEOL || kind == OptNOP || i+1 >= len(in) || in[i+1] < 2 || i+int(in[i+1]) > len(in) {
			if !bytes.Equal(in[i:], out[i:]) && kind != OptNOP {
				t.Fatalf("option bytes from %d changed: % x -> % x", i, in[i:], out[i:])
			}
			if kind != OptNOP {
				return
			}
			if out[i] != OptNOP {
				t.Fatalf("NOP at %d changed", i)
			}
			i++
			continue
		}
		n := int(in[i+1])
		switch {
		case kind == OptTimestamps || kind == OptSACK:
			stripped := bytes.Equal(out[i:i+n], bytes.Repeat([]byte{OptNOP}, n))
			if !stripped && (out[i] != kind || out[i+1] != byte(n)) {
				t.Fatalf("option %d at %d neither translated in place nor stripped: % x", kind, i, out[i:i+n])
			}
		case !bytes.Equal(in[i:i+n], out[i:i+n]):
			t.Fatalf("option %d at %d changed: % x -> % x", kind, i, in[i:i+n], out[i:i+n])
		}
		i += n
	}
}

func lookupIn(e *Entry, k Key) (*Entry, Dir, bool) {
	switch k {
	case e.Keys[C2S]:
		return e, C2S, true
	case e.Keys[S2C]:
		return e, S2C, true
	}
	return nil, 0, false
}
