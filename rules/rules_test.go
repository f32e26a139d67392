package rules

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

	"spliced/config"
	"spliced/splice"
	"spliced/testnet"
)

const sampleConfig = `
kernel:
  table: spl_rt
  mark: 0x5c1
  queue: 200
  queues: 2
services:
  - name: web
    listen: 15001
    ports: ["80", "8000-8100", "8050"]
    destinations: [10.2.0.0/16, 10.2.3.0/24, "fd00:2::/32"]
  - name: any
    listen: 15002
    ports: ["5201", "60000-65535"]
    splice:
      mode: immediate
  - name: src6
    listen: 15003
    ports: ["21"]
    sources: ["fd00:1::/48"]
    destinations: [10.9.0.7, "::/0"]
`

func sampleSpec(t *testing.T) Spec {
	t.Helper()
	cfg, err := config.Parse("sample.yaml", []byte(sampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	return FromConfig(cfg)
}

func TestSpecMergesAndSplits(t *testing.T) {
	spec := sampleSpec(t)
	web := spec.Services[0]
	if got := len(web.Ports); got != 2 {
		t.Errorf("ports not merged: %v", web.Ports)
	}
	if len(web.Dst4) != 1 || web.Dst4[0].String() != "10.2.0.0/16" || len(web.Dst6) != 1 {
		t.Errorf("destinations: %v %v", web.Dst4, web.Dst6)
	}
	if v4, v6 := spec.Services[2].Families(); v4 || !v6 {
		t.Errorf("src6 families = %v %v, want IPv6 only", v4, v6)
	}
}

// TestRoundTrip programs the table with Go (netlink) in a scratch
// namespace and compares `nft list table` with Render, which is what
// `spliced -check` prints. Without divert rules it also loads Render's
// output with `nft -f` into a second namespace and compares that listing,
// proving the text is real nft syntax.
func TestRoundTrip(t *testing.T) {
	testnet.Privileged(t, "nft")
	for _, c := range []struct {
		divert   bool
		skipMark uint32
	}{{false, 0}, {true, 0}, {true, 0x20000000}} {
		divert := c.divert
		t.Run(fmt.Sprintf("divert=%v/skip_mark=%#x", divert, c.skipMark), func(t *testing.T) {
			spec := sampleSpec(t)
			spec.Divert.Enabled = divert
			spec.Divert.SkipMark = c.skipMark
			ns := testnet.Scratch(t)
			m := NewManager(spec, WithNetNS(ns.OpenT(t)))
			for i := 0; i < 2; i++ { // the second install proves idempotence
				if err := m.Install(nil); err != nil {
					t.Fatalf("install #%d: %v", i+1, err)
				}
			}
			spec = m.Spec() // with the queue flavour Install probed
			listed, err := ns.Run("nft", "list", "table", "inet", spec.Table)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(Listing(spec), StripRuntime(listed)); diff != "" {
				t.Fatalf("kernel listing differs (-want +kernel):\n%s", diff)
			}
			if divert {
				checkQueueTarget(t, ns, &spec)
				return
			}
			want := Render(spec)
			ns2 := testnet.Scratch(t)
			cmd := ns2.Command(t.Context(), "nft", "-f", "-")
			cmd.Stdin = strings.NewReader(want)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("nft -f of Render output: %v\n%s", err, out)
			}
			listed2, err := ns2.Run("nft", "list", "table", "inet", spec.Table)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, listed2); diff != "" {
				t.Fatalf("nft -f of Render does not list as Render (-render +kernel):\n%s", diff)
			}

			table, ipRules, routes, err := m.State()
			if err != nil || !table || ipRules != 2 || routes != 2 {
				t.Fatalf("state after install: table=%v rules=%d routes=%d err=%v", table, ipRules, routes, err)
			}
			rulesOut, _ := ns.Run("ip", "rule")
			if !strings.Contains(rulesOut, "fwmark 0x5c1/0x5c1 lookup 100 proto 92") {
				t.Errorf("ip rule lacks ours:\n%s", rulesOut)
			}
			routesOut, _ := ns.Run("ip", "-6", "route", "show", "table", "100")
			if !strings.Contains(routesOut, "local default dev lo proto 92") {
				t.Errorf("ip -6 route table 100 lacks ours:\n%s", routesOut)
			}
		})
	}
}

// checkQueueTarget reads the divert rules back through netlink and checks
// the queue they end in: queue numbers, total, and no bypass or fail-open
// but for path MTU errors.
func checkQueueTarget(t *testing.T, ns *testnet.NS, spec *Spec) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(ns.OpenT(t)))
	if err != nil {
		t.Fatal(err)
	}
	rules, err := c.GetRules(spec.table(), &nftables.Chain{Name: ChainDivert, Table: spec.table()})
	if err != nil {
		t.Fatal(err)
	}
	if spec.Divert.SkipMark != 0 {
		// The first rule accepts what the kernel datapath rewrote.
		if len(rules) == 0 {
			t.Fatal("no divert rules")
		}
		last := rules[0].Exprs[len(rules[0].Exprs)-1]
		if v, ok := last.(*expr.Verdict); !ok || v.Kind != expr.VerdictAccept {
			t.Fatalf("the skip rule ends in %#v", last)
		}
		rules = rules[1:]
	}
	// The gate: per family one lookup in the set of every queue's
	// tuples, then the ICMP errors; each a goto.
	if len(rules) != 4 {
		t.Fatalf("divert rules after the skip rule: %d, want 4", len(rules))
	}
	for i, r := range rules {
		want := []string{ChainDivertQueues, ChainDivertQueues, ChainDivertPMTU, ChainDivertPMTU}[i]
		if v, ok := r.Exprs[len(r.Exprs)-1].(*expr.Verdict); !ok || v.Kind != expr.VerdictGoto || v.Chain != want {
			t.Errorf("divert rule %d ends in %#v, want a goto %s", i, r.Exprs[len(r.Exprs)-1], want)
		}
	}
	queues, err := c.GetRules(spec.table(), &nftables.Chain{Name: ChainDivertQueues, Table: spec.table()})
	if err != nil {
		t.Fatal(err)
	}
	pmtu, err := c.GetRules(spec.table(), &nftables.Chain{Name: ChainDivertPMTU, Table: spec.table()})
	if err != nil {
		t.Fatal(err)
	}
	if len(queues) != 2*int(spec.Divert.Queues) || len(pmtu) != 2*int(spec.Divert.Queues) {
		t.Fatalf("%d queue rules and %d path MTU rules, want 2 per queue each", len(queues), len(pmtu))
	}
	rules = nil
	for i := range queues {
		rules = append(rules, queues[i], pmtu[i])
	}
	for i, r := range rules {
		// Per queue, per family: the tuple rule, then the path MTU
		// error rule, which alone bypasses a queue nobody listens on.
		want := spec.Divert.Queue + uint16(i/4)
		wantFlags := uint16(i % 2)
		switch e := r.Exprs[len(r.Exprs)-1].(type) {
		case *expr.Queue:
			if e.Num != want || e.Total != 1 || uint16(e.Flag) != wantFlags {
				t.Errorf("queue expression %+v", e)
			}
		case *expr.Target:
			info := *e.Info.(*xt.Unknown)
			if e.Name != "NFQUEUE" || e.Rev != 3 || len(info) < 6 {
				t.Fatalf("target %+v", e)
			}
			num, total, flags := binary.NativeEndian.Uint16(info), binary.NativeEndian.Uint16(info[2:]), binary.NativeEndian.Uint16(info[4:])
			if num != want || total != 1 || flags != wantFlags {
				t.Errorf("rule %d: NFQUEUE target num %d total %d flags %#x, want %d 1 %#x", i, num, total, flags, want, wantFlags)
			}
		default:
			t.Fatalf("divert rule ends in %T", e)
		}
	}
	// The output chain: per queue, per family, the command rule (a
	// drop) and the path MTU error rule, which bypasses.
	cmds, err := c.GetRules(spec.table(), &nftables.Chain{Name: ChainDivertCommand, Table: spec.table()})
	if err != nil {
		t.Fatal(err)
	}
	if len(cmds) != 4*int(spec.Divert.Queues) {
		t.Fatalf("divertcmd rules: %d", len(cmds))
	}
	for i, r := range cmds {
		last := r.Exprs[len(r.Exprs)-1]
		if i%2 == 0 {
			if v, ok := last.(*expr.Verdict); !ok || v.Kind != expr.VerdictDrop {
				t.Errorf("divertcmd rule %d ends in %#v, want drop", i, last)
			}
			continue
		}
		want := spec.Divert.Queue + uint16(i/4)
		switch e := last.(type) {
		case *expr.Queue:
			if e.Num != want || e.Flag != expr.QueueFlagBypass {
				t.Errorf("divertcmd rule %d: queue expression %+v", i, e)
			}
		case *expr.Target:
			info := *e.Info.(*xt.Unknown)
			if num, flags := binary.NativeEndian.Uint16(info), binary.NativeEndian.Uint16(info[4:]); num != want || flags != xtNFQBypass {
				t.Errorf("divertcmd rule %d: NFQUEUE target num %d flags %#x, want %d %#x", i, num, flags, want, xtNFQBypass)
			}
		default:
			t.Fatalf("divertcmd rule %d ends in %T", i, e)
		}
	}
}

// TestDiverter adds and deletes flow elements in both families.
// installedDiverter installs spec in a scratch namespace and opens a
// Diverter on it, closed when the test ends.
func installedDiverter(t *testing.T, spec Spec) (*Diverter, *testnet.NS) {
	t.Helper()
	testnet.Privileged(t, "nft")
	ns := testnet.Scratch(t)
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	d, err := m.NewDiverter()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, ns
}

func TestDiverter(t *testing.T) {
	spec := sampleSpec(t)
	d, ns := installedDiverter(t, spec)
	k4 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	k6 := splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:40000"), netip.MustParseAddrPort("[fd00:2::2]:80"))
	if err := d.Add(1, k4, k4.Reverse(), k6); err != nil {
		t.Fatal(err)
	}
	out, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false))
	for _, want := range []string{"10.1.0.2 . 40000 . 10.2.0.2 . 80", "10.2.0.2 . 80 . 10.1.0.2 . 40000"} {
		if !strings.Contains(out, want) {
			t.Errorf("divert4 lacks %q:\n%s", want, out)
		}
	}
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, true))
	if !strings.Contains(out, "fd00:1::2 . 40000 . fd00:2::2 . 80") {
		t.Errorf("divert6 lacks the flow:\n%s", out)
	}
	// The gate's sets hold every queue's tuples.
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertAnySetName(false))
	for _, want := range []string{"10.1.0.2 . 40000 . 10.2.0.2 . 80", "10.2.0.2 . 80 . 10.1.0.2 . 40000"} {
		if !strings.Contains(out, want) {
			t.Errorf("divert4_any lacks %q:\n%s", want, out)
		}
	}
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertAnySetName(true))
	if !strings.Contains(out, "fd00:1::2 . 40000 . fd00:2::2 . 80") {
		t.Errorf("divert6_any lacks the flow:\n%s", out)
	}
	if err := d.Delete(1, k4, k6); err != nil {
		t.Fatal(err)
	}
	if err := d.Delete(1, k4, k4.Reverse()); err != nil { // k4 is gone already
		t.Fatalf("delete with a missing element: %v", err)
	}
	out, _ = ns.Run("nft", "list", "table", "inet", spec.Table)
	if strings.Contains(out, "40000") {
		t.Errorf("elements left:\n%s", out)
	}
}

// TestDiverterTuples: a diverter lists what the table's divert sets hold,
// both families and every queue, and nothing where no table is
// installed; a daemon that starts reads so what a killed one left.
func TestDiverterTuples(t *testing.T) {
	spec := sampleSpec(t)
	d, _ := installedDiverter(t, spec)
	k4 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	k6 := splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:40000"), netip.MustParseAddrPort("[fd00:2::2]:80"))
	if err := d.Add(0, k4, k6); err != nil {
		t.Fatal(err)
	}
	if err := d.Add(1, k4.Reverse(), k6.Reverse()); err != nil {
		t.Fatal(err)
	}
	got, err := d.Tuples()
	if err != nil {
		t.Fatal(err)
	}
	want := map[splice.Key]bool{k4: true, k4.Reverse(): true, k6: true, k6.Reverse(): true}
	if len(got) != len(want) {
		t.Errorf("tuples %v, want %d", got, len(want))
	}
	for _, k := range got {
		if !want[k] {
			t.Errorf("tuple %v listed, not added", k)
		}
	}

	ns := testnet.Scratch(t)
	empty, err := NewManager(spec, WithNetNS(ns.OpenT(t))).NewDiverter()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := empty.Tuples(); err != nil || len(got) != 0 {
		t.Errorf("without a table: tuples %v, %v; want none", got, err)
	}
}

// TestDiverterGroupsAdds: adds that queue while a transaction runs are
// committed together in the next one, and a request that fails the
// group's transaction fails alone.
func TestDiverterGroupsAdds(t *testing.T) {
	spec := sampleSpec(t)
	d, ns := installedDiverter(t, spec)
	key := func(i int) splice.Key {
		return splice.KeyFrom(netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), uint16(20000+i)), netip.MustParseAddrPort("10.2.0.2:80"))
	}
	const n = 40
	errs := make([]error, n+1)
	var wg sync.WaitGroup
	d.Exclusive(func() { // a transaction running: every Add queues
		for i := range n + 1 {
			q := uint16(1)
			if i == n {
				q = 7 // no such queue's set: the group's transaction fails
			}
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = d.Add(q, key(i), key(i).Reverse()) }()
		}
		for {
			d.pendingMu.Lock()
			queued := len(d.pending)
			d.pendingMu.Unlock()
			if queued == n+1 {
				break
			}
			runtime.Gosched()
		}
	})
	wg.Wait()
	for i, err := range errs[:n] {
		if err != nil {
			t.Errorf("add %d: %v", i, err)
		}
	}
	if errs[n] == nil {
		t.Error("add to a queue without a set: no error")
	}
	if c := d.addCommits.Load(); c != 1 {
		t.Errorf("%d groups committed, want 1 (%d adds queued together)", c, n+1)
	}
	out, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false))
	for i := range n {
		for _, want := range []string{fmt.Sprintf("10.1.0.2 . %d . 10.2.0.2 . 80", 20000+i), fmt.Sprintf("10.2.0.2 . 80 . 10.1.0.2 . %d", 20000+i)} {
			if !strings.Contains(out, want) {
				t.Errorf("divert4 lacks %q", want)
			}
		}
	}
}

// TestDiverterRefresh: a refresh restarts the timeout of existing elements
// and recreates lost ones, in both families.
func TestDiverterRefresh(t *testing.T) {
	spec := sampleSpec(t)
	spec.Divert.Timeout = 3 * time.Second
	d, ns := installedDiverter(t, spec)
	k4 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	k6 := splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:40000"), netip.MustParseAddrPort("[fd00:2::2]:80"))
	if err := d.Add(0, k4, k6); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)                                // 1 s of the 3 s left
	live := map[uint16][]splice.Key{0: {k4, k6, k4.Reverse()}} // k4.Reverse() was never added
	n, err := d.Refresh(func() map[uint16][]splice.Key { return live })
	if err != nil || n != 3 {
		t.Fatalf("refresh: %d tuples, %v", n, err)
	}
	time.Sleep(1500 * time.Millisecond) // past the first timeout
	out4, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(0, false))
	out6, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(0, true))
	for _, want := range []string{"10.1.0.2 . 40000 . 10.2.0.2 . 80", "10.2.0.2 . 80 . 10.1.0.2 . 40000", "fd00:1::2 . 40000 . fd00:2::2 . 80"} {
		if !strings.Contains(out4+out6, want) {
			t.Errorf("after the refresh and 3.5 s, the sets lack %q:\n%s%s", want, out4, out6)
		}
	}
}

// TestRemoveTouchesOnlyOurs installs next to an operator's own table, rule
// and route, then removes: only ours disappears.
func TestRemoveTouchesOnlyOurs(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	ns := testnet.Scratch(t)
	for _, args := range [][]string{
		{"nft", "add table inet operator"},
		{"nft", "add chain inet operator input { type filter hook input priority 0; }"},
		{"ip", "rule add fwmark 0x7 lookup 100 priority 50"},
		{"ip", "route add local 192.0.2.0/24 dev lo table 100"},
	} {
		if _, err := ns.Run(args[0], strings.Fields(args[1])...); err != nil {
			t.Fatal(err)
		}
	}
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	table, ipRules, routes, err := m.State()
	if err != nil || table || ipRules != 0 || routes != 0 {
		t.Fatalf("after remove: table=%v rules=%d routes=%d err=%v", table, ipRules, routes, err)
	}
	if out, _ := ns.Run("nft", "list", "tables"); !strings.Contains(out, "table inet operator") {
		t.Errorf("operator's table is gone:\n%s", out)
	}
	if out, _ := ns.Run("ip", "rule"); !strings.Contains(out, "fwmark 0x7 lookup 100") {
		t.Errorf("operator's rule is gone:\n%s", out)
	}
	if out, _ := ns.Run("ip", "route", "show", "table", "100"); !strings.Contains(out, "192.0.2.0/24") {
		t.Errorf("operator's route is gone:\n%s", out)
	}
}

// TestUpdateServices: a reload's update replaces the services' rules and
// sets so that the table lists exactly as a fresh install of the new spec,
// while the base chains stay the same objects (their handles do not
// change: the kernel's hook list is untouched) and the divert set keeps
// its elements.
func TestUpdateServices(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	ns := testnet.Scratch(t)
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	flow := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	if err := m.Install(map[uint16][]splice.Key{0: {flow}}); err != nil {
		t.Fatal(err)
	}
	handles := func() string {
		out, err := ns.Run("nft", "-a", "list", "chains", "inet")
		if err != nil {
			t.Fatal(err)
		}
		var hooked []string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "chain "+ChainPrerouting) || strings.Contains(l, "chain "+ChainDivert) {
				hooked = append(hooked, strings.TrimSpace(l))
			}
		}
		return strings.Join(hooked, "\n")
	}
	before := handles()
	elements := func() string {
		out := mustList(t, ns, spec.Table)
		i := strings.Index(out, "elements = {")
		if i < 0 {
			t.Fatalf("the divert set has no element:\n%s", out)
		}
		// Without the remaining lifetime, which ticks.
		return regexp.MustCompile(` expires \S+`).ReplaceAllString(out[i:i+strings.Index(out[i:], "}")+1], "")
	}
	elemsBefore := elements()

	next := spec
	next.Services = append([]Service{}, spec.Services[1:]...) // "web" removed
	next.Services[0].Ports = []config.PortRange{{First: 5201, Last: 5201}}
	next.Services = append(next.Services, Service{Name: "extra", Listen: 15009, Ports: []config.PortRange{{First: 7, Last: 7}}, AnyDst: true, AnySrc: true})
	m2 := m.WithSpec(next)
	ok, err := m2.UpdateServices(m.Spec())
	if err != nil || !ok {
		t.Fatalf("update: %v %v", ok, err)
	}
	if diff := cmp.Diff(Listing(m2.Spec()), StripRuntime(mustList(t, ns, spec.Table))); diff != "" {
		t.Fatalf("listing after the update differs from a fresh install (-want +kernel):\n%s", diff)
	}
	if got := handles(); got != before {
		t.Errorf("the base chains changed:\nbefore:\n%s\nafter:\n%s", before, got)
	}
	if got := elements(); got != elemsBefore {
		t.Errorf("the divert set's elements changed: %q -> %q", elemsBefore, got)
	}

	// Another spec in the kernel section cannot be updated in place.
	other := next
	other.Mark++
	if ok, err := m.WithSpec(other).UpdateServices(m2.Spec()); ok || err != nil {
		t.Errorf("update with another mark: %v %v, want false, nil", ok, err)
	}
}

func mustList(t *testing.T, ns *testnet.NS, table string) string {
	t.Helper()
	out, err := ns.Run("nft", "list", "table", "inet", table)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDriftWithoutNFT: without the nft command drift detection compares
// summaries read through netlink: an installed table matches its
// expected summary, and a flushed chain or a deleted set shows.
func TestDriftWithoutNFT(t *testing.T) {
	testnet.Privileged(t, "nft")
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	spec.OwnTable = false // the test changes the table with nft
	ns := testnet.Scratch(t)
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	// A PATH with ip (the test runs nft in the namespace through it) and
	// no nft.
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Fatal(err)
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := os.Symlink(ip, filepath.Join(bin, "ip")); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin)
	kernel, diff, err := m.Drift(t.Context())
	if err != nil || diff != "" {
		t.Fatalf("fresh install: diff %q, err %v\nkernel summary:\n%s\nexpected:\n%s", diff, err, kernel, Summary(m.Spec()))
	}
	for _, tc := range []struct {
		name, cmd, want string
	}{
		{"flushed services chain", "flush chain inet spl_rt services", "-chain services rules 15"},
		{"deleted table", "delete table inet spl_rt", "is gone"},
	} {
		if out, err := ns.Command(t.Context(), nft, tc.cmd).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v %s", tc.cmd, err, out)
		}
		_, diff, err := m.Drift(t.Context())
		if err != nil || !strings.Contains(diff, tc.want) {
			t.Errorf("%s: diff %q (want %q), err %v", tc.name, diff, tc.want, err)
		}
	}
}

// TestDivertCommand: a command packet sent with the mark of queue index i
// adds its tuple to that queue's divert sets, and its send fails with
// EPERM (the drop that says the rule took it); a command with the mark of
// a queue that does not exist adds nothing and its send succeeds (no rule
// took it: it goes out).
func TestDivertCommand(t *testing.T) {
	spec := sampleSpec(t)
	_, ns := installedDiverter(t, spec)
	for _, args := range [][]string{
		{"ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"},
		{"ip", "link", "set", "d0", "up"},
		{"ip", "link", "set", "d1", "up"},
		{"ip", "addr", "add", "10.9.9.1/8", "dev", "d0"},
		{"ip", "addr", "add", "fd00::1/16", "dev", "d0", "nodad"},
		// What passes the divert command chain.
		{"nft", "add table inet probe; add chain inet probe out { type filter hook output priority 100; }; add rule inet probe out meta mark & 0xffff0000 == 0x5c1d0000 counter"},
	} {
		if out, err := ns.Run(args[0], args[1:]...); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	k4 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	k6 := splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:40000"), netip.MustParseAddrPort("[fd00:2::2]:80"))
	lost := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.3:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	send := func(k splice.Key, mark uint32) error {
		fam, sa := unix.AF_INET, unix.Sockaddr(&unix.SockaddrInet4{Addr: [4]byte(k.Dst[12:])})
		if !k.IsIPv4() {
			fam, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: k.Dst}
		}
		s, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(s)
		if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			return err
		}
		return unix.Sendto(s, AppendDivertCommand(nil, k), 0, sa)
	}
	var errs [3]error
	if err := ns.Do(func() error {
		errs = [3]error{send(k4, DivertCommandMark+1), send(k6, DivertCommandMark+1), send(lost, DivertCommandMark+7)}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(errs[0], unix.EPERM) || !errors.Is(errs[1], unix.EPERM) || errs[2] != nil {
		t.Errorf("sends returned %v, want EPERM, EPERM (taken) and nil (not taken)", errs)
	}
	out, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, false))
	if !strings.Contains(out, "10.1.0.2 . 40000 . 10.2.0.2 . 80") || strings.Contains(out, "10.1.0.3") {
		t.Errorf("divert4_1 after the commands:\n%s", out)
	}
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(1, true))
	if !strings.Contains(out, "fd00:1::2 . 40000 . fd00:2::2 . 80") {
		t.Errorf("divert6_1 after the commands:\n%s", out)
	}
	// The gate's sets too.
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertAnySetName(false))
	if !strings.Contains(out, "10.1.0.2 . 40000 . 10.2.0.2 . 80") || strings.Contains(out, "10.1.0.3") {
		t.Errorf("divert4_any after the commands:\n%s", out)
	}
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertAnySetName(true))
	if !strings.Contains(out, "fd00:1::2 . 40000 . fd00:2::2 . 80") {
		t.Errorf("divert6_any after the commands:\n%s", out)
	}
	out, _ = ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(0, false))
	if strings.Contains(out, "10.1.0") {
		t.Errorf("divert4_0 after commands for queue index 1:\n%s", out)
	}
	if out, _ := ns.Run("nft", "list", "chain", "inet", "probe", "out"); !strings.Contains(out, "counter packets 1 bytes 40") {
		t.Errorf("want only the command no rule took past the divert command chain:\n%s", out)
	}
}

// TestCanonicalQueues: on a kernel with the nft queue expression, nft
// 1.0.1 and later list the divert rules' queue statements as "queue to
// N" and "queue flags bypass to N" (nftables' queue_stmt_print), where
// Render writes "queue num N [bypass]". The drift check compares the
// two: without canonicalQueues it found the table changed on every
// look and reinstalled it for good. (This machine's kernel has no nft
// queue expression, so the kernel listing cannot be taken here.)
func TestCanonicalQueues(t *testing.T) {
	spec := sampleSpec(t)
	spec.Divert.NativeQueue = true
	want := Listing(spec)
	if !strings.Contains(want, "queue num ") || !strings.Contains(want, " bypass\n") {
		t.Fatalf("the sample's listing has no queue statements with and without bypass:\n%s", want)
	}
	newer := regexp.MustCompile(`queue num ([0-9]+)( bypass)?`).ReplaceAllStringFunc(want, func(m string) string {
		n := strings.Fields(m)[2]
		if strings.HasSuffix(m, " bypass") {
			return "queue flags bypass to " + n
		}
		return "queue to " + n
	})
	if got := canonicalQueues(newer); got != want {
		t.Errorf("nft 1.0 form not made canonical:\n%s", UnifiedDiff("want", "got", want, got))
	}
	if got := canonicalQueues(want); got != want {
		t.Errorf("the older form changed:\n%s", UnifiedDiff("want", "got", want, got))
	}
}

// TestDiverterDeleteOneSetLost: a tuple one set lost (an element timed
// out there, or someone deleted it) is still deleted from the other:
// the transaction of both fails, and the one-by-one fallback takes each
// set on its own.
func TestDiverterDeleteOneSetLost(t *testing.T) {
	spec := sampleSpec(t)
	spec.OwnTable = false // the test deletes an element with nft
	d, ns := installedDiverter(t, spec)
	k := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	for _, lost := range []string{DivertSetName(1, false), DivertAnySetName(false)} {
		if err := d.Add(1, k, k.Reverse()); err != nil {
			t.Fatal(err)
		}
		if out, err := ns.Run("nft", "delete", "element", "inet", spec.Table, lost, "{ 10.1.0.2 . 40000 . 10.2.0.2 . 80 }"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if err := d.Delete(1, k, k.Reverse()); err != nil {
			t.Fatalf("delete with the element gone from %s: %v", lost, err)
		}
		if out, _ := ns.Run("nft", "list", "table", "inet", spec.Table); strings.Contains(out, "40000") {
			t.Errorf("elements left after the delete, %s having lost one:\n%s", lost, out)
		}
	}
}

// TestDiverterStop: once stopped (the daemon is about to remove its
// table), the diverter sends no divert command and adds no element; it
// still deletes the elements of flows that end.
func TestDiverterStop(t *testing.T) {
	spec := sampleSpec(t)
	d, ns := installedDiverter(t, spec)
	k := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	if err := d.Add(0, k); err != nil {
		t.Fatal(err)
	}
	d.Stop()
	sent := false
	if err := d.Commands(func() error { sent = true; return nil }); !errors.Is(err, ErrDiverterStopped) || sent {
		t.Errorf("Commands after Stop: %v, sent %v; want ErrDiverterStopped and nothing sent", err, sent)
	}
	k2 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40001"), netip.MustParseAddrPort("10.2.0.2:80"))
	if err := d.Add(0, k2); !errors.Is(err, ErrDiverterStopped) {
		t.Errorf("Add after Stop: %v, want ErrDiverterStopped", err)
	}
	if out, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(0, false)); strings.Contains(out, "40001") {
		t.Errorf("an element was added after Stop:\n%s", out)
	}
	if err := d.Delete(0, k); err != nil {
		t.Fatalf("Delete after Stop: %v", err)
	}
	if out, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertSetName(0, false)); strings.Contains(out, "40000") {
		t.Errorf("the element was not deleted:\n%s", out)
	}
}

// TestDriftWithNFT: drift detection with the nft command lists our table
// without the divert sets' elements, among other tables of the inet
// family (one named like ours with a suffix, before and after it): an
// installed table with thousands of divert entries matches its expected
// listing, and a flushed chain or a deleted table shows.
func TestDriftWithNFT(t *testing.T) {
	spec := sampleSpec(t)
	spec.Divert.Enabled = true
	spec.OwnTable = false // the test changes the table with nft
	ns := testnet.Scratch(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatal(err)
	}
	for _, other := range []string{spec.Table + "2", "a" + spec.Table} {
		if out, err := ns.Command(t.Context(), nft, "add table inet "+other+"; add chain inet "+other+" c { type filter hook input priority 0; }").CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
	}
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	d, err := m.NewDiverter()
	if err != nil {
		t.Fatal(err)
	}
	var keys []splice.Key
	for i := range 2000 {
		keys = append(keys, splice.KeyFrom(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 40000), netip.MustParseAddrPort("10.2.0.2:80")))
	}
	if err := d.Add(0, keys...); err != nil {
		t.Fatal(err)
	}
	// nft runs in the namespace: the daemon runs in its own.
	bin := t.TempDir()
	script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", ns.Name, nft)
	if err := os.WriteFile(filepath.Join(bin, "nft"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	kernel, diff, err := m.Drift(t.Context())
	if err != nil || diff != "" {
		t.Fatalf("fresh install with %d divert entries: diff %q, err %v\nkernel:\n%s", len(keys), diff, err, kernel)
	}
	if strings.Contains(kernel, "10.1.") || strings.Contains(kernel, spec.Table+"2") {
		t.Fatalf("the listing holds divert entries or another table:\n%s", kernel)
	}
	for _, tc := range []struct {
		name, cmd, want string
	}{
		{"a service's set changed", "add element inet " + spec.Table + " web_ports { 9999 }", "9999"},
		{"flushed services chain", "flush chain inet " + spec.Table + " services", "-\t\t"},
		{"deleted table", "delete table inet " + spec.Table, "is gone"},
	} {
		if out, err := ns.Command(t.Context(), nft, tc.cmd).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v %s", tc.cmd, err, out)
		}
		_, diff, err := m.Drift(t.Context())
		if err != nil || !strings.Contains(diff, tc.want) {
			t.Errorf("%s: diff %q (want %q), err %v", tc.name, diff, tc.want, err)
		}
	}
}

// TestDriftLongSets: nft wraps the elements of a long set over several
// lines (",\n\t\t\t     "), where Render writes one line. A service with
// a few more source prefixes than fit on a line looked drifted for
// good: every check logged drift and reinstalled the table.
func TestDriftLongSets(t *testing.T) {
	cfg, err := config.Parse("long.yaml", []byte(`
kernel:
  table: spl_long
services:
  - name: lan
    listen: 15001
    ports: ["80", "443", "8000-8100", "8443"]
    sources: [10.1.0.0/24, 10.1.2.0/24, 10.1.4.0/24, 10.1.6.0/24, 10.1.8.0/24, 10.1.10.0/24, 10.1.12.0/24, "fd00:1::/64", "fd00:2::/64", "fd00:3::/64", "fd00:4::/64"]
`))
	if err != nil {
		t.Fatal(err)
	}
	spec := FromConfig(cfg)
	spec.OwnTable = false
	ns := testnet.Scratch(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatal(err)
	}
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", ns.Name, nft)
	if err := os.WriteFile(filepath.Join(bin, "nft"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	if kernel, diff, err := m.Drift(t.Context()); err != nil || diff != "" {
		t.Fatalf("fresh install: diff %q, err %v\nkernel:\n%s", diff, err, kernel)
	}
	// An element deleted from the long set still shows.
	if out, err := ns.Command(t.Context(), nft, "delete element inet "+spec.Table+" lan_src4 { 10.1.6.0/24 }").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if _, diff, err := m.Drift(t.Context()); err != nil || !strings.Contains(diff, "-\t\telements = {") {
		t.Errorf("after deleting an element: diff %q, err %v", diff, err)
	}
}

// TestDriftEmbeddedIPv4: nft prints an IPv6 address whose first 96 bits
// are zero (IPv4-compatible, ::10.1.0.0) or that is IPv4-mapped with its
// last 32 bits as an IPv4 address (inet_ntop); Go prints ::a01:0. A
// service with such a prefix differed from its expected listing for
// good, and every drift check (each 10 s) reinstalled the table.
func TestDriftEmbeddedIPv4(t *testing.T) {
	cfg, err := config.Parse("compat.yaml", []byte(`
kernel:
  table: spl_compat
services:
  - name: lan
    listen: 15001
    ports: ["80"]
    sources: ["::10.1.0.0/112", "::1:0", "::2", "fd00:1::a01:0/112"]
    destinations: ["::1.2.3.4", "64:ff9b::10.2.0.0/112"]
`))
	if err != nil {
		t.Fatal(err)
	}
	spec := FromConfig(cfg)
	spec.OwnTable = false
	ns := testnet.Scratch(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatal(err)
	}
	m := NewManager(spec, WithNetNS(ns.OpenT(t)))
	if err := m.Install(nil); err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", ns.Name, nft)
	if err := os.WriteFile(filepath.Join(bin, "nft"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	if kernel, diff, err := m.Drift(t.Context()); err != nil || diff != "" {
		t.Fatalf("fresh install: diff %q, err %v\nkernel:\n%s", diff, err, kernel)
	}
}

// TestTupleOfDivertKey: a divert key reads back as its tuple in both
// families; a key of another shape (another set's) is not taken for one.
func TestTupleOfDivertKey(t *testing.T) {
	for _, k := range []splice.Key{
		splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")),
		splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:65535"), netip.MustParseAddrPort("[fd00:2::2]:1")),
	} {
		got, ok := tupleOfDivertKey(divertKey(k))
		if !ok || got != k {
			t.Errorf("tupleOfDivertKey(divertKey(%v)) = %v, %v", k, got, ok)
		}
	}
	bad := divertKey(splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80")))
	bad[7] = 1 // a padding byte
	for _, b := range [][]byte{{10, 1, 0, 2}, make([]byte, 20), bad} {
		if k, ok := tupleOfDivertKey(b); ok {
			t.Errorf("tupleOfDivertKey(%x) = %v, want no tuple", b, k)
		}
	}
}

// TestDivertDeletedByOthers: the nftables monitor's element deletions
// are told apart by sender: the Diverter's own (a flow that ended) are
// not reported, another process's `nft flush set` of a divert set is,
// with the tuples it deleted, and Restore puts them back into both the
// queue's set and the gate's (an unowned table: before, nothing noticed,
// and the tuples stayed out until the next refresh, 8 h by default).
func TestDivertDeletedByOthers(t *testing.T) {
	spec := sampleSpec(t)
	spec.OwnTable = false // another process flushes its sets
	d, ns := installedDiverter(t, spec)
	mc, err := nftables.New(nftables.AsLasting(), nftables.WithNetNSFd(ns.OpenT(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mc.CloseLasting() })
	mon := nftables.NewMonitor()
	events, err := mc.AddMonitor(mon)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mon.Close() })
	// deleted reads events until one deletes elements and returns what
	// DivertDeletedByOthers makes of it.
	deleted := func() []splice.Key {
		t.Helper()
		for {
			select {
			case ev := <-events:
				if ev.Error != nil {
					t.Fatal(ev.Error)
				}
				if ev.Type == nftables.MonitorEventTypeDelSetElem {
					return d.m.DivertDeletedByOthers(ev)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no element deletion reported")
			}
		}
	}
	ended := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40001"), netip.MustParseAddrPort("10.2.0.2:80"))
	k4 := splice.KeyFrom(netip.MustParseAddrPort("10.1.0.2:40000"), netip.MustParseAddrPort("10.2.0.2:80"))
	k6 := splice.KeyFrom(netip.MustParseAddrPort("[fd00:1::2]:40000"), netip.MustParseAddrPort("[fd00:2::2]:80"))
	if err := d.Add(1, ended, k4, k4.Reverse(), k6); err != nil {
		t.Fatal(err)
	}
	if err := d.Delete(1, ended); err != nil {
		t.Fatal(err)
	}
	for range 2 { // from the gate's set and the queue's
		if got := deleted(); len(got) != 0 {
			t.Errorf("the diverter's own delete reported as another's: %v", got)
		}
	}
	lost := map[splice.Key]bool{}
	for _, set := range []string{DivertSetName(1, false), DivertSetName(1, true)} {
		if out, err := ns.Run("nft", "flush", "set", "inet", spec.Table, set); err != nil {
			t.Fatalf("nft flush set %s: %v: %s", set, err, out)
		}
	}
	for len(lost) < 3 {
		for _, k := range deleted() {
			lost[k] = true
		}
	}
	if want := map[splice.Key]bool{k4: true, k4.Reverse(): true, k6: true}; !cmp.Equal(lost, want) {
		t.Errorf("reported deleted: %v, want %v", lost, want)
	}
	n, err := d.Restore(func() map[uint16][]splice.Key { return map[uint16][]splice.Key{1: {k4, k4.Reverse(), k6}} })
	if err != nil || n != 3 {
		t.Fatalf("restore: %d tuples, %v", n, err)
	}
	for _, k := range []splice.Key{k4, k4.Reverse(), k6} {
		if ok, err := d.Has(1, k); err != nil || !ok {
			t.Errorf("after the restore, %v in the set of queue 1: %v, %v", k, ok, err)
		}
	}
	any4, _ := ns.Run("nft", "list", "set", "inet", spec.Table, DivertAnySetName(false))
	for _, want := range []string{"10.1.0.2 . 40000 . 10.2.0.2 . 80", "10.2.0.2 . 80 . 10.1.0.2 . 40000"} {
		if strings.Count(any4, want) != 1 {
			t.Errorf("the gate's set after the restore holds %q %d times, want once:\n%s", want, strings.Count(any4, want), any4)
		}
	}
	if strings.Contains(any4, "40001") {
		t.Errorf("the restore brought back a tuple it was not given:\n%s", any4)
	}
}

// TestDriftEmbeddedIPv4Musl: nft writes IPv6 addresses with the C
// library's inet_ntop, and musl's (OpenWrt, Alpine) writes an
// IPv4-compatible address in hexadecimal (::a01:0 where glibc writes
// ::10.1.0.0) and shortens a run of zeros at the start of an address
// less eagerly (0:0:0:1::1 where glibc writes ::1:0:0:0:1). Render
// writes glibc's forms, so on a musl system such a service differed
// from its expected listing for good, and every drift check reinstalled
// the table. The kernel's listing is read in Render's form on either.
func TestDriftEmbeddedIPv4Musl(t *testing.T) {
	cfg, err := config.Parse("compat.yaml", []byte(`
services:
  - name: lan
    listen: 15001
    ports: ["80", "8000-8080"]
    sources: ["::10.1.0.0/112", "::1:0", "::2", "fd00:1::a01:0/112"]
    destinations: ["::1.2.3.4", "::1:0:0:0:1", "10.2.0.0/16"]
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Listing(FromConfig(cfg))
	musl := strings.NewReplacer("::10.1.0.0/112", "::a01:0/112", "::0.1.0.0", "::1:0", "::1.2.3.4", "::102:304", "::1:0:0:0:1", "0:0:0:1::1").Replace(want)
	if musl == want || !strings.Contains(musl, "::a01:0/112") || !strings.Contains(musl, "0:0:0:1::1") {
		t.Fatalf("the test's musl listing is not one:\n%s", musl)
	}
	for name, listing := range map[string]string{"musl": musl, "glibc": want} {
		if diff := UnifiedDiff("expected", "kernel", want, canonicalElements(listing)); diff != "" {
			t.Errorf("%s's listing read as another:\n%s", name, diff)
		}
	}
}
