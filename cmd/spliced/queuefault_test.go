package main

import (
	"math/rand/v2"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"spliced/nfq"
	"spliced/testnet"
)

// queueFaultConfig is a forwarding daemon on one queue read by backend.
func queueFaultConfig(backend string) string {
	return splicingForwardConfig("debug", "  queues: 1\n  nfqueue: "+backend+"\n")
}

// TestLabQueueReaderFails: the daemon's queue reader fails a receive in
// the middle of a spliced transfer (the nfq test hook, as a broken socket
// would); it reopens its socket, says so in the log and the counters, and
// the spliced flow keeps moving: every byte arrives intact both ways.
func TestLabQueueReaderFails(t *testing.T) {
	const faultAfter = 1000
	t.Setenv(nfq.FaultEnv, strconv.Itoa(faultAfter))
	for _, backend := range []string{"lean", "go-nfqueue"} {
		t.Run(backend, func(t *testing.T) { queueReaderFails(t, backend, faultAfter) })
	}
}

func queueReaderFails(t *testing.T, backend string, faultAfter uint64) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, queueFaultConfig(backend))
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const size = 200 << 20
	tr := testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: size, S2C: size, Seed: rand.Uint64(), Timeout: 2 * time.Minute})
	if err := tr.Check(); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 30))
	}
	if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" }) == nil {
		t.Fatal("the flow was not spliced")
	}
	rec := d.FindLog(func(l map[string]any) bool {
		m, _ := l["msg"].(string)
		return len(m) > 30 && m[:30] == "nfqueue reader reopened its so"
	})
	if rec == nil {
		t.Fatalf("no reopen logged\n%s", tail(d.Log(), 30))
	}
	st, err := d.Client().Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var q *struct{ received, reopens, errors uint64 }
	for _, e := range st.Engines {
		for _, qq := range e.Queues {
			q = &struct{ received, reopens, errors uint64 }{qq.Received, qq.Reopens, qq.Errors}
		}
	}
	if q == nil {
		t.Fatal("no queue in the status")
	}
	t.Logf("%s: %d MiB each way intact in %v; the reader failed after %d packets and reopened (%v); queue received %d packets, errors %d, reopens %d",
		backend, size>>20, tr.Elapsed.Round(time.Millisecond), faultAfter, rec["cause"], q.received, q.errors, q.reopens)
	if q.reopens != 1 || q.received < 2*faultAfter {
		t.Fatalf("reopens %d, received %d: want one reopen and the flow going on after it", q.reopens, q.received)
	}
}
