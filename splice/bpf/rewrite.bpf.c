//go:build ignore

// rewrite.bpf.c: the kernel datapath of package splice. A tc/tcx ingress
// program that rewrites the packets of an established spliced flow
// exactly as splice.Flow.Rewrite does (with a complete checksum), from
// per-flow state that user space writes into two maps:
//
//   splice_tuples  4-tuple of an arriving packet -> flow id, direction,
//                  output addresses (constant while the flow lives),
//                  and whether to pass payload on (a watched flow)
//   splice_flows   flow id -> both directions' rewrite parameters and
//                  tracking state, under a bpf_spin_lock
//
// Everything it cannot handle exactly it leaves alone: it returns
// TCX_NEXT without touching the packet and without the rewritten mark, so
// the nft divert rule queues it to the Go engine. Rewritten packets get
// rewritten_mark ORed into skb->mark; packets the engine would drop are
// dropped here with the same verdict (counted per verdict and CPU).
//
// Checksums are updated incrementally only (bpf_l4_csum_replace,
// bpf_l3_csum_replace), never recomputed: veth hands GSO skbs with
// CHECKSUM_PARTIAL to tc ingress, whose check field holds only the
// pseudo-header sum. The whole TCP header is read into a buffer, edited
// there, and the checksum delta is bpf_csum_diff over the header from its
// (even) start: a field at an odd offset inside the options, such as a
// timestamp after a single NOP, is then summed in the right byte lane
// without rotating deltas by hand.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Not in Debian 12's uapi headers.
#define TCX_NEXT -1
#define TCX_DROP 2

#define AF_INET 2
#define AF_INET6 10

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define IPV6_HOPOPTS 0
#define IPV6_DSTOPTS 60
#define MAX_EXT 4 // IPv6 extension headers walked

#define FLAG_FIN 0x01
#define FLAG_SYN 0x02
#define FLAG_RST 0x04
#define FLAG_ACK 0x10
#define FLAG_URG 0x20

#define OPT_EOL 0
#define OPT_NOP 1
#define OPT_SACK 5
#define OPT_TS 8

// Per-direction flag bits, the same as package splice's dirState.flags.
#define DIR_TS (1 << 0)
#define DIR_TS_LEARNED (1 << 1)
#define DIR_STRIP_TS (1 << 2)
#define DIR_STRIP_SACK (1 << 3)
#define DIR_ADDRS (1 << 4)
#define DIR_FIN (1 << 5)
#define DIR_FIN_ACKED (1 << 6)
#define DIR_DUP_DROPPED (1 << 7)

#define FLOW_RST 1
// FLOW_STRIP_ECN << dir: the direction's sender negotiated ECN and its
// receiver did not (splice's flowStripECN): its packets go Not-ECT, and
// one marked CE goes to the queue, where the engine drops it.
#define FLOW_STRIP_ECN 8
#define ECN_CE 3

// tuple_val.flags: pass packets with payload in this direction to the
// queue (the HTTP proxy watches a spliced flow for the client's next
// request, which must reach the Go side).
#define TUPLE_PASS_DATA 1

#define MIN_WINDOW 66000
#define MAX_WINDOW (0xffffU << 14) // splice's maxWindow
#define FIN_DUP_WINDOW 100000000LL // 100 ms
#define PAWS_TARGET (1LL << 30)
#define MAX_PAWS_JUMP ((1LL << 31) - (1LL << 28))

// Verdicts: 0..8 are splice.Verdict; the program never yields 5..7
// itself (malformed, unsupported and unknown packets are passed).
enum verdict {
	V_FORWARD = 0,
	V_DROP_SYN = 1,
	V_DROP_SEQ = 2,
	V_DROP_ACK = 3,
	V_DROP_RST = 4,
	V_DROP_DUPLICATE = 8,
	V_PASS = 9,  // not handled: passed on untouched, to the queue
	V_ERROR = 10, // a helper failed after the state was updated: dropped
	V_REDIRECT = 11, // forwarded packets sent to their device (redirect)
	V_NUM = 12,
};

// The 4-tuple of an arriving packet, IPv4 addresses IPv4-mapped as in
// splice.Key; ports in network byte order.
struct tuple {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
};

struct tuple_val {
	__u64 flow_id;
	__u32 dir;   // 0 client to server, 1 server to client
	__u32 flags; // TUPLE_* bits
	__u8 out_src[16]; // output addresses, used when DIR_ADDRS is set
	__u8 out_dst[16];
};

// One direction: splice's dirState, field for field. Sequence values are
// in the sender's own space; times in the program's clock (ns).
struct dir_state {
	__u32 seq_off;
	__u32 ts_off;
	__u32 ts_jump;
	__u32 snd_nxt;
	__u32 ack_seen;
	__u32 max_win;
	__u32 last_win;
	__u32 ts_val;
	__u32 ts_ecr;
	__u32 fin_seq;
	__s64 fin_at;
	__u16 src_port; // output ports, host byte order
	__u16 dst_port;
	__u8 ws_in;
	__u8 ws_out;
	__u8 flags;
	__u8 win_unit; // splice's winUnit: 1 once the sender advertised a window of one unit of ws_out
};

struct flow_val {
	struct bpf_spin_lock lock;
	__u32 closed;
	__s64 last_seen;
	struct dir_state d[2];
};

// The flow maps allocate their elements as flows are promoted
// (BPF_F_NO_PREALLOC): preallocated, the two held 33 MB of kernel memory
// from the start, whether one flow was spliced or none (the nfqueue
// datapath's record of spliced flows uses the same maps). Lookups, all the
// program does, cost the same either way.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 131072);
	__type(key, struct tuple);
	__type(value, struct tuple_val);
} splice_tuples SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct flow_val);
} splice_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V_NUM);
	__type(key, __u32);
	__type(value, __u64);
} splice_verdicts SEC(".maps");

// splice_stack_ifaces: interfaces whose rewritten packets go on through
// the stack even with redirect_out. The daemon lists those with a classic
// tc ingress qdisc (ingress or clsact): tcx runs before their filters,
// and a redirect would skip them (an ingress shaper through ifb, as
// OpenWrt's SQM sets up, would never see a spliced flow's packets).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} splice_stack_ifaces SEC(".maps");

// The skb->mark bits set on rewritten packets.
volatile const __u32 rewritten_mark = 0x20000000;
// Tests set fake_clock at load time and then fake_now: the program's clock
// is otherwise bpf_ktime_get_ns, CLOCK_MONOTONIC, the daemon's clock for
// the times it keeps (package monotime), so that no time in the maps needs
// converting.
volatile const __u8 fake_clock = 0;
// redirect_out: send a rewritten packet straight to its egress device
// (see redirect) instead of on through the stack.
volatile const __u8 redirect_out = 0;
volatile __s64 fake_now = 0;

static __always_inline int before(__u32 a, __u32 b) { return (__s32)(a - b) < 0; }
static __always_inline __u32 max_seq(__u32 a, __u32 b) { return before(a, b) ? b : a; }
static __always_inline __u32 max_u32(__u32 a, __u32 b) { return a > b ? a : b; }

// is_v4_mapped reports whether a (16 bytes) is IPv4-mapped (::ffff:0:0/96).
static __always_inline int is_v4_mapped(const __u8 *a)
{
	for (int i = 0; i < 10; i++)
		if (a[i])
			return 0;
	return a[10] == 0xff && a[11] == 0xff;
}

static __always_inline void count(__u32 v)
{
	__u64 *c = bpf_map_lookup_elem(&splice_verdicts, &v);
	if (c)
		*c += 1;
}

// splice's scaleWindow: rounded down, 0 below one unit once the sender
// offered a whole one.
static __always_inline __u16 scale_window(__u16 field, __u8 in, __u8 out, __u8 unit)
{
	if (in == out)
		return field;
	__u64 w = (__u64)field << in;
	__u64 v = w >> out;
	if (v > 0xffff)
		return 0xffff;
	if (v == 0 && w != 0 && !unit)
		return 1;
	return (__u16)v;
}

static __always_inline __u32 paws_jump(__u32 cont)
{
	__s64 j = PAWS_TARGET - (__s64)(__s32)cont;
	if (j < 0)
		j = 0;
	if (j > MAX_PAWS_JUMP)
		j = MAX_PAWS_JUMP;
	return (__u32)j;
}

static __always_inline __u32 map_echo(struct dir_state *o, __u32 ecr)
{
	if (!(o->flags & DIR_TS_LEARNED))
		return 0;
	__u32 e = ecr - o->ts_off;
	if (o->ts_jump > 1 && (__s64)(__s32)(o->ts_val - e) >= (__s64)(o->ts_jump / 2))
		return 0;
	return e;
}

static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline __u32 get32(const __u8 *b)
{
	return ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
}

static __always_inline void put32(__u8 *b, __u32 v)
{
	b[0] = v >> 24;
	b[1] = v >> 16;
	b[2] = v >> 8;
	b[3] = v;
}

#define MAX_TCP_HDR 60
#define BUF 64 // buffers for a TCP header, a power of two for masking
#define MAX_OPTS 15 // options walked; more (or more than 15 NOPs) pass

// What the option walk found, before any state is touched. Offsets are
// into the TCP header; 0 means absent.
struct opts {
	__u32 ts_off;   // the timestamps option (kind 8, length 10)
	__u32 sack_off; // a SACK option of 1 to 4 whole blocks
	__u32 sack_len;
};

// Per-CPU scratch space: the TCP header before and after the rewrite and
// the addresses, for bpf_csum_diff. A map value rather than the stack:
// the option walk and the SACK edges index it with variable offsets.
struct scratch {
	__u8 th[BUF];    // the TCP header as edited
	__u8 old[BUF];   // as received
	__u8 addrs[32];  // addresses as received (v4: 8 bytes)
	__u8 naddrs[32]; // as sent
	__u8 ip[64];     // the IP header as received (off the stack, which is full)
	__u32 l3;        // where the IP header starts (kept here, off the full stack)
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} splice_scratch SEC(".maps");

// The state of the option walk, one bpf_loop step per option (a plain
// loop makes the verifier walk every combination of offsets).
struct walk {
	__u32 i;  // offset of the next option in the TCP header
	__u32 hl; // header length
	__u32 ts_off, sack_off, sack_len; // see struct opts
	__u32 done; // the walk ended (EOL, end of header, bad length)
	__u32 bad;  // a layout the program does not handle
};

static long walk_step(__u32 n, void *ctx)
{
	struct walk *w = ctx;
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&splice_scratch, &zero);
	if (!sc) {
		w->bad = 1;
		return 1;
	}
	__u32 i = w->i, hl = w->hl;
	if (i >= hl || hl > MAX_TCP_HDR) {
		w->done = 1;
		return 1;
	}
	__u8 kind = sc->old[i & 63];
	if (kind == OPT_EOL) {
		w->done = 1;
		return 1;
	}
	if (kind == OPT_NOP) {
		w->i = i + 1;
		return 0;
	}
	if (i + 1 >= hl) {
		w->done = 1;
		return 1;
	}
	__u32 len = sc->old[(i + 1) & 63];
	if (len < 2 || i + len > hl) {
		w->done = 1;
		return 1;
	}
	if (kind == OPT_TS && len == 10) {
		if (w->ts_off) {
			w->bad = 1;
			return 1;
		}
		w->ts_off = i;
	} else if (kind == OPT_SACK && len >= 10 && (len - 2) % 8 == 0) {
		if (w->sack_off) {
			w->bad = 1;
			return 1;
		}
		w->sack_off = i;
		w->sack_len = len;
	}
	w->i = i + len;
	return 0;
}

// walk_options finds the timestamps and SACK options the way
// splice.rewriteOptions walks them (Linux's tcp_parse_options: stop at
// EOL or at a malformed length; options of an unexpected length are left
// alone, and so ignored here). It returns 0 when the layout is one the
// program handles exactly: at most one timestamps option and at most one
// SACK option (the engine rewrites every one; the queue gets the rest),
// and a walk that ends within MAX_OPTS steps.
static __always_inline int walk_options(__u32 hl, struct opts *o)
{
	struct walk w = {.i = 20, .hl = hl};
	bpf_loop(MAX_OPTS, walk_step, &w, 0);
	if (w.bad || !w.done)
		return -1;
	o->ts_off = w.ts_off;
	o->sack_off = w.sack_off;
	o->sack_len = w.sack_len;
	return 0;
}

// The result of the locked part.
struct decision {
	__u32 verdict;
	__u32 seq, ack;   // output values
	__u32 seq_moved;  // how far a pure ACK's sequence number moved (mod 2^32)
	__u16 sport, dport;
	__u16 window;
	__u8 addrs;       // rewrite addresses
	__u8 strip_ts, strip_sack, ts_rewrite;
	__u8 strip_ecn;   // make the packet Not-ECT (FLOW_STRIP_ECN)
	__u32 ts_val, ts_ecr;
	__u32 sack_off; // subtracted from SACK edges
};

static __always_inline void decide(struct flow_val *f, __u32 dir, __u8 flags, __u32 seq, __u32 ack,
				   __u32 seg_len, __u16 window, const struct opts *op, __u32 tsv, __u32 tse,
				   __s64 now, struct decision *dc)
{
	struct dir_state *s, *o;
	if (dir == 0) {
		s = &f->d[0];
		o = &f->d[1];
	} else {
		s = &f->d[1];
		o = &f->d[0];
	}
	if (s->ws_in > 14 || s->ws_out > 14) {
		dc->verdict = V_PASS;
		return;
	}
	__u32 end = seq + seg_len;
	__u32 win = s->max_win > 1 ? s->max_win : 1;
	// A RST at the sender's FIN, its last, one before the rcv_nxt of a
	// receiver that got it: accepted there (splice.dirState.rstAtFIN).
	int rst_at_fin = (s->flags & DIR_FIN) && seq == s->fin_seq && s->ack_seen == seq + 1 && s->snd_nxt == seq + 1;
	if (flags & FLAG_RST) {
		if (!rst_at_fin && !(seq - s->ack_seen < win + 1)) {
			dc->verdict = V_DROP_RST;
			return;
		}
	} else {
		__u32 upper = s->ack_seen + win;
		__u32 lower = s->snd_nxt - max_u32(s->max_win, MIN_WINDOW);
		if (before(upper, seq) || before(end, lower)) {
			dc->verdict = V_DROP_SEQ;
			return;
		}
	}
	__u32 ack_in = 0;
	if (!(flags & (FLAG_ACK | FLAG_RST))) {
		// Dropped unread by a synchronized receiver (RFC 9293 3.10.7.4),
		// and easy to forge (splice.Flow.Rewrite).
		dc->verdict = V_DROP_ACK;
		return;
	}
	if (flags & FLAG_ACK) {
		ack_in = ack - o->seq_off;
		if (before(o->snd_nxt, ack_in) || before(ack_in, o->ack_seen - max_u32(o->max_win, MIN_WINDOW))) {
			dc->verdict = V_DROP_ACK;
			return;
		}
	}

	// spuriousEnd (a RST is never a retransmission)
	int finished = (f->closed & FLOW_RST) || ((f->d[0].flags & DIR_FIN_ACKED) && (f->d[1].flags & DIR_FIN_ACKED));
	if (seg_len == 0) {
		__s64 fin_at = s->fin_at > o->fin_at ? s->fin_at : o->fin_at;
		if ((flags & (FLAG_ACK | FLAG_RST)) == FLAG_ACK && finished && !before(o->ack_seen, ack_in) &&
		    now - fin_at < FIN_DUP_WINDOW) {
			dc->verdict = V_DROP_DUPLICATE;
			return;
		}
	} else if (!(flags & FLAG_RST)) {
		if ((flags & FLAG_FIN) && (s->flags & DIR_FIN) && (__s32)(end - s->snd_nxt) <= 0 &&
		    now - s->fin_at < FIN_DUP_WINDOW) {
			dc->verdict = V_DROP_DUPLICATE;
			return;
		}
		if (finished && (__s32)(end - s->ack_seen) <= 0 && !(s->flags & DIR_DUP_DROPPED)) {
			s->flags |= DIR_DUP_DROPPED;
			dc->verdict = V_DROP_DUPLICATE;
			return;
		}
	}
	int raise_seq = seg_len == 0 && !(flags & FLAG_RST) && before(seq, s->ack_seen) && seq != s->ack_seen - 1;
	// A pure ACK from beyond the data forwarded goes back to its end
	// (splice.Flow.Rewrite: a receiver takes the window only from a
	// segment at or after the one that last set it).
	int lower_seq = seg_len == 0 && !(flags & FLAG_RST) && before(s->snd_nxt, seq);

	// Committed. Only a RST at the receiver's rcv_nxt ends the flow, and
	// nothing else of a RST is tracked: the receiver takes nothing from
	// one, and a RST needs only a sequence number in the window to pass
	// (splice.Flow.Rewrite).
	if (seg_len > 0 && !(flags & FLAG_RST)) {
		// A segment ending beyond the window grows the receiver's
		// largest window by the excess (splice.Flow.Rewrite, after
		// conntrack's td_maxwin), so that its end cannot raise the lower
		// bound above what the receiver still waits for; up to the
		// largest window there is, no further: beyond it the checks
		// turn over, and what lies beyond is sent to nobody.
		__u32 top = s->ack_seen + win;
		__u32 sent = end;
		if (before(top, end)) {
			if (s->max_win <= MAX_WINDOW && end - top <= MAX_WINDOW - s->max_win) {
				s->max_win += end - top;
			} else {
				s->max_win = max_u32(s->max_win, MAX_WINDOW);
				sent = s->ack_seen + s->max_win;
			}
		}
		s->snd_nxt = max_seq(s->snd_nxt, sent);
	}
	// A FIN at or before what the receiver acknowledged is none
	// (splice.Flow.Rewrite: the receiver drops it unread).
	if ((flags & (FLAG_FIN | FLAG_RST)) == FLAG_FIN && !(s->flags & DIR_FIN) && before(s->ack_seen, end)) {
		s->flags |= DIR_FIN;
		s->fin_seq = end - 1;
		s->fin_at = now;
	}
	if ((flags & (FLAG_ACK | FLAG_RST)) == FLAG_ACK) {
		o->ack_seen = max_seq(o->ack_seen, ack_in);
		if ((o->flags & (DIR_FIN | DIR_FIN_ACKED)) == DIR_FIN && before(o->fin_seq, ack_in)) {
			o->flags |= DIR_FIN_ACKED;
			o->fin_at = now; // see splice.Flow.spuriousEnd
		}
	}
	if ((flags & FLAG_RST) && (seq == s->snd_nxt || seq == s->ack_seen || rst_at_fin))
		f->closed |= FLOW_RST;
	if (!(flags & FLAG_RST)) {
		__u32 w = (__u32)window << s->ws_in;
		s->last_win = w;
		o->max_win = max_u32(o->max_win, w);
		if (w >> s->ws_out)
			s->win_unit = 1;
	}
	f->last_seen = now;

	dc->sport = s->src_port;
	dc->dport = s->dst_port;
	__u32 seq_in = seq;
	if (raise_seq)
		seq = s->ack_seen;
	if (lower_seq)
		seq = s->snd_nxt;
	dc->seq_moved = seq - seq_in;
	dc->seq = seq + s->seq_off;
	dc->ack = ack;
	if (flags & FLAG_ACK)
		dc->ack = ack - o->seq_off;
	dc->window = scale_window(window, s->ws_in, s->ws_out, s->win_unit);
	dc->sack_off = o->seq_off;
	dc->strip_sack = (s->flags & DIR_STRIP_SACK) != 0;
	if (op->ts_off) {
		if (!(flags & FLAG_RST)) {
			s->ts_val = tsv;
			s->ts_ecr = tse;
		}
		if (s->flags & DIR_STRIP_TS) {
			dc->strip_ts = 1;
		} else if ((s->flags & (DIR_TS | DIR_TS_LEARNED)) == DIR_TS && (flags & FLAG_RST)) {
			// A RST teaches no offset: with none to translate them by,
			// its timestamps go (splice's rewriteTimestamps).
			dc->strip_ts = 1;
		} else if (s->flags & DIR_TS) {
			if (!(s->flags & DIR_TS_LEARNED)) {
				s->ts_off -= tsv;
				s->ts_jump = paws_jump(s->ts_off);
				s->ts_off += s->ts_jump;
				s->flags |= DIR_TS_LEARNED;
			}
			dc->ts_rewrite = 1;
			dc->ts_val = tsv + s->ts_off;
			dc->ts_ecr = map_echo(o, tse);
		}
	}
	dc->addrs = (s->flags & DIR_ADDRS) != 0;
	dc->strip_ecn = (f->closed & (FLOW_STRIP_ECN << dir)) != 0;
	dc->verdict = V_FORWARD;
}

// routes_back reports whether the FIB routes the packet's source (as
// received: ip is its IP header) back through the device it came in on,
// the check of strict reverse path filtering. The stack's input path
// applies net.ipv4.conf.*.rp_filter; a redirect skips that path, so a
// packet that fails the check (its source spoofed from another side of
// the gateway, or an asymmetric route) goes on through the stack, where
// the operator's rp_filter decides as for any forwarded packet.
static __always_inline int routes_back(struct __sk_buff *skb, int v6, const __u8 *ip, __u32 iif)
{
	struct bpf_fib_lookup r = {};
	r.l4_protocol = IPPROTO_TCP;
	r.ifindex = iif;
	if (v6) {
		r.family = AF_INET6;
		__builtin_memcpy(r.ipv6_src, &ip[24], 16);
		__builtin_memcpy(r.ipv6_dst, &ip[8], 16);
	} else {
		r.family = AF_INET;
		r.tos = ip[1];
		__builtin_memcpy(&r.ipv4_src, &ip[16], 4);
		__builtin_memcpy(&r.ipv4_dst, &ip[12], 4);
	}
	return bpf_fib_lookup(skb, &r, sizeof(r), BPF_FIB_LOOKUP_SKIP_NEIGH) == BPF_FIB_LKUP_RET_SUCCESS &&
	       r.ifindex == iif;
}

// redirect sends a rewritten packet to the device the FIB gives its
// destination, through the neighbour subsystem (bpf_redirect_neigh: it
// resolves and confirms the next hop's address as the stack would): the
// stack's forwarding (netfilter's hooks, the routing decision per
// packet) is skipped, as a spliced flow's packets need none of it (the
// divert chain exempts them from conntrack already). Egress qdiscs still
// apply. It does what the stack's forwarding would do to the packet:
// the TTL (hop limit) goes down by one. Anything it would not forward
// the same way goes on through the stack, which handles it: a TTL that
// runs out here (the stack answers ICMP time exceeded), IPv4 options
// (the stack updates some of them), and what the FIB lookup does not
// resolve to a forwarding route (a local destination, forwarding off on
// the device the packet came in on, a packet too big for its egress
// device, a kernel that does not know the lookup's flags).
//
// ip is the IP header as received (its first bytes give the TOS or flow
// label, the TTL or hop limit), addrs the addresses as sent (source then
// destination: 4 bytes each for IPv4, 16 for IPv6): what the rewrite
// already holds, so the packet is not read again. hdrs is the length of
// the IP and TCP headers with their options and extensions.
static __always_inline int redirect(struct __sk_buff *skb, int v6, const __u8 *ip, const __u8 *addrs, __u16 sport, __u16 dport, __u32 hdrs)
{
	__u8 ttl = v6 ? ip[7] : ip[8];
	if (ttl <= 1 || (!v6 && ip[0] != 0x45))
		return TCX_NEXT;
	// Read once: the verifier refuses a context pointer the compiler
	// kept and dereferenced again.
	__u32 iif = skb->ingress_ifindex;
	if (!routes_back(skb, v6, ip, iif))
		return TCX_NEXT;
	struct bpf_fib_lookup p = {};
	p.l4_protocol = IPPROTO_TCP;
	p.sport = bpf_htons(sport);
	p.dport = bpf_htons(dport);
	p.ifindex = iif;
	if (v6) {
		p.family = AF_INET6;
		__builtin_memcpy(&p.flowinfo, ip, 4);
		p.flowinfo &= bpf_htonl(0x0fffffff);
		__builtin_memcpy(p.ipv6_src, addrs, 16);
		__builtin_memcpy(p.ipv6_dst, &addrs[16], 16);
	} else {
		p.family = AF_INET;
		p.tos = ip[1];
		__builtin_memcpy(&p.ipv4_src, addrs, 4);
		__builtin_memcpy(&p.ipv4_dst, &addrs[4], 4);
	}
	// The MTU check, against the route's MTU, by the packet's IP length
	// or, for a GSO skb (GRO merged it, or a local sender's TSO), the
	// length of its segments; one too big goes to the stack, whose
	// forwarding checks each segment and sends the sender the path MTU
	// error (which the queue's reader translates). With tot_len 0 the
	// kernel would check the skb against the egress device
	// (is_skb_forwardable), which lets every GSO skb pass whatever its
	// segments (too big for the route, they would be lost beyond the
	// device, and nobody would tell the sender), and counts the ingress
	// Ethernet header against the egress device's own link-layer header
	// and 4 bytes of slack: a packet up to 4 bytes too long for an
	// Ethernet device passed, and one 10 bytes shorter than the MTU of a
	// device without a link-layer header (a tun device) did not.
	// The IP length, from the header as received (the program checked it
	// against the skb's).
	if (skb->gso_size)
		p.tot_len = hdrs + skb->gso_size;
	else if (v6)
		p.tot_len = 40 + ((__u16)ip[4] << 8 | ip[5]);
	else
		p.tot_len = (__u16)ip[2] << 8 | ip[3];
	if (bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS)
		return TCX_NEXT;
	__u8 left = ttl - 1;
	if (v6) {
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 7, &left, 1, 0))
			return TCX_NEXT;
	} else {
		// The header checksum covers the TTL with the protocol in one
		// 16-bit word.
		__be16 from = bpf_htons((__u16)ttl << 8 | IPPROTO_TCP);
		__be16 to = bpf_htons((__u16)left << 8 | IPPROTO_TCP);
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 8, &left, 1, 0))
			return TCX_NEXT;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, from, to, 2)) {
			// The header would go out with a wrong checksum; the
			// sender retransmits the packet.
			count(V_ERROR);
			return TCX_DROP;
		}
	}
	// The lookup left the next hop in the destination fields.
	struct bpf_redir_neigh nh = {.nh_family = p.family};
	if (p.family == AF_INET6)
		__builtin_memcpy(nh.ipv6_nh, p.ipv6_dst, 16);
	else
		nh.ipv4_nh = p.ipv4_dst;
	count(V_REDIRECT);
	return bpf_redirect_neigh(p.ifindex, &nh, sizeof(nh), 0);
}

SEC("tc")
int splice_rewrite(struct __sk_buff *skb)
{
	__u32 proto = skb->protocol;
	struct tuple key = {};
	__be16 ethertype;

	// A packet this program rewrote already, met again at another
	// interface's ingress: a bridge's, after its port's (with
	// bpf_forward: stack the port passes it up the stack, and the bridge
	// delivers it to itself). A transparent flow's packet keeps its
	// tuple, the client leg's, and would be rewritten twice (its offsets
	// added again). Not counted again: its first verdict was.
	if (skb->mark & rewritten_mark)
		return TCX_NEXT;

	// Where the IP header starts: the skb's network header, which the
	// stack set before tc ingress (skb->data is the MAC header there,
	// mac_len before the network header). On Ethernet devices (veth
	// included) it is at ETH_HLEN, after an EtherType that is the skb's
	// protocol (VLAN tags the device did not strip pass); on a device
	// without a link-layer header (tun, WireGuard, PPP, an IP tunnel) at
	// 0. Anything else (a header of another length) passes. The first
	// bytes at the network header are compared with those at each offset:
	// exact for Ethernet frames; a header-less packet taken for one would
	// need its bytes 14-17 to repeat its bytes 0-3 and its bytes 12-13 to
	// spell its protocol's EtherType (it then matches no flow and passes).
	__u32 l3, l4, ip_end, addr_off;
	// key's port and first destination bytes hold the two readings (set
	// again below).
	if (bpf_skb_load_bytes_relative(skb, 0, &key.sport, 4, BPF_HDR_START_NET))
		goto pass;
	if (!bpf_skb_load_bytes(skb, ETH_HLEN, key.dst, 4) && !__builtin_memcmp(key.dst, &key.sport, 4)) {
		if (bpf_skb_load_bytes(skb, 12, &ethertype, 2) || ethertype != proto)
			goto pass;
		l3 = ETH_HLEN;
	} else if (!bpf_skb_load_bytes(skb, 0, key.dst, 4) && !__builtin_memcmp(key.dst, &key.sport, 4)) {
		l3 = 0;
	} else {
		goto pass;
	}
	__builtin_memset(key.dst, 0, 4);
	int v6;
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&splice_scratch, &zero);
	if (!sc)
		goto pass;
	__u8 *ip = sc->ip;

	if (proto == bpf_htons(ETH_P_IP)) {
		v6 = 0;
		if (bpf_skb_load_bytes(skb, l3, ip, 20))
			goto pass;
		__u32 ihl = (ip[0] & 0x0f) * 4;
		__u32 tot = ((__u32)ip[2] << 8) | ip[3];
		if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl || l3 + tot > skb->len)
			goto pass;
		// Fragments and non-TCP: the engine does not rewrite them.
		if (ip[9] != IPPROTO_TCP || (((__u32)ip[6] << 8 | ip[7]) & 0x3fff))
			goto pass;
		if (ihl > 60)
			goto pass;
		l4 = l3 + ihl;
		ip_end = l3 + tot;
		addr_off = l3 + 12;
		key.src[10] = 0xff;
		key.src[11] = 0xff;
		key.dst[10] = 0xff;
		key.dst[11] = 0xff;
		__builtin_memcpy(&key.src[12], &ip[12], 4);
		__builtin_memcpy(&key.dst[12], &ip[16], 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		v6 = 1;
		if (bpf_skb_load_bytes(skb, l3, ip, 40))
			goto pass;
		__u32 plen = ((__u32)ip[4] << 8) | ip[5];
		// Jumbograms and packets longer than the skb: the engine's.
		if ((ip[0] >> 4) != 6 || plen == 0 || l3 + 40 + plen > skb->len)
			goto pass;
		// An IPv4-mapped address: the key would be the IPv4 flow's
		// between those addresses, which the packet is not (the
		// engine does not parse it; the stack drops it).
		if (is_v4_mapped(&ip[8]) || is_v4_mapped(&ip[24]))
			goto pass;
		l4 = l3 + 40;
		ip_end = l4 + plen;
		// Hop-by-hop and destination options headers, as the engine
		// walks them (up to MAX_EXT). Anything else, a routing header
		// included (its final destination would enter the TCP
		// pseudo-header), goes to the queue.
		__u8 next = ip[6];
		for (int k = 0; k < MAX_EXT; k++) {
			if (next == IPPROTO_TCP)
				break;
			if (next != IPV6_HOPOPTS && next != IPV6_DSTOPTS)
				goto pass;
			__u8 eh[2];
			if (l4 + 8 > ip_end || bpf_skb_load_bytes(skb, l4, eh, 2))
				goto pass;
			next = eh[0];
			l4 += 8 + (__u32)eh[1] * 8;
			if (l4 > ip_end)
				goto pass;
		}
		if (next != IPPROTO_TCP)
			goto pass;
		addr_off = l3 + 8;
		__builtin_memcpy(key.src, &ip[8], 16);
		__builtin_memcpy(key.dst, &ip[24], 16);
	} else {
		goto pass;
	}
	if (ip_end - l4 < 20)
		goto pass;

	// The flow first: most packets belong to no spliced flow, and
	// everything below that leads to a pass anyway costs them nothing.
	__u8 hdr[20];
	if (bpf_skb_load_bytes(skb, l4, hdr, 20))
		goto pass;
	__builtin_memcpy(&key.sport, &hdr[0], 2);
	__builtin_memcpy(&key.dport, &hdr[2], 2);
	struct tuple_val *tv = bpf_map_lookup_elem(&splice_tuples, &key);
	if (!tv)
		goto pass;

	if (!v6) {
		// A bad header checksum: the Go engine recomputes it when it
		// rewrites addresses, the incremental update here would not.
		__u32 ihl = l4 - l3; // at most 60 (checked above); the verifier needs the bound here
		if (ihl > 60 || bpf_skb_load_bytes(skb, l3, ip, ihl))
			goto pass;
		__s64 hs = bpf_csum_diff(0, 0, (__be32 *)ip, ihl, 0);
		if (hs < 0 || fold(hs) != 0xffff)
			goto pass;
	}
	sc->l3 = l3;
	__u32 hl = (hdr[12] >> 4) * 4;
	if (hl < 20 || hl > ip_end - l4)
		goto pass;
	if (bpf_skb_load_bytes(skb, l4, sc->old, hl & 63))
		goto pass;

	__u64 id = tv->flow_id;
	__u32 dir = tv->dir;
	if (dir > 1)
		goto pass;
	struct flow_val *f = bpf_map_lookup_elem(&splice_flows, &id);
	if (!f)
		goto pass;

	__u8 flags = hdr[13];
	// The engine drops a SYN before it looks at anything else.
	if (flags & FLAG_SYN) {
		count(V_DROP_SYN);
		return TCX_DROP;
	}
	__u32 seq = get32(&hdr[4]);
	__u32 ack = get32(&hdr[8]);
	__u16 window = (__u16)hdr[14] << 8 | hdr[15];
	__u32 seg_len = ip_end - l4 - hl;
	if (seg_len && (tv->flags & TUPLE_PASS_DATA))
		goto pass;
	// The bit is set when the flow is written, never changed by the
	// program: read without the lock.
	if ((f->closed & (FLOW_STRIP_ECN << dir)) && (v6 ? ip[1] >> 4 : ip[1]) % 4 == ECN_CE)
		goto pass; // rare: the engine drops it (splice.DropCE)
	if (flags & FLAG_FIN)
		seg_len++;

	struct opts op = {};
	if (walk_options(hl, &op))
		goto pass;
	__u32 tsv = 0, tse = 0;
	if (op.ts_off) {
		__u32 t = op.ts_off & 63;
		if (t > MAX_TCP_HDR - 10)
			goto pass;
		tsv = get32(&sc->old[t + 2]);
		tse = get32(&sc->old[t + 6]);
	}

	struct decision dc = {};
	__s64 now = fake_clock ? fake_now : (__s64)bpf_ktime_get_ns();
	bpf_spin_lock(&f->lock);
	decide(f, dir, flags, seq, ack, seg_len, window, &op, tsv, tse, now, &dc);
	bpf_spin_unlock(&f->lock);
	if (dc.verdict == V_PASS)
		goto pass;
	if (dc.verdict != V_FORWARD) {
		count(dc.verdict);
		return TCX_DROP;
	}

	// Build the new header in sc->th.
	__builtin_memcpy(sc->th, sc->old, BUF);
	sc->th[0] = dc.sport >> 8;
	sc->th[1] = dc.sport;
	sc->th[2] = dc.dport >> 8;
	sc->th[3] = dc.dport;
	put32(&sc->th[4], dc.seq);
	put32(&sc->th[8], dc.ack);
	sc->th[14] = dc.window >> 8;
	sc->th[15] = dc.window;
	if ((flags & FLAG_URG) && dc.seq_moved) {
		// The urgent point stays at its byte (splice.TCP.MoveUrgent).
		__u32 ptr = ((__u32)sc->th[18] << 8 | sc->th[19]) - dc.seq_moved;
		if ((__s32)ptr <= 0 || ptr > 0xffff) {
			sc->th[13] = flags & ~FLAG_URG;
			ptr = 0;
		}
		sc->th[18] = ptr >> 8;
		sc->th[19] = ptr;
	}
	if (op.ts_off) {
		__u32 t = op.ts_off & 63;
		if (t > MAX_TCP_HDR - 10)
			goto pass; // unreachable: checked above
		if (dc.strip_ts) {
			for (int k = 0; k < 10; k++)
				sc->th[t + k] = OPT_NOP;
		} else if (dc.ts_rewrite) {
			put32(&sc->th[t + 2], dc.ts_val);
			put32(&sc->th[t + 6], dc.ts_ecr);
		}
	}
	if (op.sack_off) {
		__u32 so = op.sack_off;
		__u32 sl = op.sack_len;
		// so + sl <= hl <= 60: every index below stays inside th.
		if (dc.strip_sack) {
			for (__u32 k = 0; k < 40; k++) {
				if (k >= sl)
					break;
				sc->th[(so + k) & 63] = OPT_NOP;
			}
		} else {
			for (__u32 b = 2; b < 40; b += 4) {
				if (b >= sl)
					break;
				__u32 x = (so + b) & 63;
				if (x > MAX_TCP_HDR - 4)
					break;
				put32(&sc->th[x], get32(&sc->th[x]) - dc.sack_off);
			}
		}
	}

	// Store the header (with the old checksum field) and fix the
	// checksum by the header's delta: no pseudo-header field changed.
	__u32 csum_off = l4 + 16;
	__s64 diff = bpf_csum_diff((__be32 *)sc->old, hl & 63, (__be32 *)sc->th, hl & 63, 0);
	if (diff < 0)
		goto fail;
	if (bpf_skb_store_bytes(skb, l4, sc->th, hl & 63, 0))
		goto fail;
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, 0))
		goto fail;
	if (dc.addrs) {
		if (v6) {
			__builtin_memcpy(sc->addrs, &ip[8], 32);
			__builtin_memcpy(sc->naddrs, tv->out_src, 16);
			__builtin_memcpy(&sc->naddrs[16], tv->out_dst, 16);
		} else {
			__builtin_memcpy(sc->addrs, &ip[12], 8);
			__builtin_memcpy(sc->naddrs, &tv->out_src[12], 4);
			__builtin_memcpy(&sc->naddrs[4], &tv->out_dst[12], 4);
		}
		__u32 n = v6 ? 32 : 8;
		diff = bpf_csum_diff((__be32 *)sc->addrs, n, (__be32 *)sc->naddrs, n, 0);
		if (diff < 0)
			goto fail;
		if (bpf_skb_store_bytes(skb, addr_off, sc->naddrs, n, 0))
			goto fail;
		if (!v6 && bpf_l3_csum_replace(skb, l3 + 10, 0, diff, 0))
			goto fail;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | (v6 ? BPF_F_IPV6 : 0)))
			goto fail;
	}
	if (dc.strip_ecn && (v6 ? ip[1] >> 4 : ip[1]) % 4) {
		// Not-ECT; the IPv4 header checksum by the change of its first
		// word (in memory order), as the engine's clearECN. sc->old is
		// free again: the TCP checksum's delta is taken.
		sc->old[0] = v6 ? ip[1] & ~0x30 : ip[1] & ~3;
		if (bpf_skb_store_bytes(skb, sc->l3 + 1, sc->old, 1, 0))
			goto fail;
		if (!v6 && bpf_l3_csum_replace(skb, sc->l3 + 10, ip[0] | (__u32)ip[1] << 8, ip[0] | (__u32)sc->old[0] << 8, 2))
			goto fail;
	}
	skb->mark |= rewritten_mark;
	count(V_FORWARD);
	// bpf_redirect_neigh sends only what has an Ethernet header to
	// replace: a packet without one goes on through the stack.
	__u32 in = skb->ifindex;
	if (redirect_out && sc->l3 == ETH_HLEN && !bpf_map_lookup_elem(&splice_stack_ifaces, &in)) {
		const __u8 *out = dc.addrs ? sc->naddrs : (v6 ? &ip[8] : &ip[12]);
		return redirect(skb, v6, ip, out, dc.sport, dc.dport, l4 - l3 + hl);
	}
	return TCX_NEXT;

fail:
	// The flow's state has moved on but the packet is not rewritten:
	// it must not go out. The sender retransmits it.
	count(V_ERROR);
	return TCX_DROP;

pass:
	count(V_PASS);
	return TCX_NEXT;
}

char __license[] SEC("license") = "GPL";
