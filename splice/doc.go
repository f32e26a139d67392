// Package splice is the FWD engine of connection splicing (paper sections
// 3.2, 3.5 and 3.7): given the parameters of the gateway's two TCP
// connections captured at splice time, it rewrites every packet of one
// connection so that it continues the other, and keeps the little state
// that takes.
//
// Per packet and direction it changes ports (and addresses in NAT mode),
// adds the sequence offset, subtracts the other direction's offset from the
// ack and SACK blocks (like the kernel's nf_conntrack_seqadj.c), translates
// timestamps (TSval offset learned from the first packet, TSecr mapped
// back with the other direction's), rescales the window between the two
// legs' window scales, replaces options the receiving leg never negotiated
// with NOPs, and fixes the checksums: RFC 1624 incremental updates for
// packets whose checksum is complete, a full computation for
// CHECKSUM_PARTIAL packets from NFQUEUE.
//
// It also guards the flow (paper 3.7): SYNs are dropped, segments outside
// the window and acks of unsent data are dropped, a RST passes only in
// window, and a packet that fails a check changes no state.
//
// The package does no I/O. Parsing and rewriting allocate nothing; the
// per-flow state (Flow) is fixed-size, pointer-free and under 128 bytes for
// both directions. The Table maps both directions' 4-tuples to a flow.
//
// Header views (IPv4, IPv6, TCP) are byte slices with named offsets:
// Packet.Parse validates once, the accessors then index without checks of
// their own.
package splice
