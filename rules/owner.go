package rules

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// An owned table. Debian's nftables service, and most firewall scripts,
// load their ruleset with `flush ruleset` first: that deleted spliced's
// table too, and until the daemon restored it (100-200 ms) the packets
// of spliced flows passed unrewritten; a NAT flow's were answered with
// resets by the gateway's own stack. The kernel can protect a table
// (Linux 5.12 and 6.9): a table created with the owner flag belongs to
// the netlink socket that created it, and no other socket may change or
// delete it; `flush ruleset` from another process leaves it in place.
// With the persist flag as well it outlives its owner's socket (a
// crash, kill -9, a restart): it is then orphaned, anyone may change it,
// and the next daemon adopts it. Without persist an owned table would die
// with the daemon, and the spliced flows a restart keeps with it, so a
// kernel without it (before 6.9) gets an unowned table as before.
//
// Ownership is per socket: everything that changes the table (install,
// repair, reload, the divert entries of every splice, the removal at
// stop) goes through one lasting netlink socket, the owner. The
// library (google/nftables v0.3.0) writes a table's flags as 0, so the
// table itself is created and adopted with a message of our own on the
// owner's socket, and a Manager that owns its table replaces the
// table's contents, never the table (queueReplace).

// Table flags (include/uapi/linux/netfilter/nf_tables.h) and the
// attribute that carries an owned table's owner.
const (
	tableFlagOwner   = 0x2 // NFT_TABLE_F_OWNER
	tableFlagPersist = 0x4 // NFT_TABLE_F_PERSIST
	attrTableOwner   = 7   // NFTA_TABLE_OWNER
)

// owner is the one lasting nftables socket of a Manager and of the
// Managers and Diverter derived from it.
type owner struct {
	mu sync.Mutex // one transaction at a time: messages are queued and flushed under it
	c  *nftables.Conn
	nl *netlink.Conn // the socket under c, for the table's own message
	// port is nl's netlink port, read without mu: the nftables monitor
	// tells our own changes from another process's by it (see
	// Manager.DivertDeletedByOthers).
	port atomic.Uint32
	// unsupported: the kernel has no persistent tables.
	unsupported bool
}

// lockedConn returns the owner's connection, opened on first use, with
// o.mu held; the caller unlocks it.
func (m *Manager) lockedConn() (*nftables.Conn, *owner, error) {
	o := m.own
	o.mu.Lock()
	if o.c == nil {
		if err := o.open(m.netns); err != nil {
			o.mu.Unlock()
			return nil, nil, err
		}
	}
	return o.c, o, nil
}

// open opens the lasting socket (o.mu held).
func (o *owner) open(netns int) error {
	var nl *netlink.Conn
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(func(c *netlink.Conn) error {
		nl = c
		return LargeBuffers(c)
	})}
	if netns != 0 {
		opts = append(opts, nftables.WithNetNSFd(netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("open nftables netlink: %w", err)
	}
	o.c, o.nl = c, nl
	if nl != nil {
		o.port.Store(nl.PID())
	}
	return nil
}

// discard drops the messages a failed build left queued on the socket
// (o.mu held): the library has no way to drop them but closing it. An
// owned table is orphaned by that, and adopted again by the next
// install.
func (o *owner) discard(netns int) error {
	o.c.CloseLasting()
	o.c, o.nl = nil, nil
	return o.open(netns)
}

// Close closes the Manager's netlink socket (shared with the Managers
// derived from it and its Diverter). An owned table stays, orphaned: a
// stopping daemon removes it first (Remove); a crashed one leaves it to
// the next.
func (m *Manager) Close() error {
	o := m.own
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.c == nil {
		return nil
	}
	err := o.c.CloseLasting()
	o.c, o.nl = nil, nil
	return err
}

// tableState is what the kernel says of a table.
type tableState struct {
	exists bool
	flags  uint32
	owner  uint32 // netlink port of its owner, with the owner flag
}

// readTable asks the kernel for table name of family inet.
func readTable(nl *netlink.Conn, name string) (tableState, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_TABLE_NAME, name)
	data, err := ae.Encode()
	if err != nil {
		return tableState{}, err
	}
	msgs, err := nl.Execute(netlink.Message{
		Header: netlink.Header{Type: nftType(unix.NFT_MSG_GETTABLE), Flags: netlink.Request},
		Data:   append(nfgenmsg(unix.NFPROTO_INET, 0), data...),
	})
	if errors.Is(err, unix.ENOENT) {
		return tableState{}, nil
	}
	if err != nil {
		return tableState{}, fmt.Errorf("read nftables table inet %s: %w", name, err)
	}
	st := tableState{exists: true}
	for _, msg := range msgs {
		if msg.Header.Type != nftType(unix.NFT_MSG_NEWTABLE) || len(msg.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(msg.Data[4:])
		if err != nil {
			return tableState{}, err
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_TABLE_FLAGS:
				st.flags = ad.Uint32()
			case attrTableOwner:
				st.owner = ad.Uint32()
			}
		}
		if err := ad.Err(); err != nil {
			return tableState{}, err
		}
	}
	return st, nil
}

// ErrTableOwned: the table belongs to another process's socket.
var ErrTableOwned = errors.New("owned by another process")

// prepareTable readies table name for an install and reports whether it
// is ours (owned through this socket). With own, the table is made ours
// (owner and persist flags): created, adopted when a daemon that died
// left it orphaned, or, when it is unowned (left by a spliced before
// owned tables, or by `kernel.own_table: off`), replaced by an empty
// owned one, which empties it until the install that follows (a
// millisecond or so). On a kernel without persistent tables it stays
// unowned. Without own, a table a daemon with own left orphaned is
// deleted, as the library's messages cannot match its flags.
func (o *owner) prepareTable(name string, own bool) (bool, error) {
	st, err := readTable(o.nl, name)
	if err != nil {
		return false, err
	}
	ours := st.flags&tableFlagOwner != 0 && st.owner == o.nl.PID()
	var msgs []netlink.Message
	switch {
	case ours && own:
		return true, nil
	case st.flags&tableFlagOwner != 0 && !ours:
		return false, fmt.Errorf("nftables table inet %s is %w (netlink port %d, usually its pid): another spliced with this kernel.table runs in this network namespace; stop it, or give this one another kernel.table: %w",
			name, ErrTableOwned, st.owner, unix.EPERM)
	case st.exists && (own && !o.unsupported) != (st.flags&tableFlagPersist != 0):
		msgs = append(msgs, tableMessage(unix.NFT_MSG_DELTABLE, name, 0))
	}
	if !own || o.unsupported {
		if len(msgs) > 0 {
			if err := o.batch(msgs); err != nil {
				return false, fmt.Errorf("delete nftables table inet %s: %w", name, err)
			}
		}
		return false, nil
	}
	// Creates the table, or (orphaned: persist without owner) adopts it.
	msgs = append(msgs, tableMessage(unix.NFT_MSG_NEWTABLE, name, tableFlagOwner|tableFlagPersist))
	switch err := o.batch(msgs); {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL):
		// A kernel before 6.9 refuses the persist flag (the batch
		// changed nothing): 5.12 to 6.8 with EOPNOTSUPP, one before
		// 5.12 (no owner flag either) with EINVAL, as it refuses any
		// flag but dormant.
		o.unsupported = true
		return false, nil
	default:
		return false, fmt.Errorf("take nftables table inet %s: %w", name, err)
	}
}

// tableMessage is a NEWTABLE or DELTABLE message for table name of
// family inet, asking for an acknowledgement.
func tableMessage(msgType int, name string, flags uint32) netlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.String(unix.NFTA_TABLE_NAME, name)
	if msgType == unix.NFT_MSG_NEWTABLE {
		ae.Uint32(unix.NFTA_TABLE_FLAGS, flags)
	}
	data, _ := ae.Encode() // a string and an integer: cannot fail
	hf := netlink.Request | netlink.Acknowledge
	if msgType == unix.NFT_MSG_NEWTABLE {
		hf |= netlink.Create
	}
	return netlink.Message{
		Header: netlink.Header{Type: nftType(msgType), Flags: hf},
		Data:   append(nfgenmsg(unix.NFPROTO_INET, 0), data...),
	}
}

// batch sends msgs (each asking for an acknowledgement) as one
// transaction on the owner's socket and returns the first error the
// kernel answered with.
func (o *owner) batch(msgs []netlink.Message) error {
	begin := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: netlink.Request},
		Data:   nfgenmsg(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	}
	end := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_END), Flags: netlink.Request},
		Data:   nfgenmsg(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	}
	if _, err := o.nl.SendMessages(append(append([]netlink.Message{begin}, msgs...), end)); err != nil {
		return err
	}
	// One answer per message: its acknowledgement or its error. A
	// deadline, so that a kernel that answers less cannot hang us.
	if err := o.nl.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	defer o.nl.SetReadDeadline(time.Time{})
	var first error
	for range msgs {
		if _, err := o.nl.Receive(); err != nil && first == nil {
			first = err
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
		}
	}
	return first
}

// nftType is the netlink message type of an nf_tables message.
func nftType(msg int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | msg)
}

// nfgenmsg is the nfnetlink header: family, version 0, resource id.
func nfgenmsg(family uint8, resID uint16) []byte {
	b := []byte{family, unix.NFNETLINK_V0, 0, 0}
	binary.BigEndian.PutUint16(b[2:], resID)
	return b
}
