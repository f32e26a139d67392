package splice

import (
	"fmt"
	"net/netip"
)

// Dir is a direction of a spliced flow.
type Dir uint8

const (
	C2S Dir = 0 // client to server
	S2C Dir = 1 // server to client
)

func (d Dir) String() string {
	if d == C2S {
		return "c2s"
	}
	return "s2c"
}

// Conn is one of the gateway's two TCP connections as captured at splice
// time (TCP_REPAIR and TCP_INFO): everything the engine needs to continue
// it without the socket.
type Conn struct {
	Local, Remote netip.AddrPort
	// SndNxt is the next sequence number the socket would send (write_seq;
	// with an empty send queue also snd_una). RcvNxt is the next one it
	// expects from its peer.
	SndNxt, RcvNxt Seq
	// SndWnd is the peer's receive window as last advertised to the
	// socket; RcvWnd the window the socket last advertised. Bytes.
	SndWnd, RcvWnd uint32
	// SndWscale is the shift the peer applies to the windows it sends;
	// RcvWscale the shift the socket applies to the windows it sends.
	SndWscale, RcvWscale uint8
	// MSS is the socket's segment size toward its peer (tcp_info's
	// snd_mss). AdvMSS is the largest payload the peer may send in a
	// segment (tcp_info's advmss: the MSS the socket announced, less
	// the timestamp option when timestamps were negotiated). MaxWnd is
	// the largest window the peer ever offered the socket, bytes.
	MSS              uint16
	AdvMSS           uint16
	MaxWnd           uint32
	SACK, Timestamps bool // negotiated on this connection
	// ECN: the connection negotiated ECN (RFC 3168; tcp_info's
	// TCPI_OPT_ECN): its ends may send ECN-capable packets.
	ECN bool
	// TSval is the socket's timestamp clock at capture (TCP_TIMESTAMP,
	// with the microsecond-clock flag bit cleared).
	TSval uint32
}

// Params describe a splice: the connection the gateway accepted from the
// client (Local is the original destination, Remote the client) and the
// connection it opened to the server.
type Params struct {
	Client, Server Conn
}

// Keys returns the flow's input keys: the tuple of packets arriving from
// the client (C2S) and from the server (S2C).
func (p *Params) Keys() [2]Key {
	return [2]Key{KeyFrom(p.Client.Remote, p.Client.Local), KeyFrom(p.Server.Remote, p.Server.Local)}
}

// Validate rejects parameters the engine cannot use.
func (p *Params) Validate() error {
	for _, c := range []*Conn{&p.Client, &p.Server} {
		if c.SndWscale > 14 || c.RcvWscale > 14 {
			return fmt.Errorf("window scale %d/%d above 14", c.SndWscale, c.RcvWscale)
		}
		if !c.Local.IsValid() || !c.Remote.IsValid() {
			return fmt.Errorf("connection addresses missing")
		}
	}
	if p.Client.Local.Addr().Is4() != p.Client.Remote.Addr().Is4() || p.Server.Local.Addr().Is4() != p.Server.Remote.Addr().Is4() {
		return fmt.Errorf("mixed address families within a connection")
	}
	if p.Client.Remote.Addr().Is4() != p.Server.Remote.Addr().Is4() {
		return fmt.Errorf("the two connections have different address families (%v, %v); the engine cannot translate IPv4 to IPv6",
			p.Client.Remote.Addr(), p.Server.Remote.Addr())
	}
	k := p.Keys()
	if k[0] == k[1] {
		return fmt.Errorf("both connections have the tuple %v", k[0])
	}
	return nil
}

// Per-direction flag bits.
const (
	dirTS         = 1 << iota // both legs negotiated timestamps: translate them
	dirTSLearned              // tsOff holds the learned TSval offset
	dirStripTS                // the receiving leg did not negotiate timestamps
	dirStripSACK              // the receiving leg did not negotiate SACK
	dirAddrs                  // addresses change in this direction (NAT)
	dirFIN                    // the sender sent a FIN at finSeq
	dirFINAcked               // the receiver acknowledged it
	dirDupDropped             // a duplicate after the end was dropped once
)

// dirState is the rewrite and tracking state of one direction. Sequence
// values are in the sender's own (input) sequence space.
type dirState struct {
	seqOff  uint32 // added to seq; subtracted from acks going the other way
	tsOff   uint32 // added to TSval; before learning, the output leg's TS clock at capture
	tsJump  uint32 // the part of tsOff that is pawsJump's forward jump
	sndNxt  Seq    // end of the highest data or FIN the sender sent (never advanced by a pure ACK)
	ackSeen Seq    // highest acknowledgment of this direction's data by the receiver
	maxWin  uint32 // largest window the receiver advertised, bytes
	lastWin uint32 // last window the sender advertised, bytes
	tsVal   uint32 // last TSval and TSecr the sender sent (input values)
	tsEcr   uint32
	finSeq  Seq
	finAt   int64  // when the FIN was first forwarded, then when first acknowledged (monotonic nanoseconds)
	srcPort uint16 // output ports
	dstPort uint16
	wsIn    uint8 // shift of the window field as received
	wsOut   uint8 // shift of the window field as sent
	flags   uint8
	// winUnit: the sender advertised a window of at least one unit of
	// wsOut (see scaleWindow).
	winUnit bool
}

// Flow is the per-flow state of the engine for both directions: offsets,
// the small TCP tracker, and what unsplice needs. It is fixed-size and
// holds no pointers; the addresses live in the flow table's keys.
type Flow struct {
	d        [2]dirState
	lastSeen int64 // when the last packet was forwarded (monotonic nanoseconds)
	closed   uint8 // flowRST when a RST was forwarded; flowRelearn and flowStripECN bits by direction
}

const flowRST = 1

// flowStripECN << d (in Flow.closed): direction d's sender negotiated
// ECN and its receiver did not (see Rewrite).
const flowStripECN = 8

// flowRelearn << d (in Flow.closed): direction d's tracking state
// (sndNxt, ackSeen) is an old record, behind what the ends did since (see
// Relearn).
const flowRelearn = 2

func (f *Flow) relearning(d Dir) bool { return f.closed&(flowRelearn<<d) != 0 }

// Relearn marks the flow's tracking state as an old record of a flow
// that kept running while nobody tracked it (a daemon restarted on the
// nfqueue datapath: the record was written before it died, and the ends
// went on sending, or retransmitting, since). Until the receiver of a
// direction acknowledges something, that direction's packets are
// checked against the record's lower bounds (everything the ends send
// now lies at or after what the record saw) and, above, only against
// the furthest its sender can have sent (relearnTop: a window past the
// record's acknowledgment, and what the earlier daemon forwarded in the
// record's last second), and raise the tracking state to what they
// carry; the receiver's first acknowledgment makes the direction's
// state current again, and the usual checks resume.
// Nothing else changes: the offsets, timestamps and window scales are
// the splice's, which did not move.
func (f *Flow) Relearn() { f.closed |= flowRelearn | flowRelearn<<1 }

// Relearning reports whether direction d's tracking state is still
// being relearned (see Relearn).
func (f Flow) Relearning(d Dir) bool { return f.relearning(d) }

// NewFlow builds the state for a splice. now is the current time in
// nanoseconds; every time a flow keeps is on the caller's clock, which the
// daemon takes from package monotime (the BPF program's clock too), never
// the wall clock, whose steps would make flows look idle.
func NewFlow(p *Params, now int64) (Flow, error) {
	if err := p.Validate(); err != nil {
		return Flow{}, err
	}
	c, s := &p.Client, &p.Server
	keys := p.Keys()
	var f Flow
	f.lastSeen = now
	if c.ECN && !s.ECN {
		f.closed |= flowStripECN << C2S
	}
	if s.ECN && !c.ECN {
		f.closed |= flowStripECN << S2C
	}
	f.d[C2S] = dirState{
		seqOff:  uint32(s.SndNxt - c.RcvNxt),
		tsOff:   s.TSval,
		sndNxt:  c.RcvNxt,
		ackSeen: c.RcvNxt,
		maxWin:  max(c.RcvWnd, s.SndWnd),
		lastWin: c.SndWnd,
		srcPort: s.Local.Port(),
		dstPort: s.Remote.Port(),
		wsIn:    c.SndWscale,
		wsOut:   s.RcvWscale,
		flags:   dirFlags(c, s, keys[C2S], keys[S2C].Reverse()),
		winUnit: c.SndWnd >= 1<<s.RcvWscale,
	}
	f.d[S2C] = dirState{
		seqOff:  uint32(c.SndNxt - s.RcvNxt),
		tsOff:   c.TSval,
		sndNxt:  s.RcvNxt,
		ackSeen: s.RcvNxt,
		maxWin:  max(s.RcvWnd, c.SndWnd),
		lastWin: s.SndWnd,
		srcPort: c.Local.Port(),
		dstPort: c.Remote.Port(),
		wsIn:    s.SndWscale,
		wsOut:   c.RcvWscale,
		flags:   dirFlags(s, c, keys[S2C], keys[C2S].Reverse()),
		winUnit: s.SndWnd >= 1<<c.RcvWscale,
	}
	return f, nil
}

// dirFlags for packets arriving on connection in and leaving on out.
func dirFlags(in, out *Conn, inKey, outKey Key) uint8 {
	var fl uint8
	if in.Timestamps && out.Timestamps {
		fl |= dirTS
	}
	if !out.Timestamps {
		fl |= dirStripTS
	}
	if !out.SACK {
		fl |= dirStripSACK
	}
	if inKey.Src != outKey.Src || inKey.Dst != outKey.Dst {
		fl |= dirAddrs
	}
	return fl
}

// Finished reports whether the flow ended: a RST was forwarded, or both
// FINs were sent and acknowledged.
func (f Flow) Finished() bool {
	return f.closed&flowRST != 0 || (f.d[C2S].flags&dirFINAcked != 0 && f.d[S2C].flags&dirFINAcked != 0)
}

// FINSeen reports whether the sender of direction d has sent its FIN.
func (f Flow) FINSeen(d Dir) bool { return f.d[d].flags&dirFIN != 0 }

// Idle reports whether no packet was forwarded for at least timeout.
func (f Flow) Idle(now, timeout int64) bool { return now-f.lastSeen >= timeout }

// LastSeen is when the last packet was forwarded (monotonic nanoseconds).
func (f Flow) LastSeen() int64 { return f.lastSeen }

// DirInfo is what the engine tracked for one direction, in the sender's
// own sequence space: what unsplice needs to rebuild the sockets.
type DirInfo struct {
	SeqOffset  uint32 // added to this direction's sequence numbers
	HighestSeq Seq    // end of the highest data or FIN sent
	HighestAck Seq    // highest acknowledgment of that data by the receiver
	Window     uint32 // last window the sender advertised, bytes
	TSval      uint32 // last timestamps the sender sent
	TSecr      uint32
	TSOffset   uint32 // added to TSval, once learned
	TSLearned  bool
	FIN        bool
}

// Outstanding reports whether direction d has data or a FIN forwarded
// that its receiver has not acknowledged (as far as the engine saw).
func (f Flow) Outstanding(d Dir) bool { return f.d[d].ackSeen.LessThan(f.d[d].sndNxt) }

// Info returns the tracked state of direction d.
func (f Flow) Info(d Dir) DirInfo {
	s := &f.d[d]
	return DirInfo{
		SeqOffset: s.seqOff, HighestSeq: s.sndNxt, HighestAck: s.ackSeen, Window: s.lastWin,
		TSval: s.tsVal, TSecr: s.tsEcr, TSOffset: s.tsOff, TSLearned: s.flags&dirTSLearned != 0,
		FIN: s.flags&dirFIN != 0,
	}
}
