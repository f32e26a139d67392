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
// HTTP: nginx (proxy_pass, upstream keepalive, 2 workers) and HAProxy
// (mode http, http-reuse always, 2 threads) on the gateway's address,
// and spliced's HTTP proxy relaying and splicing, side by side in one lab
// in front of one nginx backend, driven by wrk: requests per second, p99
// latency and gateway CPU per request, for responses of 4 KiB to 16 MiB
// on 8 and 64 connections and for one request per connection. The
// spliced rows' ratio to the better peer is the goal of issue 16.
//
// Everything runs in testnet labs; nothing here is a test, and nothing is
// asserted about time: the report shows what was measured.
package bench
