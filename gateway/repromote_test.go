package gateway

import (
	"net/netip"
	"testing"
	"time"

	"spliced/proxy"
	"spliced/splice"
)

// TestRepromoteBackOff: a flow the bpf datapath passed back to the Go
// engine (one packet it does not handle, which anyone who knows the
// tuple can forge) is promoted again by the reaper: a second after its
// first return, twice as long after each later one, a minute at most;
// never while it is not spliced (an unsplice under way), has finished,
// or is on the program already, nor once it came back within a second of
// its promotion three times in a row.
func TestRepromoteBackOff(t *testing.T) {
	c, s := netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")
	k := [2]splice.Key{splice.KeyFrom(c, s), splice.KeyFrom(s, c)}
	p := splice.Params{
		Client: splice.Conn{Local: k[0].DstAddrPort(), Remote: k[0].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
		Server: splice.Conn{Local: k[1].DstAddrPort(), Remote: k[1].SrcAddrPort(), SndNxt: 1, RcvNxt: 1, SndWnd: 64000, RcvWnd: 64000, MSS: 1448},
	}
	e, err := splice.NewTable().Add(1, &p, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := &proxy.Flow{}
	f.SetState(proxy.StateSpliced)
	sf := &splicedFlow{flow: f, entry: e}
	t0 := int64(1000 * time.Second)
	if sf.repromoteDue(t0 + int64(time.Hour)) {
		t.Fatal("a flow never passed back is due for a promotion")
	}
	for n, wait := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		32 * time.Second, time.Minute, time.Minute, time.Minute} {
		sf.passedBack(t0)
		if sf.repromoteDue(t0 + int64(wait-time.Millisecond)) {
			t.Errorf("return %d: due %v after it, want %v", n+1, wait-time.Millisecond, wait)
		}
		if !sf.repromoteDue(t0 + int64(wait)) {
			t.Errorf("return %d: not due %v after it", n+1, wait)
		}
	}
	sf.passOns.Store(1 << 31) // the shift must not wrap
	if sf.repromoteDue(t0+int64(time.Second)) || !sf.repromoteDue(t0+int64(time.Minute)) {
		t.Error("after many returns the wait is not a minute")
	}
	late := t0 + int64(time.Hour)
	f.SetState(proxy.StateSplicing) // as an unsplice sets it
	if sf.repromoteDue(late) {
		t.Error("due while being unspliced")
	}
	f.SetState(proxy.StateSpliced)
	sf.finished = 1
	if sf.repromoteDue(late) {
		t.Error("due after it finished")
	}
	sf.finished = 0
	if !sf.repromoteDue(late) {
		t.Error("not due an hour after its last return")
	}

	// Back within a second of each promotion, three times in a row: its
	// packets are ones the program cannot handle; it stays.
	sf.passOns.Store(0)
	for i := range repromoteGiveUp {
		promoted := late + int64(time.Duration(i)*time.Hour)
		sf.repromotedAt.Store(promoted)
		sf.passedBack(promoted + int64(10*time.Millisecond))
		if due := sf.repromoteDue(promoted + int64(30*time.Minute)); due != (i < repromoteGiveUp-1) {
			t.Errorf("quick return %d: due %v", i+1, due)
		}
	}
	// One that comes back later counts again from zero.
	sf.passedBack(late + int64(100*time.Hour))
	if !sf.repromoteDue(late + int64(101*time.Hour)) {
		t.Error("a flow that came back long after its promotion is not due again")
	}
	if err := e.Offload(func(splice.State) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if sf.repromoteDue(late) {
		t.Error("due while on the program")
	}
}
