package rules

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/config"
	"spliced/splice"
	"spliced/testnet"
)

// TestInstallAtScale: the table goes in as one transaction, and that
// transaction grows with kernel.queues (two sets and their rules per
// queue) and with the divert entries of live spliced flows it carries
// (a restart that adopts them, a repair). A machine with 12 CPUs or more
// (kernel.queues defaults to one per CPU, at most 64) could not start:
// the kernel's acknowledgements overflowed the netlink socket's receive
// buffer ("recvmsg: no buffer space available", from 12 queues), and
// from about 40 queues the batch was larger than its send buffer
// ("sendmsg: message too long"). So could a repair or a restart with
// some thousand spliced flows.
func TestInstallAtScale(t *testing.T) {
	testnet.Privileged(t, "nft")
	for _, c := range []struct {
		queues uint16
		flows  int
	}{{config.MaxQueues, 0}, {2, 50000}, {config.MaxQueues, 50000}} {
		t.Run(fmt.Sprintf("queues=%d/flows=%d", c.queues, c.flows), func(t *testing.T) {
			spec := sampleSpec(t)
			spec.Divert.Enabled = true
			spec.Divert.Queues = c.queues
			divert := map[uint16][]splice.Key{}
			for i := range c.flows {
				a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), uint16(1024+i%60000))
				b := netip.AddrPortFrom(netip.MustParseAddr("10.2.0.2"), 443)
				q := uint16(i) % c.queues
				divert[q] = append(divert[q], splice.KeyFrom(a, b), splice.KeyFrom(b, a))
			}
			ns := testnet.Scratch(t)
			m := NewManager(spec, WithNetNS(ns.OpenT(t)))
			if err := m.Install(divert); err != nil {
				t.Fatalf("install: %v", err)
			}
			if err := m.Repair(divert); err != nil {
				t.Fatalf("repair: %v", err)
			}
			out, err := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(c.queues-1, false))
			if err != nil {
				t.Fatal(err)
			}
			if want := len(divert[c.queues-1]); want > 0 && countElements(out) != want {
				t.Errorf("set of the last queue holds %d elements, want %d", countElements(out), want)
			}
			if c.flows == 0 {
				return
			}
			// The flows end together (one DeleteMany, as the
			// retirement of a busy router's ended flows).
			d, err := m.NewDiverter()
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := d.DeleteMany(divert); err != nil {
				t.Fatalf("delete every flow's entries at once: %v", err)
			}
			t.Logf("%d flows' entries deleted in %v", c.flows, time.Since(start).Round(time.Millisecond))
			for _, set := range []string{DivertSetName(c.queues-1, false), DivertAnySetName(false)} {
				out, err := ns.Run("nft", "list", "set", "inet", spec.Table, set)
				if err != nil {
					t.Fatal(err)
				}
				if n := countElements(out); n != 0 {
					t.Errorf("set %s holds %d elements after the flows ended, want none", set, n)
				}
			}
		})
	}
}

// countElements counts the elements of a divert set in nft's listing:
// each is a concatenation of four fields joined by " . " (as is the
// set's type, before the elements).
func countElements(listing string) int {
	_, els, _ := strings.Cut(listing, "elements =")
	return strings.Count(els, " . ") / 3
}
