package gateway

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"

	"spliced/splice"
)

// TestFollowRulesetReopens: a monitor that fails (the library ends it
// for good on a receive error, such as an overflowing buffer) is opened
// again, with a warning and a check at once; before, the daemon went on
// with the periodic check alone, silently. Events of our table poke,
// others do not.
func TestFollowRulesetReopens(t *testing.T) {
	g := quietGateway(t)
	var logs bytes.Buffer
	var logMu sync.Mutex
	g.log = slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &logMu}, nil))
	old := monitorRetry
	monitorRetry = time.Millisecond
	defer func() { monitorRetry = old }()

	ours := &nftables.MonitorEvent{Type: nftables.MonitorEventTypeNewChain, Data: &nftables.Chain{Name: "x", Table: &nftables.Table{Name: g.manager().Spec().Table, Family: nftables.TableFamilyINet}}}
	theirs := &nftables.MonitorEvent{Type: nftables.MonitorEventTypeNewChain, Data: &nftables.Chain{Name: "x", Table: &nftables.Table{Name: "other", Family: nftables.TableFamilyINet}}}
	failed := &nftables.MonitorEvent{Type: nftables.MonitorEventTypeOOB, Error: syscall.ENOBUFS}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	opened, closed := 0, 0
	second := make(chan *nftables.MonitorEvent)
	open := func() (<-chan *nftables.MonitorEvent, func(), error) {
		opened++
		if opened == 1 {
			ch := make(chan *nftables.MonitorEvent, 3)
			ch <- theirs
			ch <- ours
			ch <- failed
			close(ch)
			return ch, func() { closed++ }, nil
		}
		// As the library does, closing the monitor closes its channel.
		return second, func() { closed++; close(second) }, nil
	}
	pokes := make(chan struct{}, 10)
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.followRuleset(ctx, open, func() { pokes <- struct{}{} })
	}()
	// Our event, then the failure's check.
	for i := range 2 {
		select {
		case <-pokes:
		case <-time.After(10 * time.Second):
			t.Fatalf("poke %d of 2 never came", i+1)
		}
	}
	// The reopened monitor is followed: our event pokes again.
	select {
	case second <- ours:
	case <-time.After(10 * time.Second):
		t.Fatal("the monitor was not opened again")
	}
	select {
	case <-pokes:
	case <-time.After(10 * time.Second):
		t.Fatal("an event of the reopened monitor did not poke")
	}
	cancel()
	<-done
	if opened != 2 || closed != 2 {
		t.Errorf("opened %d, closed %d monitors; want 2 and 2", opened, closed)
	}
	if len(pokes) != 0 {
		t.Errorf("%d pokes too many (another table's event poked?)", len(pokes))
	}
	logMu.Lock()
	defer logMu.Unlock()
	if !strings.Contains(logs.String(), "nftables monitor failed") || !strings.Contains(logs.String(), "no buffer space") {
		t.Errorf("no warning naming the failure:\n%s", logs.String())
	}
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestFollowEventsDivertDeleted: an element deletion another process
// made, of keys shaped like divert tuples, pokes a check and leaves the
// tuples for it (restoreDivert); the daemon's own deletions (a flow that
// ended) and another set's elements (a blocklist of addresses) do not.
func TestFollowEventsDivertDeleted(t *testing.T) {
	g := quietGateway(t)
	k := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	// The divert set key of k (see rules.divertKey): each field padded
	// to 4 bytes.
	key := []byte{10, 1, 0, 2, 0x9c, 0x40, 0, 0, 10, 2, 0, 2, 0, 80, 0, 0}
	del := func(pid uint32, keys ...[]byte) *nftables.MonitorEvent {
		var els []nftables.SetElement
		for _, k := range keys {
			els = append(els, nftables.SetElement{Key: k})
		}
		return &nftables.MonitorEvent{Type: nftables.MonitorEventTypeDelSetElem, Data: els, Header: netlink.Header{PID: pid}}
	}
	const ours = 0 // the port of the Manager's socket, not opened here
	events := make(chan *nftables.MonitorEvent, 4)
	events <- del(ours, key)                       // a flow that ended
	events <- del(ours+4242, []byte{192, 0, 2, 7}) // another table's blocklist
	events <- del(ours+4242, key)                  // nft flush set inet spliced divert4_0
	close(events)
	pokes := 0
	g.followEvents(context.Background(), events, func() { pokes++ })
	lost, all := g.divertLost.take()
	if pokes != 1 || all || len(lost) != 1 {
		t.Fatalf("%d pokes, lost %v (all %v); want 1 poke and the tuple %v", pokes, lost, all, k)
	}
	if _, ok := lost[k]; !ok {
		t.Errorf("lost %v, want %v", lost, k)
	}
}
