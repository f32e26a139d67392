package main

import (
	"cmp"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// The checks the 1000-flow restart tests (bpf and nfqueue) share, once
// the new daemon runs.

// checkAdopted checks the flows the new daemon lists as adopted on
// datapath: all spliced of them, split over the fwd (transparent) and
// nat services (proxied: the clients whose flows stayed proxied), a NAT
// flow's server leg starting at the gateway, and an adopted flow refusing
// an unsplice. It returns how many are listed.
func checkAdopted(t *testing.T, d *testnet.Daemon, lab *testnet.Lab, datapath string, spliced int, proxied map[string]bool) int {
	t.Helper()
	fs, err := d.Client().Flows(t.Context(), api.FlowFilter{})
	if err != nil {
		t.Fatal(err)
	}
	adopted := 0
	var one uint64
	bySvc := map[string]int{}
	for _, f := range fs {
		if f.Adopted && f.Datapath == datapath && f.State == api.StateSpliced {
			adopted++
			one = f.ID
			bySvc[f.Service]++
			// NAT: the server leg starts at the gateway, not the client.
			if nat := f.Service == "nat"; nat == strings.HasPrefix(f.ServerLeg.Local, lab.Client().IPv4.String()+":") {
				t.Errorf("adopted flow %d of service %s: server leg %+v", f.ID, f.Service, f.ServerLeg)
			}
		}
	}
	if bySvc["fwd"]+bySvc["nat"] != spliced || bySvc["fwd"] < spliced/2-len(proxied) || bySvc["nat"] < spliced/2-len(proxied) {
		t.Errorf("adopted flows by service: %v", bySvc)
	}
	if adopted != spliced {
		t.Fatalf("%d of %d spliced flows listed as adopted on %s", adopted, spliced, datapath)
	}
	if _, err := d.Client().Unsplice(t.Context(), one); err == nil || !strings.Contains(err.Error(), "adopted") {
		t.Errorf("unsplice of an adopted flow: %v, want a refusal naming adoption", err)
	}
	return adopted
}

// checkRestartedTransfers checks every transfer: a spliced one intact
// both ways, a proxied one (its client in proxied) intact as far as it
// went. It returns how many spliced ones are intact.
func checkRestartedTransfers(t *testing.T, results []*testnet.Transfer, proxied map[string]bool) (intact int) {
	t.Helper()
	for i, r := range results {
		if proxied[r.Client.Local.String()] {
			if err := r.CheckPrefix(); err != nil {
				t.Errorf("flow %d (proxied): %v", i, err)
			}
			continue
		}
		if err := r.Check(); err != nil {
			t.Errorf("flow %d: %v", i, err)
		} else {
			intact++
		}
	}
	return intact
}

// checkRetired waits until the daemon lists no flow and has logged the
// spliced flows closed, and checks that they all finished. It returns
// the flows closed by reason.
func checkRetired(t *testing.T, d *testnet.Daemon, spliced int) map[string]int {
	t.Helper()
	var left []api.Flow
	if err := testnet.Poll(30*time.Second, func() (err error) {
		left, err = d.Client().Flows(t.Context(), api.FlowFilter{})
		if err != nil {
			return err
		}
		if len(left) > 0 {
			return fmt.Errorf("%d flows still listed", len(left))
		}
		return nil
	}); err != nil {
		t.Errorf("adopted flows not retired: %v: %+v", err, left)
	}
	closed := map[string]int{}
	if err := testnet.Poll(10*time.Second, func() error { // the log may lag behind the API
		clear(closed)
		n := 0
		for _, l := range d.Lines() {
			if l["msg"] == "flow closed" {
				closed[fmt.Sprint(l["reason"])]++
				n++
			}
		}
		if n < spliced {
			return fmt.Errorf("%d flows logged closed", n)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if closed["finished"] != spliced {
		t.Errorf("flows closed by reason: %v, want all %d finished", closed, spliced)
	}
	return closed
}

// restartFlows are the paced transfers of a restart test: every other
// one to the fwd service (transparent, srv) and to the nat service
// (natSrv: the server sees the gateway's address, and the rewrite
// changes addresses too).
type restartFlows struct {
	srv     netip.AddrPort
	mux     *testnet.Mux
	flows   int
	rate    int64 // bytes per second each way
	size    int64 // bytes each way: restartFlowSeconds at rate
	started time.Time
	results []*testnet.Transfer
	wg      sync.WaitGroup

	mu     sync.Mutex
	failed []string // transfers that ended with an error, while waiting
}

// restartFlowSeconds is how long each restart flow moves: long enough to
// be spliced (1000 flows in 2.6-3.4 s here), seen moving, killed under
// (2 s later) and adopted by a new daemon, with room for a slower
// machine. 30 s before: the two 1000-flow restart tests took 38-40 s
// each of the lab's 14 minutes.
const restartFlowSeconds = 20

// pinnedRestartConfig is pinConfig for the datapath with 30 s drains: 1000
// splices at once, on a machine that may run other labs, need more than
// the default 5 s.
func pinnedRestartConfig(t *testing.T, datapath, root string) string {
	t.Helper()
	cfg := strings.ReplaceAll(pinConfig(datapath, root), "      mode: immediate\n", "      mode: immediate\n      drain_timeout: 30s\n")
	if strings.Count(cfg, "drain_timeout: 30s") != 2 {
		t.Fatalf("configuration without the drain timeouts:\n%s", cfg)
	}
	return cfg
}

// startRestartFlows starts SPLICED_RESTART_FLOWS transfers (default
// 1000; 100 under the race detector) at rate(flows) each way, seeded
// from seed.
func startRestartFlows(t *testing.T, lab *testnet.Lab, rate func(flows int) int64, seed uint64) *restartFlows {
	t.Helper()
	listen := func(port uint16) (netip.AddrPort, *testnet.Mux) {
		addr := netip.AddrPortFrom(lab.Server().IPv4, port)
		ln, err := lab.Server().Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		m := testnet.NewMux(ln)
		t.Cleanup(func() { m.Close() })
		return addr, m
	}
	r := &restartFlows{flows: 1000}
	if testnet.Race() {
		// Under the race detector this process's own transfers took
		// 150-170% of the two CPUs with 1000 flows, and the daemon,
		// starved, got through 800 splices in a minute; a hundred
		// flows exercise the same concurrency.
		r.flows = 100
	}
	r.srv, r.mux = listen(5001)
	natSrv, natMux := listen(5002)
	if s := os.Getenv("SPLICED_RESTART_FLOWS"); s != "" {
		var err error
		if r.flows, err = strconv.Atoi(s); err != nil || r.flows < 2 {
			t.Fatalf("SPLICED_RESTART_FLOWS=%q: want a number of flows, at least 2", s)
		}
	}
	r.rate = rate(r.flows)
	r.size = restartFlowSeconds * r.rate
	r.started = time.Now()
	r.results = make([]*testnet.Transfer, r.flows)
	for i := range r.flows {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			m, dst := r.mux, r.srv
			if i%2 == 1 {
				m, dst = natMux, natSrv
			}
			tr := m.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: r.size, S2C: r.size, Seed: seed + uint64(2*i), Rate: r.rate, Timeout: 3 * time.Minute})
			r.results[i] = tr
			if err := cmp.Or(tr.Client.Err, tr.Server.Err); err != nil {
				r.mu.Lock()
				r.failed = append(r.failed, fmt.Sprintf("flow %d (%v): %v", i, tr.Client.Local, err))
				r.mu.Unlock()
			}
		}()
	}
	return r
}

// waitSpliced waits until every flow is spliced on the datapath (as the
// daemon lists them) or stays proxied, and recorded says nil. A splice
// under this load may give up (drain timeout) and leave its flow
// proxied: such a flow dies with the daemon's sockets, as every proxied
// flow does (checkRestartedTransfers wants a clean prefix); more than 1%
// fails the test. It returns the spliced flows, the proxied ones' client
// addresses, and the time since the first dial.
func (r *restartFlows) waitSpliced(t *testing.T, d *testnet.Daemon, datapath string, recorded func(spliced int) error) (spliced int, proxied map[string]bool, took time.Duration) {
	t.Helper()
	proxied = map[string]bool{}
	if err := testnet.Poll(60*time.Second, func() error {
		// A transfer that failed (a dial that timed out) is never
		// listed: say why at once rather than wait for it.
		r.mu.Lock()
		failed := slices.Clone(r.failed)
		r.mu.Unlock()
		if len(failed) > 0 {
			t.Fatalf("%d transfers failed while the flows were being spliced, the first: %s\n%s", len(failed), failed[0], tail(d.Log(), 20))
		}
		fs, err := d.Client().Flows(t.Context(), api.FlowFilter{})
		if err != nil {
			return err
		}
		spliced = 0
		for _, f := range fs {
			if f.Datapath == datapath && f.State == api.StateSpliced {
				spliced++
			}
		}
		clear(proxied)
		for _, l := range d.Lines() {
			if l["msg"] == "flow stays proxied" {
				proxied[fmt.Sprint(l["client"])] = true
			}
		}
		if spliced+len(proxied) < r.flows {
			time.Sleep(200 * time.Millisecond) // listing 1000 flows is not free
			return fmt.Errorf("%d of %d flows spliced on %s, %d stay proxied", spliced, r.flows, datapath, len(proxied))
		}
		return recorded(spliced)
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(d.Log(), 20))
	}
	took = time.Since(r.started)
	if len(proxied) > r.flows/100 {
		t.Fatalf("%d of %d flows stayed proxied", len(proxied), r.flows)
	}
	return spliced, proxied, took
}

// checkResetAtStop checks the transfers a SIGTERM ended: reset at both
// ends, intact as far as they went.
func checkResetAtStop(t *testing.T, ends []*testnet.Transfer) {
	t.Helper()
	for i, r := range ends {
		if r.Client.Err == nil || r.Server.Err == nil || !strings.Contains(r.Client.Err.Error(), "reset") || !strings.Contains(r.Server.Err.Error(), "reset") {
			t.Errorf("flow %d at SIGTERM: client %v, server %v; want a reset at both ends", i, r.Client.Err, r.Server.Err)
		}
		if err := r.CheckPrefix(); err != nil {
			t.Errorf("flow %d: %v", i, err)
		}
	}
}
