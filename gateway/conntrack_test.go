package gateway

import (
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"spliced/splice"
	"spliced/testnet"
)

// TestConntrackLoosenAndForget: at a splice the flow's entries stay and
// take liberal window tracking in both directions, their state kept
// (the update sends only the two flag bytes); at the flow's end they
// are deleted, whichever way they run. NAT: the client's connection and
// the gateway's to the server are two entries.
func TestConntrackLoosenAndForget(t *testing.T) {
	testnet.Privileged(t, "conntrack")
	ns := testnet.Scratch(t)
	client := netip.MustParseAddrPort("10.1.0.2:40000")
	service := netip.MustParseAddrPort("10.2.0.2:80")
	upstream := netip.MustParseAddrPort("10.2.0.1:50000")
	backend := netip.MustParseAddrPort("10.2.0.2:8080")
	insert := func(src, dst netip.AddrPort) {
		t.Helper()
		if out, err := ns.Run("conntrack", "-I", "-p", "tcp", "-s", src.Addr().String(), "--sport", fmt.Sprint(src.Port()),
			"-d", dst.Addr().String(), "--dport", fmt.Sprint(dst.Port()), "--state", "ESTABLISHED", "--timeout", "600"); err != nil {
			t.Fatalf("conntrack -I: %v %s", err, out)
		}
	}
	insert(client, service)
	// The gateway's entry to the server runs the other way, as if the
	// server's packet had started it: found all the same.
	insert(backend, upstream)
	keys := [2]splice.Key{splice.KeyFrom(client, service), splice.KeyFrom(backend, upstream)}

	var c *conntrackCleaner
	var query *conntrack.Conn
	if err := ns.Do(func() (err error) {
		c = newConntrackCleaner(slog.New(slog.DiscardHandler))
		query, err = conntrack.Dial(nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if c == nil {
		t.Fatal("no ctnetlink")
	}
	defer query.Close()
	// ti-mo/conntrack's Get waits forever on this kernel (see
	// loosenMessage); a dump ends as it should.
	get := func(src, dst netip.AddrPort) (conntrack.Flow, error) {
		flows, err := query.Dump(nil)
		if err != nil {
			return conntrack.Flow{}, err
		}
		for _, f := range flows {
			o := f.TupleOrig
			if o.IP.SourceAddress == src.Addr() && o.IP.DestinationAddress == dst.Addr() && o.Proto.SourcePort == src.Port() && o.Proto.DestinationPort == dst.Port() {
				return f, nil
			}
		}
		return conntrack.Flow{}, fmt.Errorf("no entry %v -> %v", src, dst)
	}
	before, err := get(client, service)
	if err != nil {
		t.Fatal(err)
	}

	c.loosen(keys)
	if err := testnet.Poll(10*time.Second, func() error {
		if n := c.loosened.Load(); n != 2 {
			return fmt.Errorf("%d entries loosened, failed %d", n, c.failed.Load())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, tuple := range [][2]netip.AddrPort{{client, service}, {backend, upstream}} {
		f, err := get(tuple[0], tuple[1])
		if err != nil {
			t.Fatal(err)
		}
		tcp := f.ProtoInfo.TCP
		if tcp == nil || tcp.OriginalFlags>>8&ctTCPBeLiberal == 0 || tcp.ReplyFlags>>8&ctTCPBeLiberal == 0 {
			t.Errorf("%v: not liberal both ways: %+v", tuple, tcp)
			continue
		}
		if tcp.State != before.ProtoInfo.TCP.State {
			t.Errorf("%v: state %d, was %d", tuple, tcp.State, before.ProtoInfo.TCP.State)
		}
	}

	c.forget(keys)
	if err := testnet.Poll(10*time.Second, func() error {
		for _, tuple := range [][2]netip.AddrPort{{client, service}, {backend, upstream}} {
			if _, err := get(tuple[0], tuple[1]); err == nil {
				return fmt.Errorf("%v still tracked", tuple)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d, f := c.deleted.Load(), c.failed.Load(); d != 2 || f != 0 {
		t.Errorf("deleted %d, failed %d; want 2 and 0", d, f)
	}
}

// TestConntrackForgetBurst: the reaper retires every flow that ended or
// went idle in a round at once (flows spliced together go idle
// together) and queues their entries' deletion in one loop. Every entry
// goes: the cleaner's queue of 4,096 dropped the rest, whose entries
// stayed ESTABLISHED for days (nf_conntrack_tcp_timeout_established)
// and, burst after burst, filled the router's conntrack table.
func TestConntrackForgetBurst(t *testing.T) {
	testnet.Privileged(t, "conntrack")
	ns := testnet.Scratch(t)
	const flows = 10000
	service := netip.MustParseAddrPort("10.2.0.2:80")
	keys := make([][2]splice.Key, flows)
	var c *conntrackCleaner
	var query *conntrack.Conn
	if err := ns.Do(func() (err error) {
		if query, err = conntrack.Dial(nil); err != nil {
			return err
		}
		for i := range keys {
			client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 40000)
			keys[i] = [2]splice.Key{splice.KeyFrom(client, service), splice.KeyFrom(service, client)}
			f := conntrack.NewFlow(unix.IPPROTO_TCP, 0, client.Addr(), service.Addr(), client.Port(), service.Port(), 600, 0)
			f.ProtoInfo.TCP = &conntrack.ProtoInfoTCP{State: 3} // ESTABLISHED
			if err := query.Create(f); err != nil {
				return fmt.Errorf("create entry %d: %w", i, err)
			}
		}
		c = newConntrackCleaner(slog.New(slog.DiscardHandler))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if c == nil {
		t.Fatal("no ctnetlink")
	}
	defer query.Close()
	for _, k := range keys {
		c.forget(k)
	}
	if err := c.Close(); err != nil { // after the queued work
		t.Fatal(err)
	}
	if d, f := c.deleted.Load(), c.failed.Load(); d != flows || f != 0 {
		t.Errorf("deleted %d, failed %d; want %d and 0", d, f, flows)
	}
	left, err := query.Dump(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("%d of %d entries left in the table", len(left), flows)
	}
}
