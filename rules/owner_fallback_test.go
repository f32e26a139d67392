package rules

import (
	"encoding/binary"
	"iter"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// fakeKernel is a netlink socket that answers the table messages of
// prepareTable as a kernel without persistent tables does: GETTABLE
// with the table (flags 0) or ENOENT, each message of a batch with its
// acknowledgement, and a NEWTABLE with the persist flag with refuse.
// One reply per receive, as the kernel sends them.
type fakeKernel struct {
	exists  bool
	refuse  unix.Errno
	replies []netlink.Message
	sent    []netlink.HeaderType
}

func (k *fakeKernel) Close() error                     { return nil }
func (k *fakeKernel) SetDeadline(time.Time) error      { return nil }
func (k *fakeKernel) SetReadDeadline(time.Time) error  { return nil }
func (k *fakeKernel) SetWriteDeadline(time.Time) error { return nil }
func (k *fakeKernel) Send(m netlink.Message) error     { return k.SendMessages([]netlink.Message{m}) }
func (k *fakeKernel) SendMessages(ms []netlink.Message) error {
	for _, m := range ms {
		k.sent = append(k.sent, m.Header.Type)
		switch m.Header.Type {
		case netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), netlink.HeaderType(unix.NFNL_MSG_BATCH_END):
		case nftType(unix.NFT_MSG_GETTABLE):
			if !k.exists {
				k.replies = append(k.replies, errorReply(m, unix.ENOENT))
				continue
			}
			ae := netlink.NewAttributeEncoder()
			ae.ByteOrder = binary.BigEndian
			ae.String(unix.NFTA_TABLE_NAME, "t")
			ae.Uint32(unix.NFTA_TABLE_FLAGS, 0)
			data, _ := ae.Encode()
			k.replies = append(k.replies, netlink.Message{
				Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWTABLE), Sequence: m.Header.Sequence, PID: m.Header.PID},
				Data:   append(nfgenmsg(unix.NFPROTO_INET, 0), data...),
			})
		case nftType(unix.NFT_MSG_NEWTABLE):
			k.replies = append(k.replies, errorReply(m, k.refuse))
		default:
			k.replies = append(k.replies, errorReply(m, 0))
		}
	}
	return nil
}

func (k *fakeKernel) Receive() ([]netlink.Message, error) {
	var out []netlink.Message
	for m, err := range k.ReceiveIter() {
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

func (k *fakeKernel) ReceiveIter() iter.Seq2[netlink.Message, error] {
	return func(yield func(netlink.Message, error) bool) {
		if len(k.replies) == 0 {
			yield(netlink.Message{}, unix.EAGAIN)
			return
		}
		m := k.replies[0]
		k.replies = k.replies[1:]
		yield(m, nil)
	}
}

// errorReply is the kernel's NLMSG_ERROR answer to m (errno 0: its
// acknowledgement).
func errorReply(m netlink.Message, errno unix.Errno) netlink.Message {
	b := make([]byte, 4+16)
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return netlink.Message{Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence, PID: m.Header.PID}, Data: b}
}

// TestPrepareTableWithoutPersist: a kernel that refuses the persist
// flag gets an unowned table, whether it says EOPNOTSUPP (Linux 5.12 to
// 6.8) or EINVAL (before 5.12, which knows no flag but dormant); the
// install goes on the old way, and the next one does not ask again.
func TestPrepareTableWithoutPersist(t *testing.T) {
	for _, refuse := range []unix.Errno{unix.EOPNOTSUPP, unix.EINVAL} {
		for _, exists := range []bool{false, true} {
			k := &fakeKernel{exists: exists, refuse: refuse}
			o := &owner{nl: netlink.NewConn(k, 1234)}
			owned, err := o.prepareTable("t", true)
			if err != nil || owned || !o.unsupported {
				t.Errorf("%v, table present %v: owned %v, unsupported %v, err %v; want an unowned table and no error",
					refuse, exists, owned, o.unsupported, err)
				continue
			}
			if len(k.replies) != 0 {
				t.Errorf("%v, table present %v: %d replies left unread on the socket", refuse, exists, len(k.replies))
			}
			k.sent = nil
			if owned, err := o.prepareTable("t", true); err != nil || owned {
				t.Errorf("%v, table present %v: second prepare: owned %v, err %v", refuse, exists, owned, err)
			}
			for _, typ := range k.sent {
				if typ != nftType(unix.NFT_MSG_GETTABLE) {
					t.Errorf("%v, table present %v: second prepare sent %v; want the table read only", refuse, exists, typ)
				}
			}
		}
	}
}
