package gateway

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"spliced/api"
	"spliced/logging"
	"spliced/rules"
	"spliced/splice"
)

// repairCheckEvery is how often the table is compared with what it should
// be even without a change event (set element edits do not say which set
// they touch, so they are not watched).
const repairCheckEvery = 10 * time.Second

// watchRuleset repairs our table when someone deletes or edits it: an
// nftables monitor reports table, chain, rule and set changes at once,
// an rtnetlink one deleted ip rules and routes (watchRouting); a timer
// catches the rest. The repair reinstalls the whole table in one
// transaction with the divert entries of live spliced flows, so those
// keep running.
func (g *Gateway) watchRuleset(ctx context.Context) {
	trigger := make(chan struct{}, 1)
	poke := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	go g.followRuleset(ctx, openRulesetMonitor, poke)
	if err := watchRouting(ctx, poke); err != nil {
		g.log.Warn("cannot watch the policy routing; checking it every few seconds only", logging.Err(err))
	}
	// Waited for, as Run waits for this function: otherwise a check
	// could start or run on after the shutdown began, holding rulesMu
	// and logging after the daemon said it stopped.
	firewallDone := make(chan struct{})
	go func() {
		defer close(firewallDone)
		g.watchFirewall(ctx)
	}()
	defer func() { <-firewallDone }()
	tick := time.NewTicker(repairCheckEvery)
	defer tick.Stop()
	sysctlTick := time.NewTicker(sysctlCheckEvery)
	defer sysctlTick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sysctlTick.C:
			g.checkAcceptLocal()
			continue
		case <-trigger:
			// Let a burst of changes (an nft -f) finish first.
			select {
			case <-time.After(50 * time.Millisecond):
			case <-ctx.Done():
				return
			}
			select {
			case <-trigger:
			default:
			}
		case <-tick.C:
		}
		g.repairDrift(ctx)
	}
}

// openRulesetMonitor subscribes to the nftables events of the daemon's
// network namespace; close ends the subscription.
func openRulesetMonitor() (events <-chan *nftables.MonitorEvent, close func(), err error) {
	// The kernel sends every event to every subscriber, set elements
	// included (our own divert entries, thousands in a burst of
	// splices): with the default receive buffer a burst overflowed it.
	c, err := nftables.New(nftables.AsLasting(), nftables.WithSockOptions(rules.LargeBuffers))
	if err != nil {
		return nil, nil, err
	}
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(4096))
	ch, err := c.AddMonitor(mon)
	if err != nil {
		c.CloseLasting()
		return nil, nil, err
	}
	return ch, func() { mon.Close(); c.CloseLasting() }, nil
}

// monitorRetry is how long followRuleset waits before it opens the
// monitor again after it failed or ended.
var monitorRetry = time.Second

// followRuleset pokes for every event open's monitor reports about our
// table, until ctx ends. A monitor that fails (a receive error such as
// an overflow, which ends the library's monitor for good) is opened
// again, and a check runs at once for the events it may have lost;
// before, the daemon went on with the periodic check alone and said
// nothing.
func (g *Gateway) followRuleset(ctx context.Context, open func() (<-chan *nftables.MonitorEvent, func(), error), poke func()) {
	for {
		events, closeMon, err := open()
		if err == nil {
			err = g.followEvents(ctx, events, poke)
			closeMon()
			// The library's goroutine may be blocked handing over an
			// event: take what is left until it closes the channel.
			go func() {
				for range events {
				}
			}()
		}
		if ctx.Err() != nil {
			return
		}
		g.log.Warn("the nftables monitor failed; checking the ruleset now and every few seconds until it is back", logging.Err(err))
		g.divertLost.addAll() // deletions of divert entries may have been lost too
		poke()
		select {
		case <-ctx.Done():
			return
		case <-time.After(monitorRetry):
		}
	}
}

// followEvents pokes for the events of our table until events ends or
// reports an error, or ctx ends.
func (g *Gateway) followEvents(ctx context.Context, events <-chan *nftables.MonitorEvent, poke func()) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev, ok := <-events:
			if !ok {
				return errors.New("monitor closed")
			}
			if ev.Error != nil {
				return ev.Error
			}
			switch {
			case ev.Type == nftables.MonitorEventTypeDelSetElem:
				if keys := g.manager().DivertDeletedByOthers(ev); len(keys) > 0 {
					g.divertLost.add(keys)
					poke()
				}
			case g.concernsUs(ev):
				poke()
			case isRulesetChange(ev):
				// Another table's: maybe the firewall check's.
				select {
				case g.firewallPoke <- struct{}{}:
				default:
				}
			}
		}
	}
}

// concernsUs reports whether a monitor event may have changed our table:
// a table, chain, rule or set event naming it. Set element events are the
// divert entries of our own splices, nearly always.
func (g *Gateway) concernsUs(ev *nftables.MonitorEvent) bool {
	name := g.manager().Spec().Table
	var t *nftables.Table
	switch d := ev.Data.(type) {
	case *nftables.Table:
		t = d
	case *nftables.Chain:
		t = d.Table
	case *nftables.Rule:
		t = d.Table
	case *nftables.Set:
		t = d.Table
	default:
		return false
	}
	return t != nil && t.Name == name && t.Family == nftables.TableFamilyINet
}

// isRulesetChange reports whether a monitor event changed a table, a
// chain or a rule (not a set's elements).
func isRulesetChange(ev *nftables.MonitorEvent) bool {
	switch ev.Data.(type) {
	case *nftables.Table, *nftables.Chain, *nftables.Rule:
		return true
	}
	return false
}

// watchFirewall runs the firewall check (checkFirewall) when another
// table changes, so that an operator's fix, or a reload of the router's
// ruleset that drops spliced flows, is noticed at once; at most once a
// second, as a busy ruleset (a container runtime's) may change often.
func (g *Gateway) watchFirewall(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.firewallPoke:
		}
		// Let a burst of changes (an nft -f) finish first.
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return
		}
		select {
		case <-g.firewallPoke:
		default:
		}
		g.rulesMu.Lock()
		if ctx.Err() == nil {
			g.checkFirewall()
		}
		g.rulesMu.Unlock()
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return
		}
	}
}

// repairDrift reinstalls the table if it differs from what it should be.
func (g *Gateway) repairDrift(ctx context.Context) {
	g.rulesMu.Lock()
	defer g.rulesMu.Unlock()
	// First: live flows' packets pass unrewritten until it is done.
	g.restoreDivert()
	g.checkFirewall()
	m := g.manager()
	_, diff, err := m.Drift(ctx)
	if err != nil {
		g.log.Warn("cannot compare the ruleset", logging.Err(err))
		return
	}
	table, ipRules, routes, err := m.State()
	routingOK := err == nil && ipRules == 2 && routes == 2
	if diff == "" && routingOK {
		g.lastDrift = ""
		g.driftLeft.Store(nil)
		return
	}
	start := time.Now()
	detail := trimDiff(diff)
	spec := m.Spec()
	what := "table inet " + spec.Table + " was changed"
	switch {
	case !table:
		what = "table inet " + spec.Table + " is gone"
	case diff == "":
		what = ""
	}
	if !routingOK {
		routing := fmt.Sprintf("policy routing: %d of 2 ip rules (fwmark 0x%x lookup %d) and %d of 2 local routes in table %d", ipRules, spec.Mark, spec.RouteTable, routes, spec.RouteTable)
		if err != nil {
			routing = fmt.Sprintf("policy routing unreadable: %v", err)
		}
		detail += "\n" + routing
		what = strings.TrimPrefix(what+"; "+routing, "; ")
	}
	if g.config().Kernel.Repair == "off" {
		// Said once per drift: a drift that ends and comes back is
		// said again.
		if detail != g.lastDrift {
			g.lastDrift = detail
			g.log.Warn("ruleset drift: someone changed spliced's table or routing; kernel.repair is off, leaving it",
				logging.KeyTable, "inet "+spec.Table, "table_present", table, "diff", detail)
			g.events.publish(api.Event{Kind: api.EventDrift, Detail: detail})
		}
		left := what + ": intercepted and spliced flows may fail; kernel.repair is off, so spliced leaves it (splicectl ruleset -diff shows the table's drift; kernel.repair: on restores it)"
		g.driftLeft.Store(&left)
		return
	}
	g.log.Warn("ruleset drift: someone changed spliced's table or routing; restoring it",
		logging.KeyTable, "inet "+spec.Table, "table_present", table, "diff", detail)
	g.events.publish(api.Event{Kind: api.EventDrift, Detail: detail})
	if err := g.repairLive(m); err != nil {
		g.log.Error("restore the ruleset", logging.Err(err))
		left := fmt.Sprintf("%s: intercepted and spliced flows may fail; restoring it failed, retrying every %v: %v", what, repairCheckEvery, err)
		g.driftLeft.Store(&left)
		return
	}
	g.driftLeft.Store(nil)
	g.repairs.Add(1)
	took := time.Since(start)
	g.log.Info("ruleset restored", logging.KeyTable, "inet "+m.Spec().Table, "took_ms", took.Milliseconds())
	g.events.publish(api.Event{Kind: api.EventRepaired, Detail: "restored in " + took.Round(time.Millisecond).String()})
}

// installLive reinstalls the table of m with every live divert entry,
// while no splice can add or remove one.
func (g *Gateway) installLive(m *rules.Manager) error {
	if !g.splicing() {
		return m.Install(nil)
	}
	var err error
	g.diverter.Exclusive(func() { err = m.Install(g.liveDivert()) })
	if err == nil {
		g.checkDivertCommands()
	}
	return err
}

// installAtStart is installLive for the start: the table it replaces may
// be an earlier daemon's, whose divert entries of flows nobody continues
// it keeps for a while, to reset their ends (see lostTuples).
func (g *Gateway) installAtStart(m *rules.Manager) error {
	if !g.splicing() {
		return m.Install(nil)
	}
	var err error
	g.diverter.Exclusive(func() {
		g.findLost()
		err = m.Install(g.liveDivert())
	})
	if err == nil {
		g.checkDivertCommands()
	}
	return err
}

// repairLive is installLive for the drift check: the table is restored in
// place where it still exists (rules.Manager.Repair).
func (g *Gateway) repairLive(m *rules.Manager) error {
	if !g.splicing() {
		return m.Repair(nil)
	}
	var err error
	g.diverter.Exclusive(func() { err = m.Repair(g.liveDivert()) })
	if err == nil {
		g.checkDivertCommands()
	}
	return err
}

// checkDivertCommands turns divert commands (see rules.Divert) on when
// they work in the table just installed, off when they do not: a command
// for a test tuple (loopback, port 0: never a flow's) must be taken and
// add its element. Splices add entries through netlink meanwhile and
// while they are off.
func (g *Gateway) checkDivertCommands() {
	k := splice.KeyFrom(netip.MustParseAddrPort("127.0.0.1:0"), netip.MustParseAddrPort("127.0.0.1:0"))
	err := g.diverter.Commands(func() error { return g.inject.sendDivertCommands(0, []splice.Key{k}) })
	if err == nil {
		var ok bool
		if ok, err = g.diverter.Has(0, k); err == nil && !ok {
			err = fmt.Errorf("its send reported it taken, but its element is not in the set: does an earlier output chain drop packets marked 0x%08x?", rules.DivertCommandMark)
		}
	}
	if derr := g.diverter.Delete(0, k); derr != nil && err == nil {
		err = fmt.Errorf("remove the test element: %w", derr)
	}
	mode := divertByCommand
	if err != nil {
		mode = divertByNetlink
	}
	if was := g.divertMode.Swap(mode); was == mode {
		return
	}
	if err != nil {
		g.log.Warn("divert commands do not work here; splices add divert entries through netlink (50-500 µs slower)", logging.Err(err))
		return
	}
	g.log.Debug("divert commands work: splices add divert entries from the packet path")
}

// How splices add divert entries (Gateway.divertMode): through netlink
// until a check showed that commands work.
const (
	divertUnchecked int32 = iota
	divertByCommand
	divertByNetlink
)

// liveDivert returns the divert tuples of every flow that is spliced,
// being spliced or unspliced, or unspliced with its entries kept
// (passthrough), by queue index.
func (g *Gateway) liveDivert() map[uint16][]splice.Key {
	// An unsplicing flow is both spliced and in transition: a set takes
	// each element once.
	out := map[uint16][]splice.Key{}
	seen := map[splice.Key]bool{}
	add := func(q uint16, k splice.Key) {
		if !seen[k] {
			seen[k] = true
			out[q] = append(out[q], k)
		}
	}
	for q, keys := range g.refreshable() {
		for _, k := range keys {
			add(q, k)
		}
	}
	g.transitions.mu.RLock()
	for k, tr := range g.transitions.m {
		add(tr.queue, k)
	}
	g.transitions.mu.RUnlock()
	return out
}

// lostTuples collects the divert tuples another process deleted, as the
// nftables monitor reports them (rules.Manager.DivertDeletedByOthers),
// until the next check restores those of live flows (restoreDivert).
type lostTuples struct {
	mu   sync.Mutex
	keys map[splice.Key]struct{}
	// all: deletions may have gone unreported (the monitor failed):
	// every live flow's tuples are put back.
	all bool
}

func (l *lostTuples) add(keys []splice.Key) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil {
		l.keys = map[splice.Key]struct{}{}
	}
	for _, k := range keys {
		l.keys[k] = struct{}{}
	}
}

func (l *lostTuples) addAll() {
	l.mu.Lock()
	l.all = true
	l.mu.Unlock()
}

// take returns what was collected and forgets it.
func (l *lostTuples) take() (keys map[splice.Key]struct{}, all bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys, all = l.keys, l.all
	l.keys, l.all = nil, false
	return keys, all
}

// restoreDivert puts back the divert entries of live flows that another
// process deleted (an unowned table's sets can be flushed by anyone:
// `nft flush set inet spliced divert4_0`). The drift check leaves the
// sets' elements out, and before, the entries came back only at the next
// refresh, a third of kernel.divert_timeout later (8 h by default):
// meanwhile the flows' packets passed unrewritten, a NAT flow's were
// reset by the gateway's stack and a transparent one stalled
// (TestLabDivertSetFlushed). Only the tuples of spliced flows and of
// unspliced ones that keep their entries (those Refresh keeps) are put
// back: a flow that ended must not be diverted again. A deleted tuple of
// a splice under way is kept for the next check: the flow is in neither
// yet.
func (g *Gateway) restoreDivert() {
	lost, all := g.divertLost.take()
	if len(lost) == 0 && !all || !g.splicing() {
		return
	}
	var waiting []splice.Key
	restored := map[splice.Key]bool{}
	n, err := g.diverter.Restore(func() map[uint16][]splice.Key {
		out := map[uint16][]splice.Key{}
		for q, keys := range g.refreshable() {
			for _, k := range keys {
				if _, ok := lost[k]; ok || all {
					out[q] = append(out[q], k)
					restored[k] = true
				}
			}
		}
		for k := range lost {
			if !restored[k] && g.transitions.get(k) != nil {
				waiting = append(waiting, k)
			}
		}
		return out
	})
	if len(waiting) > 0 {
		g.divertLost.add(waiting)
	}
	switch {
	case err != nil && errors.Is(err, unix.ENOENT):
		// A set or the table went too: the drift check that follows
		// says so, and reinstalls it with every live flow's entries.
		g.log.Debug("divert entries deleted by another process, and a divert set with them", logging.Err(err))
	case err != nil:
		g.log.Error("divert entries deleted by another process; restoring them failed, retrying at the next check", logging.Err(err))
		g.divertLost.add(slices.Collect(maps.Keys(lost)))
		if all {
			g.divertLost.addAll()
		}
	case n > 0 && !all:
		g.log.Warn("divert entries deleted by another process (nft flush set, nft delete element on spliced's table): restored those of live flows, whose packets passed unrewritten meanwhile; kernel.own_table: on (Linux 6.9 and later) keeps other processes out of the table",
			logging.KeyTable, "inet "+g.manager().Spec().Table, "tuples", n)
		g.events.publish(api.Event{Kind: api.EventDrift, Detail: fmt.Sprintf("divert entries of %d tuples of live flows deleted by another process", n)})
		g.repairs.Add(1)
		g.events.publish(api.Event{Kind: api.EventRepaired, Detail: fmt.Sprintf("divert entries of %d tuples restored", n)})
	case n > 0:
		g.log.Debug("divert entries of live flows put back after the nftables monitor failed", "tuples", n)
	}
}
