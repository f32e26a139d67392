package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"spliced/api"
	"spliced/splice/bpf"
	"spliced/testnet"
)

// storedFlows counts the flows in the nfqueue datapath's record of table
// spliced under the bpffs root (see gateway/store.go), read from the
// gateway's namespace: it works while no daemon runs.
func storedFlows(t *testing.T, lab *testnet.Lab, root string) int {
	t.Helper()
	n := 0
	err := lab.Gateway.Do(func() error {
		dp, err := bpf.OpenPinned(filepath.Join(root, "spliced-nfqueue", "spliced"))
		if err != nil || dp == nil {
			return fmt.Errorf("open the record: %v", err)
		}
		defer dp.Close()
		fs, _, err := dp.PinnedFlows()
		n = len(fs)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestLabNFQueueRestartKeepsFlows: 1000 flows spliced on the nfqueue
// datapath (the default; SPLICED_RESTART_FLOWS sets the number; half
// transparent, half NAT), with paced transfers running both ways,
// survive a kill -9 of the daemon: the record of each flow stays pinned
// in bpffs, the table stays and its queues drop the flows' packets while
// no daemon runs (never delivered unrewritten); a new daemon with the
// same configuration adopts every one from the record (listed as
// adopted, on nfqueue; unsplicing one is refused), relearns their
// tracking state from their packets, TCP retransmits what was dropped,
// and every transfer completes intact (SHA-256 both ways); the reaper
// retires them all. A SIGTERM resets the flows it spliced itself at both
// ends and removes the record.
func TestLabNFQueueRestartKeepsFlows(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	root := testnet.BPFFS(t)
	store := filepath.Join(root, "spliced-nfqueue", "spliced")
	// 1000 splices at once through the queues, on a machine that may
	// run other labs: give each drain time (the default is 5 s).
	cfg := strings.ReplaceAll(pinConfig("nfqueue", root), "      mode: immediate\n", "      mode: immediate\n      drain_timeout: 30s\n")
	if strings.Count(cfg, "drain_timeout: 30s") != 2 {
		t.Fatalf("configuration without the drain timeouts:\n%s", cfg)
	}
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	mux := testnet.NewMux(ln)
	defer mux.Close()
	natSrv := netip.AddrPortFrom(lab.Server().IPv4, 5002)
	natLn, err := lab.Server().Listen(natSrv)
	if err != nil {
		t.Fatal(err)
	}
	natMux := testnet.NewMux(natLn)
	defer natMux.Close()

	old := testnet.StartDaemon(t, lab, cfg)
	flows := 1000
	if s := os.Getenv("SPLICED_RESTART_FLOWS"); s != "" {
		if flows, err = strconv.Atoi(s); err != nil || flows < 2 {
			t.Fatalf("SPLICED_RESTART_FLOWS=%q: want a number of flows, at least 2", s)
		}
	}
	// About 48 s a flow, as in TestLabBPFRestartKeepsFlows, at 32 KiB/s
	// each way (SPLICED_RESTART_RATE sets it, in KiB/s): every packet
	// crosses to the daemon and back.
	rate := int64(32 << 10) // bytes per second each way
	if s := os.Getenv("SPLICED_RESTART_RATE"); s != "" {
		k, err := strconv.Atoi(s)
		if err != nil || k < 1 {
			t.Fatalf("SPLICED_RESTART_RATE=%q: want KiB/s", s)
		}
		rate = int64(k) << 10
	}
	size := 48 * rate // each way
	started := time.Now()
	results := make([]*testnet.Transfer, flows)
	var wg sync.WaitGroup
	for i := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, dst := mux, srv
			if i%2 == 1 {
				m, dst = natMux, natSrv
			}
			results[i] = m.Transfer(lab.Client(), dst, testnet.TransferOptions{C2S: size, S2C: size, Seed: uint64(3000 + 2*i), Rate: rate, Timeout: 3 * time.Minute})
		}()
	}
	// A splice under this load may give up (drain timeout) and leave
	// its flow proxied: such a flow dies with the daemon's sockets, as
	// every proxied flow does; what arrived must be a clean prefix.
	proxied := map[string]bool{} // client addresses
	spliced := 0
	if err := testnet.Poll(60*time.Second, func() error {
		fs, err := old.Client().Flows(t.Context(), api.FlowFilter{})
		if err != nil {
			return err
		}
		spliced = 0
		for _, f := range fs {
			if f.Datapath == "nfqueue" && f.State == api.StateSpliced {
				spliced++
			}
		}
		clear(proxied)
		for _, l := range old.Lines() {
			if l["msg"] == "flow stays proxied" {
				proxied[fmt.Sprint(l["client"])] = true
			}
		}
		if spliced+len(proxied) < flows {
			time.Sleep(200 * time.Millisecond)
			return fmt.Errorf("%d of %d flows spliced, %d stay proxied", spliced, flows, len(proxied))
		}
		if k := storedFlows(t, lab, root); k < spliced {
			return fmt.Errorf("%d of %d spliced flows recorded", k, spliced)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(old.Log(), 20))
	}
	if len(proxied) > flows/100 {
		t.Fatalf("%d of %d flows stayed proxied", len(proxied), flows)
	}
	allSpliced := time.Since(started)
	time.Sleep(2 * time.Second) // the flows move on from their first record

	// kill -9: the record and the table stay.
	old.Kill()
	killed := time.Now()
	if n := storedFlows(t, lab, root); n != spliced {
		t.Fatalf("%d flows in the record after kill -9, want %d", n, spliced)
	}
	time.Sleep(time.Second) // no daemon: the flows' packets are dropped

	d := testnet.StartDaemon(t, lab, cfg)
	down := time.Since(killed)
	rec := d.FindLog(func(l map[string]any) bool {
		return l["msg"] == "adopted spliced flows from the nfqueue datapath's record"
	})
	if rec == nil || rec["flows"] != float64(spliced) {
		t.Fatalf("adoption log: %v\n%s", rec, tail(d.Log(), 30))
	}
	fs, err := d.Client().Flows(t.Context(), api.FlowFilter{})
	if err != nil {
		t.Fatal(err)
	}
	adopted := 0
	var one uint64
	bySvc := map[string]int{}
	for _, f := range fs {
		if f.Adopted && f.Datapath == "nfqueue" && f.State == api.StateSpliced {
			adopted++
			one = f.ID
			bySvc[f.Service]++
			if nat := f.Service == "nat"; nat == strings.HasPrefix(f.ServerLeg.Local, lab.Client().IPv4.String()+":") {
				t.Errorf("adopted flow %d of service %s: server leg %+v", f.ID, f.Service, f.ServerLeg)
			}
		}
	}
	if bySvc["fwd"]+bySvc["nat"] != spliced || bySvc["fwd"] < spliced/2-len(proxied) || bySvc["nat"] < spliced/2-len(proxied) {
		t.Errorf("adopted flows by service: %v", bySvc)
	}
	if adopted != spliced {
		t.Fatalf("%d of %d spliced flows listed as adopted on nfqueue", adopted, spliced)
	}
	if _, err := d.Client().Unsplice(t.Context(), one); err == nil || !strings.Contains(err.Error(), "adopted") {
		t.Errorf("unsplice of an adopted flow: %v, want a refusal naming adoption", err)
	}
	wg.Wait()
	done := time.Since(started)
	intact := 0
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
	var left []api.Flow
	if err := testnet.Poll(30*time.Second, func() error {
		left, err = d.Client().Flows(t.Context(), api.FlowFilter{})
		if err != nil {
			return err
		}
		if len(left) > 0 {
			return fmt.Errorf("%d flows still listed", len(left))
		}
		return nil
	}); err != nil {
		t.Errorf("adopted flows not retired: %v", err)
	}
	closed := map[string]int{}
	if err := testnet.Poll(10*time.Second, func() error {
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
	if n := storedFlows(t, lab, root); n != 0 {
		t.Errorf("%d flows left in the record after they all ended", n)
	}
	t.Logf("%d flows (half transparent, half NAT), %.1f MiB each way at %d KiB/s: %d spliced on nfqueue and recorded, %d stayed proxied (drain timeout), %v after the first dial; kill -9, no daemon for %v; %d adopted; %d of %d spliced intact; retired: %v; transfers done %v after the first dial",
		flows, float64(size)/(1<<20), rate>>10, spliced, len(proxied), allSpliced.Round(time.Millisecond), down.Round(time.Millisecond), adopted, intact, spliced, closed, done.Round(time.Millisecond))

	// SIGTERM with flows of its own: reset at both ends, record gone.
	const live = 2
	ends := make([]*testnet.Transfer, live)
	var wg2 sync.WaitGroup
	for i := range live {
		wg2.Add(1)
		go func() {
			defer wg2.Done()
			ends[i] = mux.Transfer(lab.Client(), srv, testnet.TransferOptions{C2S: 1 << 30, S2C: 1 << 30, Seed: uint64(7000 + 2*i), Rate: 1 << 20, Timeout: time.Minute})
		}()
	}
	if err := testnet.Poll(20*time.Second, func() error {
		if k := storedFlows(t, lab, root); k < live {
			return fmt.Errorf("%d of %d flows recorded", k, live)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if err := d.Stop(); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	wg2.Wait()
	for i, r := range ends {
		if r.Client.Err == nil || r.Server.Err == nil || !strings.Contains(r.Client.Err.Error(), "reset") || !strings.Contains(r.Server.Err.Error(), "reset") {
			t.Errorf("flow %d at SIGTERM: client %v, server %v; want a reset at both ends", i, r.Client.Err, r.Server.Err)
		}
		if err := r.CheckPrefix(); err != nil {
			t.Errorf("flow %d: %v", i, err)
		}
	}
	if exists(store) {
		t.Errorf("record after SIGTERM: %v", pins(store))
	}
}
