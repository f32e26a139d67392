package gateway

import (
	"net/netip"
	"testing"
	"time"

	"spliced/internal/monotime"
	"spliced/splice"
	"spliced/splice/bpf"
)

// futureFlow is a pinned flow as an earlier version left it: its last
// packet and its FINs' times lie an hour after now on the monotonic clock
// (that version's program counted CLOCK_BOOTTIME, ahead by the time the
// host slept, and its daemon wrote unix times converted with an offset
// taken when it started, moved by any step of the wall clock since).
func futureFlow(t *testing.T, id uint64) bpf.PinnedFlow {
	t.Helper()
	client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(id)}), uint16(10000+id))
	server := netip.MustParseAddrPort("10.2.0.2:80")
	p := splice.Params{
		Client: splice.Conn{Local: server, Remote: client, SndNxt: 1, RcvNxt: 1000, SndWnd: 64000, RcvWnd: 65000, MSS: 1448},
		Server: splice.Conn{Local: client, Remote: server, SndNxt: 77, RcvNxt: 123, SndWnd: 66000, RcvWnd: 67000, MSS: 1448},
	}
	f, err := splice.NewFlow(&p, monotime.Now())
	if err != nil {
		t.Fatal(err)
	}
	st := f.State()
	ahead := monotime.Now() + int64(time.Hour)
	st.LastSeen = ahead
	st.Dirs[splice.C2S].FINAt, st.Dirs[splice.S2C].FINAt = ahead, ahead
	m := flowMeta{Service: "svc", Proxy: "forward", Started: time.Now().UnixNano(), SplicedAt: time.Now().UnixNano()}
	return bpf.PinnedFlow{ID: id, Keys: p.Keys(), State: st, Meta: m.marshal()}
}

// checkNotAhead fails when a time of e's view lies after now, or when the
// flow does not look idle an idle timeout from now.
func checkNotAhead(t *testing.T, what string, e *splice.Entry) {
	t.Helper()
	now := monotime.Now()
	snap := e.Snapshot()
	st := snap.State()
	if st.LastSeen > now || st.Dirs[0].FINAt > now || st.Dirs[1].FINAt > now {
		t.Errorf("%s: times %v, %v, %v after now", what, time.Duration(st.LastSeen-now),
			time.Duration(st.Dirs[0].FINAt-now), time.Duration(st.Dirs[1].FINAt-now))
	}
	idle := int64(30 * time.Second)
	if !snap.Idle(now+idle, idle) {
		t.Errorf("%s: not idle %v from now", what, time.Duration(idle))
	}
}

// TestAdoptedTimesNotAhead: a flow adopted from an earlier version's pins
// or record whose times lie in the future on this version's clock is
// taken as last seen at its adoption, on both datapaths, and stays so
// when the reaper reads the program's state again: before, such a flow
// looked neither idle nor lingered for as long as its times were ahead
// (an hour here; after NTP set a stale clock, months), a dead one kept
// that long.
func TestAdoptedTimesNotAhead(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	for _, relearn := range []bool{false, true} {
		pf := futureFlow(t, map[bool]uint64{false: 1, true: 2}[relearn])
		sf, err := g.adoptOne(pf, time.Now(), 1, 0, relearn, g.engine)
		if err != nil {
			t.Fatal(err)
		}
		checkNotAhead(t, map[bool]string{false: "bpf adoption", true: "nfqueue adoption"}[relearn], sf.entry)
	}

	// The bpf datapath: the reaper refreshes the engine's view of an
	// offloaded flow from the program's map, which still holds the
	// earlier clock's times until the flow's next packet.
	dp, err := bpf.Load(bpf.Options{})
	if err != nil {
		t.Skipf("no bpf datapath here: %v", err)
	}
	defer dp.Close()
	g.kpath = &kernelPath{dp: dp}
	defer func() { g.kpath = nil }()
	pf := futureFlow(t, 3)
	if err := dp.PutFlow(pf.ID, pf.Keys, pf.State); err != nil {
		t.Fatal(err)
	}
	sf, err := g.adoptOne(pf, time.Now(), 1, 0, false, g.engine)
	if err != nil {
		t.Fatal(err)
	}
	g.syncOffloaded(monotime.Now())
	checkNotAhead(t, "bpf adoption, synced", sf.entry)

	// Its next packet: the program's time (now) is taken as it is.
	st := pf.State
	st.LastSeen = monotime.Now()
	if err := dp.PutFlow(pf.ID, pf.Keys, st); err != nil {
		t.Fatal(err)
	}
	g.syncOffloaded(monotime.Now())
	if got := sf.entry.Snapshot().LastSeen(); got != st.LastSeen {
		t.Errorf("after its next packet: last seen %d, want the program's %d", got, st.LastSeen)
	}

	// Demoted: the engine runs the flow from the map's state.
	if err := dp.PutFlow(pf.ID, pf.Keys, pf.State); err != nil {
		t.Fatal(err)
	}
	if err := g.reclaim(sf.entry); err != nil {
		t.Fatal(err)
	}
	checkNotAhead(t, "bpf adoption, demoted", sf.entry)
}

// TestAdoptedSplicedAtOfEarlierVersion: an earlier version recorded when
// a flow was spliced in unix nanoseconds; if the wall clock was set back
// since, that time lies ahead of now. Adopted, it is shown as a time of
// the past (the splice's at the latest when the flow is adopted), not
// read back as monotonic nanoseconds since 1970 (monotime.Wall takes any
// value after now for unix time).
func TestAdoptedSplicedAtOfEarlierVersion(t *testing.T) {
	g := quietGateway(t)
	g.engine = splice.NewTable()
	pf := futureFlow(t, 1)
	pf.State = splice.State{} // times of this clock
	m := flowMeta{Service: "svc", Proxy: "forward", Started: time.Now().UnixNano(),
		SplicedAt: time.Now().Add(time.Hour).UnixNano()} // the wall clock set back an hour since
	pf.Meta = m.marshal()
	before := time.Now()
	sf, err := g.adoptOne(pf, before, 1, 0, true, g.engine)
	if err != nil {
		t.Fatal(err)
	}
	af := describeFlow(sf.flow, sf)
	if af.SplicedAt == nil || af.SplicedAt.Before(before.Add(-time.Minute)) || af.SplicedAt.After(time.Now()) {
		t.Errorf("spliced at %v, want about %v", af.SplicedAt, before)
	}
	if at := sf.flow.SplicedAt.Load(); at > monotime.Now() {
		t.Errorf("spliced %v in the future", time.Duration(at-monotime.Now()))
	}
}
