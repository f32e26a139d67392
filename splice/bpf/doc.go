// Package bpf is the kernel datapath of package splice: a BPF program for
// tc/tcx ingress (rewrite.bpf.c, built with bpf2go) that rewrites the
// packets of an established spliced flow exactly as splice.Flow.Rewrite
// does with a complete checksum, from per-flow state the daemon writes
// into BPF maps, and the Go side that loads it and converts a flow's state
// between the engine's splice.State and the maps' layout (the promotion
// and demotion of a flow between the two engines).
//
// The maps: splice_tuples takes the 4-tuple of an arriving packet to its
// flow id, direction and output addresses; splice_flows holds both
// directions' rewrite parameters and tracking state under a bpf_spin_lock,
// taken for the checks and every state change of one packet;
// splice_verdicts counts packets per verdict and CPU.
//
// The program handles what it can prove equal to the engine and leaves
// everything else alone: a packet of no flow, not IPv4 or IPv6 in an
// Ethernet frame or at the start of a packet of a device without a
// link-layer header (a tun device, WireGuard, PPP, an IP tunnel: found by
// the skb's network header; the program leaves what it rewrites there to
// the stack, as bpf_redirect_neigh has no link-layer header to replace),
// an IPv4 fragment or one with a bad header checksum, an
// IPv6 packet with extension headers other than hop-by-hop and
// destination options (or more than four), a TCP header with more than
// one timestamps or SACK option or an option walk longer than 15 steps,
// and
// the client's packets with payload on a watched flow (SetWatch) are
// returned with TCX_NEXT untouched and unmarked, for the divert rule to
// queue them to the Go engine. What it rewrote carries the mark bits of
// Options.Mark. What the engine would drop (SYN, out of window, ack of
// unsent data, RST out of window, duplicates at the end of a flow) it
// drops.
//
// PutFlow promotes a flow (writes its state and tuples), Demote takes it
// back (removes the tuples, waits out the program runs that may still
// hold them, returns the state); Attach attaches it at tcx ingress. With
// Options.PinDir (a bpffs directory) the maps and links are pinned and
// outlive the process: the kernel keeps rewriting the flows, and the next
// Load reuses the maps, Attach moves the links to the new program, and
// PinnedFlows lists the flows to adopt; RemovePins ends it (pin.go).
// The gateway promotes, demotes and adopts flows (gateway/datapath.go,
// gateway/adopt.go). Not yet: per-flow statistics. The differential
// tests (run as root) feed the same packets, flow state and time to the
// program, through BPF_PROG_TEST_RUN, and to the engine.
package bpf

// The program is built for little-endian machines only (bpf2go -target
// bpfel): on big-endian ones, and off Linux, the package is empty.
//
// The objects are committed: `go build` needs no clang. `make generate`
// rebuilds them (it adds the multiarch include directory that Debian's
// uapi headers need through BPF2GO_CFLAGS); `make generate-check` proves
// that the committed ones match the source.
//
//go:generate go tool bpf2go -target bpfel -tags linux rewrite rewrite.bpf.c -- -mcpu=v3 -Wall -Werror
