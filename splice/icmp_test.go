package splice

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
)

// routerAddr is a router on the path that sends the errors.
var (
	routerAddr4 = netip.MustParseAddr("10.9.0.1")
	routerAddr6 = netip.MustParseAddr("fd00:9::1")
)

// icmpAbout builds the path MTU error a router at from sends to the source
// of pkt (a packet as the gateway forwarded it), quoting its first quote
// bytes, with reference checksums.
func icmpAbout(from netip.Addr, pkt []byte, quote int, mtu uint32) []byte {
	q := pkt[:min(quote, len(pkt))]
	icmp := make([]byte, 8, 8+len(q))
	icmp = append(icmp, q...)
	if from.Is4() {
		icmp[0], icmp[1] = 3, 4
		binary.BigEndian.PutUint16(icmp[6:], uint16(mtu))
		binary.BigEndian.PutUint16(icmp[2:], ^refFold(refSum(icmp, 0)))
		ip := make([]byte, 20, 20+len(icmp))
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(icmp)))
		ip[8], ip[9] = 64, 1
		copy(ip[12:], from.AsSlice())
		copy(ip[16:], pkt[12:16]) // to the quoted packet's source
		binary.BigEndian.PutUint16(ip[10:], ^refFold(refSum(ip, 0)))
		return append(ip, icmp...)
	}
	icmp[0] = 2
	binary.BigEndian.PutUint32(icmp[4:], mtu)
	ip := make([]byte, 40, 40+len(icmp))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(icmp)))
	ip[6], ip[7] = 58, 64
	copy(ip[8:], from.AsSlice())
	copy(ip[24:], pkt[8:24])
	pseudo := refSum(ip[24:40], refSum(ip[8:24], 0)) + 58 + uint32(len(icmp))
	binary.BigEndian.PutUint16(icmp[2:], ^refFold(refSum(icmp, pseudo)))
	return append(ip, icmp...)
}

// icmpChecksumOK verifies an error's ICMP checksum with the reference sum.
func icmpChecksumOK(b []byte) bool {
	if b[0]>>4 == 4 {
		return refFold(refSum(b[20:], 0)) == 0xffff
	}
	pseudo := refSum(b[24:40], refSum(b[8:24], 0)) + 58 + uint32(len(b)-40)
	return refFold(refSum(b[40:], pseudo)) == 0xffff
}

// TestICMPErrorTranslate: a router's path MTU error about a forwarded
// packet, translated, quotes the packet as its sender sent it (tuple,
// sequence and acknowledgment numbers) and goes to that sender, with every
// checksum right; quotes of every length a router sends, both families,
// with and without NAT, both directions.
func TestICMPErrorTranslate(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, nat := range []bool{false, true} {
			for _, d := range []Dir{C2S, S2C} {
				name := fmt.Sprintf("v6=%v/nat=%v/%v", v6, nat, d)
				t.Run(name, func(t *testing.T) {
					f := newFixture(t, v6, nat)
					s := f.c2s(1000, 0xfffffff0, FlagACK)
					if d == S2C {
						s = f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
					}
					s.opts = tsOpt(7000, 100)
					s.payload = bytes.Repeat([]byte{0xa5}, 1200)
					sent := s.bytes()
					out := append([]byte(nil), sent...)
					if v := f.run(t, out, d, true); v != Forward {
						t.Fatalf("verdict %v", v)
					}
					router, ipLen := routerAddr4, 20
					if v6 {
						router, ipLen = routerAddr6, 40
					}
					var whole []byte // the whole quote, translated: the reference for shorter ones
					for _, quote := range []int{len(out), ipLen + 8, ipLen + 12, ipLen + 18, ipLen + 20, 576 - 28} {
						msg := icmpAbout(router, out, quote, 1400)
						m, ok := ParseICMPError(msg)
						if !ok {
							t.Fatalf("quote %d: not parsed", quote)
						}
						if m.MTU() != 1400 {
							t.Errorf("MTU %d", m.MTU())
						}
						e, x, ok := lookupIn(f.e, m.QuotedKey().Reverse())
						if !ok || x != 1-d {
							t.Fatalf("quote %d: key %v: found %v dir %v", quote, m.QuotedKey().Reverse(), ok, x)
						}
						if !m.Translate(e, d) {
							t.Fatalf("quote %d: not translated", quote)
						}
						checkTranslated(t, msg, sent, ipLen, quote)
						if quote == len(out) {
							whole = msg
						} else if q := ipLen + 8 + ipLen + 18; len(msg) >= q {
							// The quoted TCP checksum, updated incrementally,
							// is the whole quote's, which verifies.
							if got, want := msg[q-2:q], whole[q-2:q]; !bytes.Equal(got, want) {
								t.Errorf("quote %d: quoted TCP checksum % x, the whole quote's % x", quote, got, want)
							}
						}
					}
				})
			}
		}
	}
}

// checkTranslated checks an error translated for sent, the packet as its
// sender sent it.
func checkTranslated(t *testing.T, msg, sent []byte, ipLen, quote int) {
	t.Helper()
	icmpOff := ipLen
	q := msg[icmpOff+8:]
	if ipLen == 20 {
		if refFold(refSum(msg[:20], 0)) != 0xffff {
			t.Errorf("quote %d: IPv4 header checksum", quote)
		}
		if refFold(refSum(q[:20], 0)) != 0xffff {
			t.Errorf("quote %d: quoted IPv4 header checksum", quote)
		}
		if !bytes.Equal(msg[16:20], sent[12:16]) {
			t.Errorf("quote %d: error to %v, want the sender %v", quote, msg[16:20], sent[12:16])
		}
		if !bytes.Equal(q[12:20], sent[12:20]) {
			t.Errorf("quote %d: quoted addresses % x, sent % x", quote, q[12:20], sent[12:20])
		}
	} else {
		if !bytes.Equal(msg[24:40], sent[8:24]) {
			t.Errorf("quote %d: error to %v, want the sender %v", quote, msg[24:40], sent[8:24])
		}
		if !bytes.Equal(q[8:40], sent[8:40]) {
			t.Errorf("quote %d: quoted addresses differ from the sent ones", quote)
		}
	}
	if !icmpChecksumOK(msg) {
		t.Errorf("quote %d: ICMP checksum", quote)
	}
	qt, st := q[ipLen:], sent[ipLen:]
	n := min(len(qt), 12)
	if !bytes.Equal(qt[:n], st[:n]) {
		t.Errorf("quote %d: quoted ports, seq, ack % x, sent % x", quote, qt[:n], st[:n])
	}
	if len(qt) == len(st) {
		// The whole segment: its checksum verifies over the quote.
		off, al := addrOff(ipLen), addrLen(ipLen)
		if refFold(refSum(qt, refPseudo(q[off:off+al], q[off+al:off+2*al], len(qt)))) != 0xffff {
			t.Errorf("quote %d: the quoted TCP checksum does not verify", quote)
		}
	}
}

func addrOff(ipLen int) int {
	if ipLen == 20 {
		return 12
	}
	return 8
}

func addrLen(ipLen int) int {
	if ipLen == 20 {
		return 4
	}
	return 16
}

// icmpFixture returns a flow and a path MTU error about its c2s packet,
// as forwarded.
func icmpFixture(t testing.TB, v6 bool) (*fixture, []byte) {
	t.Helper()
	f := newFixture(t, v6, true)
	s := f.c2s(1000, 0xfffffff0, FlagACK)
	s.payload = bytes.Repeat([]byte{1}, 100)
	out := s.bytes()
	var p Packet
	if p.Parse(out) != OK || f.e.Process(&p, C2S, 1, true) != Forward {
		t.Fatal("the fixture's packet was not forwarded")
	}
	router := routerAddr4
	if v6 {
		router = routerAddr6
	}
	return f, icmpAbout(router, out, len(out), 1400)
}

// TestICMPErrorRefused: what is not a well-formed path MTU error quoting
// a TCP segment is not parsed, and an error whose checksum fails is not
// translated (a translation would make a forged or corrupted one valid).
func TestICMPErrorRefused(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		f, msg := icmpFixture(t, v6)
		ipLen := 20
		if v6 {
			ipLen = 40
		}
		type mutation struct {
			name string
			edit func(b []byte) []byte
		}
		muts := []mutation{
			{"other ICMP type", func(b []byte) []byte { b[ipLen] = 11; return b }},
			{"quote not TCP", func(b []byte) []byte {
				if v6 {
					b[ipLen+8+6] = 17
				} else {
					b[ipLen+8+9] = 17
				}
				return b
			}},
			{"quote of another family", func(b []byte) []byte { b[ipLen+8] ^= 0x20; return b }},
			{"not ICMP", func(b []byte) []byte {
				if v6 {
					b[6] = 17
				} else {
					b[9] = 17
				}
				return b
			}},
		}
		if !v6 {
			muts = append(muts,
				mutation{"other code", func(b []byte) []byte { b[ipLen+1] = 1; return b }},
				mutation{"quote with IP options", func(b []byte) []byte { b[ipLen+8] = 0x46; return b }},
				mutation{"a fragment", func(b []byte) []byte { b[6] |= 0x20; return b }},
				mutation{"IP length beyond the packet", func(b []byte) []byte { binary.BigEndian.PutUint16(b[2:], uint16(len(b)+1)); return b }},
			)
		} else {
			muts = append(muts, mutation{"payload length beyond the packet", func(b []byte) []byte {
				binary.BigEndian.PutUint16(b[4:], uint16(len(b)-39))
				return b
			}}, mutation{"quote between IPv4-mapped addresses", func(b []byte) []byte {
				// Its key would be an IPv4 flow's (see Packet.Parse);
				// addressed to the quote's source, as the check wants.
				q := ipLen + 8
				for _, off := range []int{q + 8, q + 24, 24} {
					copy(b[off:off+12], v4InV6Prefix[:])
				}
				copy(b[24+12:40], b[q+8+12:q+24])
				return b
			}})
		}
		for _, m := range muts {
			b := m.edit(append([]byte(nil), msg...))
			if _, ok := ParseICMPError(b); ok {
				t.Errorf("v6=%v %s: parsed", v6, m.name)
			}
		}
		if v6 {
			// RFC 4443: the receiver of a packet too big ignores its code.
			b := append([]byte(nil), msg...)
			b[ipLen+1] = 1
			if _, ok := ParseICMPError(b); !ok {
				t.Errorf("packet too big with code 1: not parsed")
			}
		}
		// Every truncation, with the lengths in the headers made to
		// match: shorter than the ports and sequence number of the quote
		// it is refused, and it never panics.
		for n := 0; n < len(msg); n++ {
			b := append([]byte(nil), msg[:n]...)
			if n >= ipLen {
				if v6 {
					binary.BigEndian.PutUint16(b[4:], uint16(n-40))
				} else {
					binary.BigEndian.PutUint16(b[2:], uint16(n))
				}
			}
			_, ok := ParseICMPError(b)
			if want := n >= 2*ipLen+8+8; ok != want {
				t.Errorf("v6=%v truncated to %d bytes: parsed %v", v6, n, ok)
			}
		}
		// A bad checksum: parsed, not translated, unchanged.
		b := append([]byte(nil), msg...)
		b[len(b)-1] ^= 0xff
		m, ok := ParseICMPError(b)
		if !ok {
			t.Fatalf("v6=%v: corrupted payload byte: not parsed", v6)
		}
		before := append([]byte(nil), b...)
		if m.Translate(f.e, C2S) {
			t.Errorf("v6=%v: translated an error whose checksum fails", v6)
		}
		if !bytes.Equal(b, before) {
			t.Errorf("v6=%v: a refused error was changed", v6)
		}
	}
}

// TestICMPErrorAllocs: parsing and translating allocate nothing.
func TestICMPErrorAllocs(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		f, msg := icmpFixture(t, v6)
		b := make([]byte, len(msg))
		allocs := testing.AllocsPerRun(200, func() {
			copy(b, msg)
			m, ok := ParseICMPError(b)
			if !ok {
				panic("not parsed")
			}
			e, x, _ := lookupIn(f.e, m.QuotedKey().Reverse())
			if !m.Translate(e, 1-x) {
				panic("not translated")
			}
		})
		if allocs != 0 {
			t.Errorf("v6=%v: %v allocations per error", v6, allocs)
		}
	}
}

// FuzzICMPError: any bytes either fail to parse or translate without
// panicking, and a translated error's ICMP checksum verifies and it goes
// to the flow's sender.
func FuzzICMPError(f *testing.F) {
	for _, v6 := range []bool{false, true} {
		_, msg := icmpFixture(f, v6)
		f.Add(msg, false)
	}
	fx4, _ := icmpFixture(f, false)
	fx6, _ := icmpFixture(f, true)
	f.Fuzz(func(t *testing.T, b []byte, s2c bool) {
		m, ok := ParseICMPError(b)
		if !ok {
			return
		}
		fx := fx4
		if m.v6 {
			fx = fx6
		}
		d := C2S
		if s2c {
			d = S2C
		}
		if !m.Translate(fx.e, d) {
			return
		}
		if !icmpChecksumOK(m.Bytes()) {
			t.Fatal("translated error's ICMP checksum fails")
		}
		sender := fx.e.Keys[d].Src[12:]
		if m.v6 {
			sender = fx.e.Keys[d].Src[:]
		}
		if !bytes.Equal(m.outerDst(), sender) {
			t.Fatalf("translated error goes to % x, not the sender % x", m.outerDst(), sender)
		}
	})
}

// TestIsICMP: ICMP and ICMPv6 packets are told from others, behind IPv6
// extension headers too, so that what the rules queued and the engine
// does not translate goes on as it came.
func TestIsICMP(t *testing.T) {
	_, msg4 := icmpFixture(t, false)
	_, msg6 := icmpFixture(t, true)
	// withExt puts an extension header of type kind (its next header:
	// ICMPv6) between msg6's IPv6 header and its ICMPv6 message.
	withExt := func(kind byte, ext []byte) []byte {
		b := append(append(append([]byte(nil), msg6[:40]...), ext...), msg6[40:]...)
		b[6] = kind
		return b
	}
	hopByHop := withExt(0, []byte{58, 0, 1, 4, 0, 0, 0, 0})
	fragment := withExt(44, []byte{58, 0, 0, 1, 0, 0, 0, 1})
	tcp := seg{src: cAddr6, dst: sAddr6, flags: FlagACK}.bytes()
	for _, c := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"ICMP", msg4, true},
		{"ICMPv6", msg6, true},
		{"ICMPv6 behind hop-by-hop options", hopByHop, true},
		{"ICMPv6 behind a fragment header", fragment, true},
		{"IPv4 TCP", seg{src: cAddr4, dst: sAddr4, flags: FlagACK}.bytes(), false},
		{"IPv6 TCP", tcp, false},
		{"hop-by-hop cut short", hopByHop[:44], false},
		{"empty", nil, false},
	} {
		if got := IsICMP(c.b); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

// TestICMPErrorAddressedElsewhere: a path MTU error goes to the source
// of the packet it quotes (RFC 792, RFC 4443 2.4). One addressed to
// another host that crosses the gateway, quoting a spliced flow's
// packet, is not an error for that flow: it is not rerouted to the
// flow's sender (it was: a forger anywhere could steer errors to either
// end of a spliced flow through the gateway).
func TestICMPErrorAddressedElsewhere(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		_, msg := icmpFixture(t, v6)
		b := append([]byte(nil), msg...)
		// Readdress it to a third host, with checksums that verify.
		if v6 {
			third := netip.MustParseAddr("fd00:77::9").As16()
			copy(b[24:40], third[:])
			binary.BigEndian.PutUint16(b[42:], 0)
			pseudo := refSum(b[24:40], refSum(b[8:24], 0)) + 58 + uint32(len(b)-40)
			binary.BigEndian.PutUint16(b[42:], ^refFold(refSum(b[40:], pseudo)))
		} else {
			third := netip.MustParseAddr("203.0.113.9").As4()
			copy(b[16:20], third[:])
			binary.BigEndian.PutUint16(b[10:], 0)
			binary.BigEndian.PutUint16(b[10:], ^refFold(refSum(b[:20], 0)))
		}
		if _, ok := ParseICMPError(b); ok {
			t.Errorf("v6=%v: an error addressed to a third host was taken for the spliced flow's", v6)
		}
	}
}
