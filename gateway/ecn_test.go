package gateway

import (
	"net"
	"runtime"
	"testing"
	"time"
)

// TestRebuiltECN: a remembered socket is found again, another is not,
// and the entry goes once its socket is gone.
func TestRebuiltECN(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func() *net.TCPConn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.TCPConn)
	}
	var r rebuiltECN
	a, b := dial(), dial()
	defer b.Close()
	r.remember(a)
	if !r.negotiated(a) || r.negotiated(b) {
		t.Fatalf("negotiated: remembered %v, other %v", r.negotiated(a), r.negotiated(b))
	}
	a.Close()
	a = nil
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		n := 0
		r.m.Range(func(any, any) bool { n++; return true })
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d entries left after the socket was collected", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
