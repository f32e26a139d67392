// Package api is spliced's control API: JSON over HTTP on a Unix socket,
// versioned under /v1. These types are the documented wire format; the
// daemon serves them and splicectl decodes them (`splicectl -j` prints
// them as they are).
//
//	GET  /v1/status                 Status
//	GET  /v1/flows?proxy=&state=&addr=&port=   []Flow
//	GET  /v1/flows/{id}             Flow
//	POST /v1/flows/{id}/splice      Flow (after the splice)
//	POST /v1/flows/{id}/unsplice    Flow
//	GET  /v1/ruleset                Ruleset
//	GET  /v1/events                 a stream of Event, one JSON object per line
//
// Errors are an Error object with the HTTP status.
package api

import "time"

// Version is the API version, the first element of every path.
const Version = "v1"

// DefaultSocket is where the daemon listens unless configured otherwise.
const DefaultSocket = "/run/spliced/spliced.sock"

// Status is the daemon at a glance.
type Status struct {
	Version    string    `json:"version"`     // spliced's version
	Started    time.Time `json:"started"`     // when the daemon started
	UptimeSec  float64   `json:"uptime_sec"`  // seconds since Started
	ConfigFile string    `json:"config_file"` // the configuration in force
	Table      string    `json:"table"`       // "inet spliced"
	Services   []string  `json:"services"`
	// Flows counts flows by state: proxied, splicing, spliced, closing.
	Flows map[string]int `json:"flows"`
	// Engines: the plain forwarder (always) and the splice engine (when a
	// service splices).
	Engines []Engine `json:"engines"`
	// Reloads and drift repairs since the start.
	Reloads int `json:"reloads"`
	Repairs int `json:"repairs"`
	// Warnings are problems for the operator to fix, such as a
	// firewall chain that drops spliced flows' packets.
	Warnings []string `json:"warnings,omitempty"`
}

// Engine is one way of moving a flow's bytes.
type Engine struct {
	Name string `json:"name"` // "proxy" or "splice"
	// Bytes and packets it moved, client to server and back (the proxy
	// counts no packets).
	BytesC2S   uint64 `json:"bytes_c2s"`
	BytesS2C   uint64 `json:"bytes_s2c"`
	PacketsC2S uint64 `json:"packets_c2s,omitempty"`
	PacketsS2C uint64 `json:"packets_s2c,omitempty"`
	// Splice engine only.
	Splices        uint64            `json:"splices,omitempty"`
	SpliceAborts   uint64            `json:"splice_aborts,omitempty"`
	SpliceP50Us    int64             `json:"splice_p50_us,omitempty"`
	SpliceP99Us    int64             `json:"splice_p99_us,omitempty"`
	Verdicts       map[string]uint64 `json:"verdicts,omitempty"` // packets per engine verdict
	Queues         []Queue           `json:"queues,omitempty"`
	QueueBackend   string            `json:"queue_backend,omitempty"` // lean or go-nfqueue
	InjectFailures uint64            `json:"inject_failures,omitempty"`
	// InjectedGSO counts packets taken over during splices that were
	// sent whole, as GSO packets, instead of in segments.
	InjectedGSO uint64 `json:"injected_gso,omitempty"`
	// StalledFlows counts directions of spliced flows that stalled (see
	// splice.stall_after).
	StalledFlows uint64 `json:"stalled_flows,omitempty"`
	// HeldDropped counts a client's new data dropped during unsplices
	// beyond what one transition holds (TCP sends it again).
	HeldDropped uint64 `json:"held_dropped,omitempty"`
	// Datapath of new spliced flows: nfqueue or bpf. With bpf: the
	// interfaces the program is attached to, its packet counts by verdict
	// (over every flow; "pass": left to the queue), and the flows moved
	// to it and back.
	Datapath        string            `json:"datapath,omitempty"`
	BPFInterfaces   []string          `json:"bpf_interfaces,omitempty"`
	BPFVerdicts     map[string]uint64 `json:"bpf_verdicts,omitempty"`
	BPFPromotions   uint64            `json:"bpf_promotions,omitempty"`
	BPFPromoteFails uint64            `json:"bpf_promote_failures,omitempty"`
	// BPFPromoteSkipped: splices not promoted because an unsplice of the
	// flow began first (the HTTP proxy's next request).
	BPFPromoteSkipped uint64 `json:"bpf_promote_skipped,omitempty"`
	BPFDemotions      uint64 `json:"bpf_demotions,omitempty"`
	BPFStragglers     uint64 `json:"bpf_stragglers,omitempty"`
	// DivertByCommand and DivertByNetlink: splices whose divert entries
	// went in from the packet path (command packets) and through a
	// netlink transaction (commands off, or one not taken).
	DivertByCommand uint64 `json:"divert_by_command,omitempty"`
	DivertByNetlink uint64 `json:"divert_by_netlink,omitempty"`
	// PMTUErrors: ICMP path MTU errors about spliced flows by result:
	// translated (sent on to the sender of the segment they quote, in its
	// terms), no_flow (sent on as they came), bad_checksum (dropped),
	// unparsed (a form not translated: sent on as they came).
	PMTUErrors map[string]uint64 `json:"pmtu_errors,omitempty"`
	// Phases: where recent completed splices and unsplices spent their
	// time.
	Phases []Phase `json:"phases,omitempty"`
}

// Phase is one phase of a transition (splice or unsplice) over recent
// completed transitions.
type Phase struct {
	Transition string `json:"transition"` // splice or unsplice
	Name       string `json:"name"`       // divert, drain, barrier, capture, install, release, rebuild, hand_back
	Count      uint64 `json:"count"`      // transitions that ran it
	P50Us      int64  `json:"p50_us"`
	P99Us      int64  `json:"p99_us"`
}

// Queue is one NFQUEUE's counters: ours, then the kernel's.
type Queue struct {
	Number   uint16 `json:"number"`
	Received uint64 `json:"received"`
	Accepted uint64 `json:"accepted"`
	Modified uint64 `json:"modified"`
	Dropped  uint64 `json:"dropped"`
	Held     uint64 `json:"held"`
	Errors   uint64 `json:"errors"`
	Overruns uint64 `json:"overruns"`
	// Reopens: the queue's reader failed and reopened its socket.
	Reopens uint64 `json:"reopens"`
	// Truncated: packets that arrived cut, longer than a queue carries
	// (GSO packets of BIG TCP), and were dropped; after the first, the
	// queue asks the kernel for segments.
	Truncated uint64 `json:"truncated,omitempty"`
	// Kernel: packets waiting now, dropped because the queue was full,
	// dropped because our socket buffer was full.
	KernelWaiting      uint32 `json:"kernel_waiting"`
	KernelQueueDropped uint32 `json:"kernel_queue_dropped"`
	KernelUserDropped  uint32 `json:"kernel_user_dropped"`
}

// Flow states.
const (
	StateProxied  = "proxied"
	StateSplicing = "splicing"
	StateSpliced  = "spliced"
	StateClosing  = "closing"
)

// FlowStates are the flow states, in order.
var FlowStates = []string{StateProxied, StateSplicing, StateSpliced, StateClosing}

// Flow is one relayed client connection.
type Flow struct {
	ID      uint64 `json:"id"`
	Service string `json:"service"`
	Proxy   string `json:"proxy"` // "forward", ...
	State   string `json:"state"`
	// User is who the client authenticated as (SOCKS5); empty otherwise.
	User string `json:"user,omitempty"`
	// The two legs: the client's connection to the original destination,
	// and the gateway's connection to the server.
	ClientLeg Leg `json:"client_leg"`
	ServerLeg Leg `json:"server_leg"`
	// Bytes each way, whoever moved them (proxy, then engine); packets
	// each way since the splice.
	BytesC2S   uint64     `json:"bytes_c2s"`
	BytesS2C   uint64     `json:"bytes_s2c"`
	PacketsC2S uint64     `json:"packets_c2s"`
	PacketsS2C uint64     `json:"packets_s2c"`
	Started    time.Time  `json:"started"`
	AgeSec     float64    `json:"age_sec"`
	SplicedAt  *time.Time `json:"spliced_at,omitempty"`
	// Engine is what the splice engine tracks of each direction of a
	// spliced flow (client to server first).
	Engine []Direction `json:"engine,omitempty"`
	// Datapath rewrites a spliced flow's packets: "nfqueue" (the Go
	// engine) or "bpf" (the kernel program; packet counts are then not
	// kept per flow).
	Datapath string `json:"datapath,omitempty"`
	// Adopted: spliced by an earlier daemon and adopted from the bpf
	// datapath's pinned maps when this one started; no proxy owns it,
	// so it cannot be unspliced.
	Adopted bool `json:"adopted,omitempty"`
}

// Direction is the splice engine's state of one direction of a flow.
// Sequence numbers are in the sender's own space.
type Direction struct {
	Name           string `json:"name"` // c2s or s2c
	SeqOffset      uint32 `json:"seq_offset"`
	HighestSeq     uint32 `json:"highest_seq"`    // end of the highest data or FIN forwarded
	HighestAck     uint32 `json:"highest_ack"`    // highest acknowledgment of it by the receiver
	Unacknowledged uint32 `json:"unacknowledged"` // bytes forwarded and not acknowledged
	Window         uint32 `json:"window"`         // last window the sender advertised, bytes
	FIN            bool   `json:"fin"`
	TSOffset       uint32 `json:"ts_offset"`
	TSLearned      bool   `json:"ts_learned"`
	Packets        uint64 `json:"packets"`
	Bytes          uint64 `json:"bytes"`
	Dropped        uint64 `json:"dropped"`
	LastVerdict    string `json:"last_verdict"`
	LastDrop       string `json:"last_drop,omitempty"`
	// ProgressAgeSec: seconds since the receiver last acknowledged new
	// data (or data went out while none was outstanding).
	ProgressAgeSec float64 `json:"progress_age_sec"`
	Stalled        bool    `json:"stalled"`
}

// Leg is one TCP connection of a flow, as "address:port".
type Leg struct {
	Local  string `json:"local"`
	Remote string `json:"remote"`
}

// Ruleset is spliced's nftables table as the kernel has it.
type Ruleset struct {
	Table string `json:"table"`
	// Kernel is `nft list table` of our table (divert set elements left
	// out: they come and go with flows).
	Kernel string `json:"kernel"`
	// Expected is what the daemon installed.
	Expected string `json:"expected"`
	Drift    bool   `json:"drift"`
	// Diff is a unified diff from Expected to Kernel.
	Diff string `json:"diff,omitempty"`
}

// Event kinds.
const (
	EventOpened       = "opened"        // a flow was accepted and connected upstream
	EventDenied       = "denied"        // refused by the access policy
	EventSpliced      = "spliced"       // moved into the splice engine
	EventSpliceFailed = "splice_failed" // a splice was abandoned; the flow stays proxied
	EventUnspliced    = "unspliced"
	EventClosed       = "closed"
	EventDrift        = "drift"    // someone changed or removed our table
	EventRepaired     = "repaired" // the table was restored
	EventReloaded     = "reloaded" // the configuration was reloaded
	// EventSubscribed opens every event stream: events after it are
	// delivered.
	EventSubscribed = "subscribed"
)

// Event is one thing that happened.
type Event struct {
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"`
	Flow   *Flow     `json:"flow,omitempty"`
	Detail string    `json:"detail,omitempty"`
}

// Error is the body of every failed request.
type Error struct {
	Error string `json:"error"`
}
