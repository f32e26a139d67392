// Package socks5 is a SOCKS5 proxy (RFC 1928) with username/password
// authentication (RFC 1929): the paper's authenticating gateway. It reads
// the handshake in control mode (who the client is, where it may go),
// connects from the gateway's own address, answers with the bound
// address, and then only forwards: with splice.mode immediate (its
// default) the flow is spliced right after the reply, so an established
// SOCKS connection costs the gateway no socket.
//
// Only CONNECT is served; BIND and UDP ASSOCIATE get 0x07 (command not
// supported). The handshake is read with exact-length reads, so no byte
// the client sent after its request is held by the proxy: whatever it
// sent early stays in the kernel and follows the reply.
//
// Hostile clients are bounded: a handshake timeout, a session cap,
// length-checked fields, and per-source back-off after failed logins;
// every line a client can trigger is rate-limited.
package socks5
