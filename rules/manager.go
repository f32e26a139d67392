package rules

import (
	"errors"
	"fmt"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"spliced/splice"
)

// Manager installs and removes our kernel state through netlink. Its
// spec never changes (a reload makes a new Manager with WithSpec), so one
// Manager is safe for concurrent use.
type Manager struct {
	netns int
	spec  Spec
	queue *queueProbe // shared by the Managers derived with WithSpec
	own   *owner      // the socket that changes the table; shared likewise
}

// queueProbe remembers which queue expression the kernel has, probed once.
type queueProbe struct {
	mu             sync.Mutex
	probed, native bool
}

// WithSpec returns a Manager for spec in the same namespace, which knows
// the queue flavour m probed.
func (m *Manager) WithSpec(spec Spec) *Manager {
	return &Manager{netns: m.netns, spec: spec, queue: m.queue, own: m.own}
}

// Option configures a Manager.
type Option func(*Manager)

// WithNetNS makes the Manager program the namespace behind fd instead of
// the caller's. Tests use it; the daemon runs inside its namespace.
func WithNetNS(fd int) Option { return func(m *Manager) { m.netns = fd } }

// NewManager returns a Manager for spec. It touches nothing yet.
func NewManager(spec Spec, opts ...Option) *Manager {
	m := &Manager{spec: spec, queue: &queueProbe{}, own: &owner{}}
	for _, o := range opts {
		o(m)
	}
	return m
}

// Spec is the state the Manager installs, with the queue flavour once
// Install probed it.
func (m *Manager) Spec() Spec {
	spec := m.spec
	m.queue.mu.Lock()
	if m.queue.probed {
		spec.Divert.NativeQueue = m.queue.native
	}
	m.queue.mu.Unlock()
	return spec
}

// nativeQueue probes the queue flavour once.
func (m *Manager) nativeQueue() (bool, error) {
	m.queue.mu.Lock()
	defer m.queue.mu.Unlock()
	if !m.queue.probed {
		native, err := m.probeNativeQueue()
		if err != nil {
			return false, err
		}
		m.queue.probed, m.queue.native = true, native
	}
	return m.queue.native, nil
}

func (m *Manager) nft() (*nftables.Conn, error) { return nftConn(m.netns, false) }

func (m *Manager) rtnl() (*rtnetlink.Conn, error) {
	c, err := rtnetlink.Dial(&netlink.Config{NetNS: m.netns})
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink: %w", err)
	}
	return c, nil
}

// Install programs the table and policy routing. It is idempotent: the
// table is replaced atomically in one transaction, and routing entries that
// already exist are kept. divert holds the tuples of live spliced flows
// (by queue index) to put back into the new divert sets in the same
// transaction, so that replacing the table never interrupts them. With
// Spec.OwnTable the table is made ours first (see owner), and its
// contents are replaced rather than the table.
func (m *Manager) Install(divert map[uint16][]splice.Key) error {
	c, o, err := m.lockedConn()
	if err != nil {
		return err
	}
	defer o.mu.Unlock()
	return m.installLocked(c, o, divert)
}

// installLocked is Install with the owner's socket held.
func (m *Manager) installLocked(c *nftables.Conn, o *owner, divert map[uint16][]splice.Key) error {
	spec, err := m.specProbed()
	if err != nil {
		return err
	}
	owned, err := o.prepareTable(spec.Table, spec.OwnTable)
	if err != nil {
		return err
	}
	if owned {
		err = queueReplace(c, &spec, divert)
	} else {
		err = queueTable(c, &spec, divert)
	}
	if err != nil {
		return errors.Join(err, o.discard(m.netns))
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", spec.Table, explainNFT(err))
	}
	return m.installRouting(&spec)
}

// specProbed is m's spec with the queue flavour probed.
func (m *Manager) specProbed() (Spec, error) {
	spec := m.spec
	if spec.Divert.Enabled {
		native, err := m.nativeQueue()
		if err != nil {
			return spec, err
		}
		spec.Divert.NativeQueue = native
	}
	return spec, nil
}

// installRouting adds spec's policy routing (what exists is kept).
func (m *Manager) installRouting(spec *Spec) error {
	rt, err := m.rtnl()
	if err != nil {
		return err
	}
	defer rt.Close()
	return installRouting(rt, spec)
}

// Repair is Install for a table someone changed (the drift check): when
// the table is there it is restored in place (queueInPlace), keeping its
// base chains, and so their hooks. Replacing it whole lets a packet a
// queue holds at that moment resume in the new table's hooks and pass
// the divert chain again: a spliced transparent flow's packet, whose
// tuple the rewrite keeps, was rewritten twice, and the flow stalled
// (TestLabTableEdited). Where that cannot be done (no table, a base
// chain changed) it replaces the table as Install does.
func (m *Manager) Repair(divert map[uint16][]splice.Key) error {
	c, o, err := m.lockedConn()
	if err != nil {
		return err
	}
	defer o.mu.Unlock()
	spec, err := m.specProbed()
	if err != nil {
		return err
	}
	if ok, err := tableExists(c, spec.Table); err != nil || !ok {
		return m.installLocked(c, o, divert)
	}
	// A table left orphaned (the socket was discarded) is adopted again.
	if _, err := o.prepareTable(spec.Table, spec.OwnTable); err != nil {
		return err
	}
	if err := queueInPlace(c, &spec, divert); err != nil {
		if err := o.discard(m.netns); err != nil {
			return err
		}
		return m.installLocked(o.c, o, divert)
	}
	if err := c.Flush(); err != nil {
		return m.installLocked(c, o, divert)
	}
	return m.installRouting(&spec)
}

// probeNativeQueue reports whether the kernel has the nft queue expression
// (CONFIG_NFT_QUEUE): it adds a throwaway table with a queue rule and
// deletes it in the same transaction, so nothing remains either way.
func (m *Manager) probeNativeQueue() (bool, error) {
	c, err := m.nft()
	if err != nil {
		return false, err
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: m.spec.Table + "_probe"}
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{Name: "probe", Table: t})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{&expr.Queue{Num: m.spec.Divert.Queue}}})
	c.DelTable(t)
	switch err := c.Flush(); {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	default:
		return false, fmt.Errorf("probe the nft queue expression: %w", explainNFT(err))
	}
}

// Remove deletes the table and our routing entries. What is already gone
// is not an error.
func (m *Manager) Remove() error {
	return m.remove("delete table inet %s", func(c *nftables.Conn) { c.DelTable(m.spec.table()) })
}

// Cleanup removes the kernel state of spec without needing the daemon that
// installed it, e.g. after `kill -9`: the table by name, ip rules of ours
// with the spec's mark, our routes in the spec's table. netns 0 is the
// caller's namespace. A table a live daemon owns is refused (see owner).
func Cleanup(spec Spec, netns int) error {
	m := NewManager(spec, WithNetNS(netns))
	defer m.Close()
	return m.Remove()
}

// CleanupKeepDivert is Cleanup for a dead daemon whose spliced flows a
// new daemon will adopt (spliced -cleanup -keep-flows): the services'
// rules go, so that nothing is intercepted any more (a SYN to a service
// port is routed on, not handed to a listener that is gone), and so does
// the policy routing, but the table stays with its divert chains and
// sets: the kept flows' packets still reach their queues, which drop
// them while no daemon reads them (no bypass), rather than reaching the
// ends unrewritten (a NAT flow's server would send them to the gateway's
// own address, whose stack answers with a reset). The next daemon
// replaces the table; what is already gone is not an error.
func CleanupKeepDivert(spec Spec, netns int) error {
	m := NewManager(spec, WithNetNS(netns))
	defer m.Close()
	return m.remove("remove the services of table inet %s", func(c *nftables.Conn) {
		c.FlushChain(&nftables.Chain{Name: ChainServices, Table: spec.table()})
	})
}

// remove queues removeTable's change to the table when it exists (what
// names it in an error), then removes our policy routing.
func (m *Manager) remove(what string, removeTable func(*nftables.Conn)) error {
	spec := m.spec
	var errs []error
	c, o, err := m.lockedConn()
	if err != nil {
		return err
	}
	if exists, err := tableExists(c, spec.Table); err != nil {
		errs = append(errs, err)
	} else if exists {
		removeTable(c)
		if err := c.Flush(); err != nil {
			if st, rerr := readTable(o.nl, spec.Table); rerr == nil && st.flags&tableFlagOwner != 0 && st.owner != o.nl.PID() {
				err = fmt.Errorf("the table is %w (netlink port %d, usually its pid): a spliced that is running removes it when it stops: %w", ErrTableOwned, st.owner, err)
			}
			errs = append(errs, fmt.Errorf(what+": %w", spec.Table, err))
		}
	}
	o.mu.Unlock()
	rt, err := m.rtnl()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer rt.Close()
	if err := removeRouting(rt, &spec); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// State reports what of spec is present in the kernel: whether the table
// exists and how many of our ip rules and routes there are.
func (m *Manager) State() (table bool, ipRules, routes int, err error) {
	c, err := m.nft()
	if err != nil {
		return false, 0, 0, err
	}
	if table, err = tableExists(c, m.spec.Table); err != nil {
		return false, 0, 0, err
	}
	rt, err := m.rtnl()
	if err != nil {
		return false, 0, 0, err
	}
	defer rt.Close()
	ipRules, routes, err = routingState(rt, &m.spec)
	return table, ipRules, routes, err
}

func tableExists(c *nftables.Conn, name string) (bool, error) {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// explainNFT adds what to do to kernel errors an operator can meet.
func explainNFT(err error) error {
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w (a kernel module is missing: spliced needs nf_tables with the socket, tproxy and (for splicing) nft_compat/xt_NFQUEUE or nft_queue expressions)", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w (needs CAP_NET_ADMIN: run as root or grant the capability)", err)
	}
	return err
}

// UpdateServices changes the installed table from the spec of the
// Manager that installed it, from, to m's: it replaces the services part
// (the services chain's rules and the services' sets) in one transaction,
// and leaves the base chains, their rules and the divert set as they are.
// It reports false, changing nothing, when it cannot: the table is
// missing, or the specs differ in more than their services (then Install
// is needed).
//
// A reload must not re-create the base chains. Re-creating them changes
// the kernel's list of prerouting hooks, and a packet that a queue holds
// meanwhile resumes, after its verdict, at its old position in the new
// list: it can pass the divert chain a second time and be rewritten
// twice (bytes delivered at the wrong offset), or skip a hook.
func (m *Manager) UpdateServices(from Spec) (bool, error) {
	spec := m.Spec()
	from.Divert.NativeQueue = spec.Divert.NativeQueue
	if from.Table != spec.Table || from.Mark != spec.Mark || from.CtMark != spec.CtMark || from.RouteTable != spec.RouteTable ||
		from.RulePriority != spec.RulePriority || from.Divert != spec.Divert || from.OwnTable != spec.OwnTable {
		return false, nil
	}
	c, o, err := m.lockedConn()
	if err != nil {
		return false, err
	}
	defer o.mu.Unlock()
	if ok, err := tableExists(c, spec.Table); err != nil || !ok {
		return false, err
	}
	t := spec.table()
	c.FlushChain(&nftables.Chain{Name: ChainServices, Table: t})
	for i := range from.Services {
		for _, d := range from.Services[i].sets() {
			c.DelSet(&nftables.Set{Table: t, Name: d.name})
		}
	}
	if err := queueServices(c, &spec, t, &nftables.Chain{Name: ChainServices, Table: t}); err != nil {
		return false, errors.Join(err, o.discard(m.netns))
	}
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("update the services of nftables table inet %s: %w", spec.Table, explainNFT(err))
	}
	return true, nil
}
