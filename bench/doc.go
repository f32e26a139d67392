// Package bench is spliced's measuring stick, after the paper's section 5:
// the same workloads through several gateway configurations, side by side
// in one run on one machine, so that ratios are fair even on a noisy VM.
//
// Configurations: kernel routing (the physical limit), routing with an
// nftables filter and conntrack, HAProxy in TCP mode (what an operator
// would otherwise pick), spliced proxying (copy mode, the paper's 2-path
// forwarder), spliced splicing through NFQUEUE with the lean queue loop
// (the paper's FWD), and the same with the go-nfqueue library loop.
//
// Measures: request/response rate with 1-byte and 1460-byte messages at 1
// and 8 connections; bulk throughput each way (iperf3); gateway CPU per
// transaction and per GB; splice latency of idle flows and the stall a busy
// flow sees; memory of many established flows proxied and spliced; and a
// sequence-number trace of a busy flow across the splice point.
//
// SOCKS5: Dante (danted) and spliced's socks5 proxy, relaying and
// splicing, each on the gateway's address and driven by the same Go
// client: connection setup rate (handshake, CONNECT, one byte each way,
// close), 1-byte request/response on established SOCKS connections, bulk
// client to server, and gateway CPU per connection and per GB.
//
// Everything runs in testnet labs; nothing here is a test, and nothing is
// asserted about time: the report shows what was measured.
package bench
