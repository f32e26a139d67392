package gateway

import (
	"net"
	"runtime"
	"sync"
	"weak"
)

// ECN and unsplicing. A socket rebuilt with TCP_REPAIR has no ECN state:
// the repair options restore MSS, window scale, SACK and timestamps, not
// ECN, so tcp_info of a rebuilt socket says ECN is off while its peer
// goes on with ECN as negotiated. Spliced again (the HTTP proxy splices
// each response and unsplices for the next request), the engine took the
// leg for one without ECN, and a client's ECN-capable packets reached a
// server that never negotiated ECN again (see splice.Conn.ECN).
// rebuiltECN remembers the rebuilt sockets whose connection negotiated
// ECN, for the captures that follow; an entry goes with its socket.
type rebuiltECN struct{ m sync.Map } // weak.Pointer[net.TCPConn] -> struct{}

// remember records that c, a rebuilt socket, continues a connection that
// negotiated ECN.
func (r *rebuiltECN) remember(c *net.TCPConn) {
	k := weak.Make(c)
	r.m.Store(k, struct{}{})
	runtime.AddCleanup(c, func(k weak.Pointer[net.TCPConn]) { r.m.Delete(k) }, k)
}

// negotiated reports whether c is a rebuilt socket whose connection
// negotiated ECN.
func (r *rebuiltECN) negotiated(c *net.TCPConn) bool {
	_, ok := r.m.Load(weak.Make(c))
	return ok
}
