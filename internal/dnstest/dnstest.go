// Package dnstest is a tiny authoritative DNS server for tests: it
// answers A and AAAA queries over UDP from a fixed table, NXDOMAIN for
// other names, and can be told to stay silent (for resolver timeouts).
package dnstest

import (
	"net"
	"net/netip"
	"strings"
	"sync/atomic"

	"golang.org/x/net/dns/dnsmessage"
)

// Server answers queries on one UDP socket.
type Server struct {
	pc     net.PacketConn
	names  map[string][]netip.Addr // lower case, with the trailing dot
	Silent atomic.Bool             // drop every query
	// Queries counts the queries received.
	Queries atomic.Int64
}

// Serve answers queries on pc for names (without trailing dots) until pc
// is closed.
func Serve(pc net.PacketConn, names map[string][]netip.Addr) *Server {
	s := &Server{pc: pc, names: map[string][]netip.Addr{}}
	for n, a := range names {
		s.names[strings.ToLower(strings.TrimSuffix(n, "."))+"."] = a
	}
	go s.loop()
	return s
}

// Addr is the server's address.
func (s *Server) Addr() netip.AddrPort { return s.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

// Close stops the server.
func (s *Server) Close() error { return s.pc.Close() }

func (s *Server) loop() {
	buf := make([]byte, 1500)
	for {
		n, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		s.Queries.Add(1)
		if s.Silent.Load() {
			continue
		}
		if resp := s.answer(buf[:n]); resp != nil {
			s.pc.WriteTo(resp, from)
		}
	}
}

func (s *Server) answer(q []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	question, err := p.Question()
	if err != nil {
		return nil
	}
	addrs, known := s.names[strings.ToLower(question.Name.String())]
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	b.StartQuestions()
	b.Question(question)
	b.StartAnswers()
	rr := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 60}
	for _, a := range addrs {
		switch {
		case a.Is4() && question.Type == dnsmessage.TypeA:
			b.AResource(rr, dnsmessage.AResource{A: a.As4()})
		case a.Is6() && question.Type == dnsmessage.TypeAAAA:
			b.AAAAResource(rr, dnsmessage.AAAAResource{AAAA: a.As16()})
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}
