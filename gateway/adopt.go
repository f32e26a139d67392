package gateway

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"spliced/config"
	"spliced/internal/monotime"
	"spliced/logging"
	"spliced/nfq"
	"spliced/proxy"
	"spliced/splice"
	"spliced/splice/bpf"
)

// Restarts on the bpf datapath. The program's maps and tcx links are
// pinned in bpffs (kernel.bpffs/spliced/TABLE): when the daemon dies
// (kill -9, a crash) the kernel keeps rewriting its promoted flows, and
// the divert chain it left keeps skipping what the program marked. The
// next daemon with the same configuration reuses the maps, moves the
// links to its program, and adopts every flow in them (adoptPinned): a
// splicedFlow rebuilt from the program's state, the tuples and the
// gateway's per-flow record (flowMeta, written at promotion), listed,
// retired and reset like any other, but owned by no proxy: it cannot be
// unspliced, and a watched (HTTP) flow whose client sends its next
// request is reset, since no proxy can route that request.
//
// A daemon that will not run the program over pins (kernel.datapath
// nfqueue, no service that splices, auto falling back) resets the pinned
// flows and removes the pins (dropPinned), as spliced -cleanup does: the
// Go engine could take them over, but the choice is the operator's
// configuration, and a flow reset at both ends is never left hanging.

// flowMeta is what the gateway knows of a promoted flow beyond the
// program's state: stored with it in the pinned meta map (a compact
// record: it is kernel memory per flow), read back by the daemon that
// adopts the flow. The client's and server's addresses come from the
// tuples; a SOCKS5 user and a direct service's listen address are not
// kept.
type flowMeta struct {
	Service   string // at most 24 bytes (config's service names)
	Proxy     string // at most 15 bytes
	Started   int64  // unix nanoseconds (shown to people)
	SplicedAt int64  // monotime (an earlier version's: unix nanoseconds)
	Queue     uint16
	Watch     bool // UnspliceOnClientData
}

const metaVersion = 1

func (m *flowMeta) marshal() []byte {
	svc, prx := m.Service[:min(len(m.Service), 24)], m.Proxy[:min(len(m.Proxy), 15)]
	b := make([]byte, 0, bpf.MetaSize)
	b = append(b, metaVersion, byte(len(svc)))
	b = append(b, svc...)
	b = append(b, byte(len(prx)))
	b = append(b, prx...)
	b = binary.LittleEndian.AppendUint64(b, uint64(m.Started))
	b = binary.LittleEndian.AppendUint64(b, uint64(m.SplicedAt))
	b = binary.LittleEndian.AppendUint16(b, m.Queue)
	var flags byte
	if m.Watch {
		flags |= 1
	}
	return append(b, flags)
}

func (m *flowMeta) unmarshal(b []byte) error {
	bad := errors.New("malformed record")
	if len(b) < 2 || b[0] != metaVersion {
		return bad
	}
	field := func() (string, bool) {
		if len(b) < 1 || len(b) < 1+int(b[0]) {
			return "", false
		}
		s := string(b[1 : 1+b[0]])
		b = b[1+b[0]:]
		return s, true
	}
	b = b[1:]
	var ok bool
	if m.Service, ok = field(); !ok {
		return bad
	}
	if m.Proxy, ok = field(); !ok || len(b) != 8+8+2+1 {
		return bad
	}
	m.Started = int64(binary.LittleEndian.Uint64(b))
	m.SplicedAt = int64(binary.LittleEndian.Uint64(b[8:]))
	m.Queue = binary.LittleEndian.Uint16(b[16:])
	m.Watch = b[18]&1 != 0
	return nil
}

func metaOf(sf *splicedFlow) []byte {
	f := sf.flow
	m := flowMeta{Service: f.Service, Proxy: f.Proxy, Started: f.Started.UnixNano(), SplicedAt: sf.splicedAt,
		Queue: sf.queue, Watch: f.UnspliceOnClientData.Load()}
	return m.marshal()
}

// recordMeta stores a flow's record for a daemon that may adopt it.
func (g *Gateway) recordMeta(sf *splicedFlow) {
	if err := g.kpath.dp.SetMeta(sf.entry.ID, metaOf(sf)); err != nil {
		g.log.Debug("record a promoted flow for adoption", logging.KeyFlow, sf.entry.ID, logging.Err(err))
	}
}

func keyAddrPort(a [16]byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(a).Unmap(), port)
}

// pinDir is the bpf datapath's pin directory under cfg.
func pinDir(cfg *config.Config) string { return bpf.PinDir(cfg.Kernel.BPFFS, cfg.Kernel.Table) }

// adoptPinned adopts the flows an earlier daemon left in the pinned maps
// the program was loaded with. Called at the start, before any service
// accepts a flow (adopted flows keep their IDs) and before the table is
// installed (Run carries their divert entries into it).
func (g *Gateway) adoptPinned() {
	k := g.kpath
	if k == nil || !k.dp.Reused() {
		return
	}
	flows, broken, err := k.dp.TakePinnedFlows()
	if err != nil {
		g.log.Error("read the bpf datapath's pinned flows; none adopted", logging.Err(err))
		return
	}
	if len(broken) > 0 {
		g.log.Warn("incomplete flows in the pinned maps removed (a daemon died while it wrote or removed them)", "flows", broken)
	}
	now := time.Now()
	spec := g.manager().Spec()
	var ids []uint64
	for _, pf := range flows {
		sf, err := g.adoptOne(pf, now, int(max(spec.Divert.Queues, 1)), spec.Divert.Queue, false, g.engine)
		if err != nil {
			g.log.Warn("pinned flow not adopted; removed from the bpf datapath", logging.KeyFlow, pf.ID, logging.Err(err))
			k.dp.DeleteFlow(pf.ID, pf.Keys)
			continue
		}
		ids = append(ids, pf.ID)
		f := sf.flow
		g.log.Debug("flow adopted", logging.KeyFlow, f.ID, logging.KeyService, f.Service, logging.KeyClient, f.Client,
			logging.KeyServer, f.Server, "finished", sf.entry.Snapshot().Finished())
	}
	g.log.Info("adopted spliced flows from the bpf datapath", "flows", len(ids), "pins", k.dp.PinDir())
}

// adoptOne adopts a flow of the bpf datapath's pins, or with relearn one
// of the nfqueue datapath's record (see store.go), into tab.
func (g *Gateway) adoptOne(pf bpf.PinnedFlow, now time.Time, queues int, firstQueue uint16, relearn bool, tab *splice.Table) (*splicedFlow, error) {
	var m flowMeta
	if pf.Meta != nil {
		if err := m.unmarshal(pf.Meta); err != nil {
			return nil, fmt.Errorf("its record: %w", err)
		}
	}
	c2s, s2c := pf.Keys[splice.C2S], pf.Keys[splice.S2C]
	f := proxy.NewFlow(m.Service, m.Proxy, keyAddrPort(c2s.Src, c2s.SrcPort), keyAddrPort(c2s.Dst, c2s.DstPort))
	f.ID = pf.ID
	if m.Started != 0 {
		f.Started = time.Unix(0, m.Started)
	}
	f.SetServerLeg(keyAddrPort(s2c.Dst, s2c.DstPort), keyAddrPort(s2c.Src, s2c.SrcPort))
	f.UnspliceOnClientData.Store(m.Watch)
	splicedAt := monotime.Of(now)
	notAhead(&pf.State, splicedAt, nil) // an earlier version's clock
	switch at := m.SplicedAt; {
	case at == 0:
	case at > splicedAt: // an earlier version's record, on the wall clock
		// Not after now, should the wall clock have been set back since:
		// monotime.Wall would take a later time for unix time again.
		splicedAt = min(monotime.Of(time.Unix(0, at)), splicedAt)
	default:
		splicedAt = at
	}
	f.SplicedAt.Store(splicedAt)
	f.SetState(proxy.StateSpliced)
	q := m.Queue
	if int(q) >= queues {
		q = uint16(pf.ID % uint64(queues))
	}
	adopt := tab.Adopt
	if relearn {
		adopt = tab.AdoptRelearn
	}
	e, err := adopt(pf.ID, pf.Keys, pf.State, monotime.Of(now))
	if err != nil {
		return nil, err
	}
	e.Watch.Store(pf.Watch)
	if !g.flows.Adopt(f) {
		tab.Delete(e)
		return nil, errors.New("its ID is taken")
	}
	sf := &splicedFlow{flow: f, entry: e, queue: q, splicedAt: splicedAt, adopted: true}
	// Its packets in the queue from now on are ones the program passed
	// on, never stragglers (see promote).
	if !relearn {
		seq := uint64(0)
		if ks, err := nfq.ReadKernelStats(); err == nil {
			seq = uint64(ks[firstQueue+q].IDSequence)
		}
		sf.stragglersTo.Store(1<<32 | seq)
	}
	g.splicedMu.Lock()
	g.spliced[f.ID] = sf
	g.jumped[serverLeg(f)] = time.Time{}
	g.splicedMu.Unlock()
	return sf, nil
}

// warnOtherPins logs the pin directories of other tables under cfg's
// bpffs, the bpf datapath's and the nfqueue datapath's records alike:
// another daemon's (in another network namespace), or ones a daemon left
// under another kernel.table, whose flows the old program keeps
// rewriting, or whose record nobody reads. They are not touched. The
// nfqueue datapath's were not looked at: after a kill -9 and a change of
// kernel.table the old record stayed in the kernel, and its table with
// it, and nothing said so.
func warnOtherPins(cfg *config.Config, log *slog.Logger) {
	for _, parent := range []string{filepath.Dir(pinDir(cfg)), filepath.Dir(storeDir(cfg))} {
		ents, err := os.ReadDir(parent)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.Name() != cfg.Kernel.Table {
				log.Warn("pins of another table left alone (another spliced's, or a killed one's with another kernel.table: spliced -cleanup with its configuration removes them and resets their flows)",
					"pins", filepath.Join(parent, e.Name()))
			}
		}
	}
}

// errAdopted is why an adopted flow cannot be unspliced.
func errAdopted(id uint64) error {
	return fmt.Errorf("flow %d was spliced by an earlier spliced and adopted after a restart: no proxy socket owns it, so it cannot be unspliced; it stays spliced until it ends", id)
}

// dropPinned ends the flows pinned under cfg's pin directory and removes
// the pins, for a daemon (or spliced -cleanup) that does not run the bpf
// datapath over them: the links go first (no program rewrites the flows
// any more), then each flow is reset at both ends from its last state.
// inj may be nil (a raw socket is opened for the resets). Pins of
// another network namespace are left alone (another daemon may use
// them); pins that cannot be read are removed without resets.
func dropPinned(cfg *config.Config, inj *injector, log *slog.Logger) error {
	return dropPinnedDir(pinDir(cfg), "the bpf datapath's pins", inj, log)
}

// dropStored is dropPinned for the nfqueue datapath's record of spliced
// flows (see store.go): the flows are reset from their last recorded
// state (at most storeSync old: an end whose flow moved since answers
// the reset with a challenge ACK instead, and times out).
func dropStored(cfg *config.Config, inj *injector, log *slog.Logger) error {
	return dropPinnedDir(storeDir(cfg), "the nfqueue datapath's record", inj, log)
}

func dropPinnedDir(dir, what string, inj *injector, log *slog.Logger) error {
	if !bpf.HasPins(dir) {
		return nil
	}
	dp, err := bpf.OpenPinned(dir)
	var ie *bpf.IncompatibleError
	switch {
	case errors.As(err, &ie) && ie.OtherNetNS:
		log.Warn(what+" left alone: "+ie.Reason, "pins", dir)
		return nil
	case errors.As(err, &ie):
		log.Error(what+" removed without resetting their flows (they cannot be read): "+ie.Reason, "pins", dir)
		return bpf.RemovePins(dir)
	case err != nil:
		return err
	case dp == nil:
		return nil
	}
	defer dp.Close()
	// Our descriptors keep the maps; the pinned links go with their pins.
	if err := bpf.RemovePins(dir); err != nil {
		return fmt.Errorf("remove %s: %w", what, err)
	}
	if err := bpf.WaitPrograms(); err != nil {
		return err
	}
	flows, _, err := dp.PinnedFlows()
	if err != nil {
		return err
	}
	if inj == nil && len(flows) > 0 {
		if inj, err = newInjector(false); err != nil {
			return err
		}
		defer inj.Close()
	}
	sent := 0
	for _, pf := range flows {
		snap := splice.FlowFromState(pf.State)
		if snap.Finished() {
			continue
		}
		for _, b := range resetPackets(snap, pf.Keys) {
			var p splice.Packet
			if p.Parse(b) == splice.OK && inj.send(&p) == nil {
				sent++
			}
		}
	}
	log.Info("flows of "+what+" reset and the pins removed", "flows", len(flows), "packets", sent, "pins", dir)
	return nil
}
