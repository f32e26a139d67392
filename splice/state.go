package splice

// State is a Flow's whole state with exported fields, for handing a flow
// to another datapath and back (package splice/bpf keeps the same state in
// a BPF map and rewrites from it in the kernel). Flow.State and
// FlowFromState convert losslessly: FlowFromState(f.State()) == f.
type State struct {
	Dirs     [2]DirState // indexed by Dir
	LastSeen int64       // when the last packet was forwarded (monotonic nanoseconds, package monotime)
	RST      bool        // a RST that ends the flow was forwarded
	// Relearn: a direction's tracking state is being relearned (see
	// Flow.Relearn).
	Relearn [2]bool
	// StripECN: a direction's sender negotiated ECN and its receiver
	// did not (see Rewrite).
	StripECN [2]bool
}

// DirState is one direction's rewrite parameters and tracking state, in
// the sender's own sequence space (see the engine's dirState).
type DirState struct {
	SeqOff  uint32 // added to seq; subtracted from acks going the other way
	TSOff   uint32 // added to TSval; before learning, the output leg's TS clock at capture
	TSJump  uint32 // the part of TSOff that is the PAWS jump
	SndNxt  Seq    // end of the highest data or FIN the sender sent
	AckSeen Seq    // highest acknowledgment of this direction's data
	MaxWin  uint32 // largest window the receiver advertised, bytes
	LastWin uint32 // last window the sender advertised, bytes
	TSval   uint32 // last TSval and TSecr the sender sent (input values)
	TSecr   uint32
	FINSeq  Seq
	FINAt   int64  // when the FIN was first forwarded, then when first acknowledged (monotonic nanoseconds)
	SrcPort uint16 // output ports
	DstPort uint16
	WSIn    uint8 // shift of the window field as received
	WSOut   uint8 // shift of the window field as sent
	Flags   uint8 // DirFlag bits
	WinUnit bool  // the sender advertised a window of one unit of WSOut or more
}

// DirState.Flags bits (the engine's own encoding).
const (
	DirFlagTS         = dirTS         // both legs negotiated timestamps: translate them
	DirFlagTSLearned  = dirTSLearned  // TSOff holds the learned TSval offset
	DirFlagStripTS    = dirStripTS    // the receiving leg did not negotiate timestamps
	DirFlagStripSACK  = dirStripSACK  // the receiving leg did not negotiate SACK
	DirFlagAddrs      = dirAddrs      // addresses change in this direction (NAT)
	DirFlagFIN        = dirFIN        // the sender sent a FIN at FINSeq
	DirFlagFINAcked   = dirFINAcked   // the receiver acknowledged it
	DirFlagDupDropped = dirDupDropped // a duplicate after the end was dropped once
)

// State returns the flow's state.
func (f *Flow) State() State {
	var s State
	for d := range f.d {
		x := &f.d[d]
		s.Dirs[d] = DirState{
			SeqOff: x.seqOff, TSOff: x.tsOff, TSJump: x.tsJump, SndNxt: x.sndNxt, AckSeen: x.ackSeen,
			MaxWin: x.maxWin, LastWin: x.lastWin, TSval: x.tsVal, TSecr: x.tsEcr, FINSeq: x.finSeq,
			FINAt: x.finAt, SrcPort: x.srcPort, DstPort: x.dstPort, WSIn: x.wsIn, WSOut: x.wsOut, Flags: x.flags, WinUnit: x.winUnit,
		}
	}
	s.LastSeen = f.lastSeen
	s.RST = f.closed&flowRST != 0
	for d := range s.Relearn {
		s.Relearn[d] = f.relearning(Dir(d))
		s.StripECN[d] = f.closed&(flowStripECN<<d) != 0
	}
	return s
}

// FlowFromState builds a flow from a state, the inverse of Flow.State.
func FlowFromState(s State) Flow {
	var f Flow
	for d := range f.d {
		x := &s.Dirs[d]
		f.d[d] = dirState{
			seqOff: x.SeqOff, tsOff: x.TSOff, tsJump: x.TSJump, sndNxt: x.SndNxt, ackSeen: x.AckSeen,
			maxWin: x.MaxWin, lastWin: x.LastWin, tsVal: x.TSval, tsEcr: x.TSecr, finSeq: x.FINSeq,
			finAt: x.FINAt, srcPort: x.SrcPort, dstPort: x.DstPort, wsIn: x.WSIn, wsOut: x.WSOut, flags: x.Flags, winUnit: x.WinUnit,
		}
	}
	f.lastSeen = s.LastSeen
	if s.RST {
		f.closed = flowRST
	}
	for d, r := range s.Relearn {
		if r {
			f.closed |= flowRelearn << d
		}
		if s.StripECN[d] {
			f.closed |= flowStripECN << d
		}
	}
	return f
}
