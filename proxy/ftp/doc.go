// Package ftp is the gateway's FTP proxy (paper sections 2 and 3.7): the
// control connection stays in control mode, read line by line from the
// reassembled stream, while every data connection is set up by the proxy
// and then spliced, so file data never crosses user space.
//
// The proxy does NAT for FTP: servers only ever see the gateway's external
// address. PORT and EPRT commands from the client are answered by a
// gateway listener on the external address, announced to the server in
// their place; 227 (PASV) and 229 (EPSV) replies from the server are
// answered by a gateway listener on the client's side. The proxy owns both
// legs of each data connection: it accepts one and dials the other, then
// hands the pair to a proxy.Splicer.
//
// Security, as a careful FTP gateway must:
//   - PORT and EPRT must name the client's own address and a port above
//     1023 (no FTP bounce);
//   - the address in a PASV reply is ignored: data connections go to the
//     control connection's server, and a 227 or 229 naming a port below
//     1024 is refused;
//   - a data listener accepts only its expected peer, once, for a bounded
//     time;
//   - lines longer than the limit, and NUL bytes, end the session;
//   - AUTH (TLS) is refused: an encrypted control channel cannot be
//     rewritten, and half-handling it would break the session.
//
// The kernel's FTP conntrack helper never sees these flows as FTP to
// rewrite: the control connection ends at the gateway's sockets on both
// legs (no NAT for nf_nat_ftp to follow), and spliced data connections are
// untracked.
package ftp
