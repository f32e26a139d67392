package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"spliced/api"
	"spliced/rules"
	"spliced/testnet"
)

const ctlConfig = `
kernel:
  repair: %s
metrics:
  listen: 127.0.0.1:9410
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
  - name: spl
    listen: 15002
    ports: ["5002"]
    splice:
      mode: immediate
`

// runCtl runs splicectl against the daemon and returns its output and exit
// code.
func runCtl(t *testing.T, d *testnet.Daemon, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(testnet.Binary(t, "splicectl"), append([]string{"-s", d.Socket}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), code
}

// ctlJSON runs splicectl -j and decodes its output into v.
func ctlJSON(t *testing.T, d *testnet.Daemon, v any, args ...string) {
	t.Helper()
	out, code := runCtl(t, d, append([]string{"-j"}, args...)...)
	if code != 0 {
		t.Fatalf("splicectl -j %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("splicectl -j %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// pair is an open flow through the gateway with both ends in the test.
type pair struct {
	client, server *net.TCPConn
}

func openPair(t *testing.T, lab *testnet.Lab, port uint16) *pair {
	t.Helper()
	dst := netip.AddrPortFrom(lab.Server().IPv4, port)
	ln, err := lab.Server().Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := lab.Client().Dial(dst, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{client: c, server: s}
	t.Cleanup(func() { c.Close(); s.Close() })
	return p
}

// exchange sends n bytes each way and checks they arrive.
func (p *pair) exchange(t *testing.T, n int, seed byte) {
	t.Helper()
	a, b := bytes.Repeat([]byte{seed}, n), bytes.Repeat([]byte{seed + 1}, n)
	errc := make(chan error, 2)
	go func() { _, err := p.client.Write(a); errc <- err }()
	go func() { _, err := p.server.Write(b); errc <- err }()
	gotA, gotB := make([]byte, n), make([]byte, n)
	p.server.SetReadDeadline(time.Now().Add(30 * time.Second))
	p.client.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(p.server, gotA); err != nil || !bytes.Equal(gotA, a) {
		t.Fatalf("client->server: %v", err)
	}
	if _, err := io.ReadFull(p.client, gotB); err != nil || !bytes.Equal(gotB, b) {
		t.Fatalf("server->client: %v", err)
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

// findFlow returns a copy of the flow whose client is client.
func findFlow(flows []api.Flow, client net.Addr) *api.Flow {
	for _, f := range flows {
		if f.ClientLeg.Remote == client.String() {
			return &f
		}
	}
	return nil
}

// TestLabCtl drives a running daemon with splicectl: status, flows with
// the right states and byte counts, splicing a flow by ID (its data stays
// intact), the ruleset as nft lists it, JSON that decodes into the API's
// documented types, Prometheus metrics, and a clear message when no
// daemon runs.
func TestLabCtl(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(ctlConfig, "on"))

	proxied := openPair(t, lab, 5001)
	proxied.exchange(t, 1<<20, 'a')
	spliced := openPair(t, lab, 5002)
	spliced.exchange(t, 2<<20, 'c')

	var st api.Status
	ctlJSON(t, d, &st, "status")
	if st.Flows[api.StateProxied] != 1 || st.Flows[api.StateSpliced] != 1 || len(st.Engines) != 2 || st.Version == "" {
		t.Fatalf("status: %+v", st)
	}
	if out, code := runCtl(t, d, "status"); code != 0 || !strings.Contains(out, "1 proxied, 0 splicing, 1 spliced") || !strings.Contains(out, "KERNEL USER_DROPPED") ||
		!strings.Contains(out, "transition phases") {
		t.Fatalf("status table (exit %d):\n%s", code, out)
	}
	// Every phase of the splice was timed once.
	phases := map[string]uint64{}
	for _, e := range st.Engines {
		for _, p := range e.Phases {
			phases[p.Transition+" "+p.Name] = p.Count
		}
	}
	for _, name := range []string{"divert", "drain", "barrier", "capture", "install", "release", "record"} {
		if phases["splice "+name] != 1 {
			t.Errorf("splice phase %s timed %d times, want 1: %v", name, phases["splice "+name], phases)
		}
	}

	var flows []api.Flow
	ctlJSON(t, d, &flows, "flows")
	p, s := findFlow(flows, proxied.client.LocalAddr()), findFlow(flows, spliced.client.LocalAddr())
	if p == nil || s == nil {
		t.Fatalf("flows do not list both: %+v", flows)
	}
	if p.State != api.StateProxied || p.BytesC2S != 1<<20 || p.BytesS2C != 1<<20 || p.Service != "fwd" {
		t.Errorf("proxied flow: %+v", p)
	}
	if s.State != api.StateSpliced || s.BytesC2S != 2<<20 || s.BytesS2C != 2<<20 || s.PacketsC2S == 0 || s.SplicedAt == nil {
		t.Errorf("spliced flow: %+v", s)
	}
	ctlJSON(t, d, &flows, "flows", "-state", "spliced")
	if len(flows) != 1 || flows[0].ID != s.ID {
		t.Errorf("flows -state spliced: %+v", flows)
	}
	if out, code := runCtl(t, d, "flows", "-port", "5001"); code != 0 || !strings.Contains(out, "fwd") || strings.Contains(out, "spl ") {
		t.Errorf("flows -port 5001 (exit %d):\n%s", code, out)
	}

	// Splice the proxied flow by ID; its data stays intact.
	var after api.Flow
	ctlJSON(t, d, &after, "splice", fmt.Sprint(p.ID))
	if after.State != api.StateSpliced {
		t.Fatalf("after splice: %+v", after)
	}
	proxied.exchange(t, 1<<20, 'e')
	var one api.Flow
	ctlJSON(t, d, &one, "flow", fmt.Sprint(p.ID))
	if one.State != api.StateSpliced || one.BytesC2S != 2<<20 || one.BytesS2C != 2<<20 {
		t.Errorf("flow %d after the splice and 1 MiB more: %+v", p.ID, one)
	}
	// Unsplice it: back in the proxy, its data still intact, its bytes
	// counted once; then splice it again. The engines' totals stay: the
	// megabyte the engine moved stays the engine's (it was the proxy's
	// after the unsplice, and the engine's total fell).
	var beforeUnsplice, afterUnsplice api.Status
	ctlJSON(t, d, &beforeUnsplice, "status")
	ctlJSON(t, d, &after, "unsplice", fmt.Sprint(p.ID))
	if after.State != api.StateProxied {
		t.Fatalf("after unsplice: %+v", after)
	}
	ctlJSON(t, d, &afterUnsplice, "status")
	for i, e := range afterUnsplice.Engines {
		was := beforeUnsplice.Engines[i]
		if e.BytesC2S != was.BytesC2S || e.BytesS2C != was.BytesS2C {
			t.Errorf("%s engine's totals went from %d/%d bytes to %d/%d at an unsplice", e.Name, was.BytesC2S, was.BytesS2C, e.BytesC2S, e.BytesS2C)
		}
	}
	proxied.exchange(t, 1<<20, 'g')
	ctlJSON(t, d, &one, "flow", fmt.Sprint(p.ID))
	if one.State != api.StateProxied || one.BytesC2S != 3<<20 || one.BytesS2C != 3<<20 {
		t.Errorf("flow %d after the unsplice and 1 MiB more: %+v", p.ID, one)
	}
	ctlJSON(t, d, &after, "splice", fmt.Sprint(p.ID))
	proxied.exchange(t, 1<<20, 'i')
	ctlJSON(t, d, &one, "flow", fmt.Sprint(p.ID))
	if one.State != api.StateSpliced || one.BytesC2S != 4<<20 || one.BytesS2C != 4<<20 {
		t.Errorf("flow %d spliced again and 1 MiB more: %+v", p.ID, one)
	}
	if out, code := runCtl(t, d, "unsplice", fmt.Sprint(s.ID+1000)); code != 1 || !strings.Contains(out, "no flow") {
		t.Errorf("unsplice of an unknown flow (exit %d): %s", code, out)
	}
	if out, code := runCtl(t, d, "flow", "999999"); code != 1 || !strings.Contains(out, "no flow 999999") {
		t.Errorf("unknown flow (exit %d): %s", code, out)
	}

	// The ruleset as the kernel has it: equal to nft's own listing.
	kernel, err := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
	if err != nil {
		t.Fatal(err)
	}
	if out, code := runCtl(t, d, "ruleset"); code != 0 || out != rules.StripRuntime(kernel) {
		t.Errorf("splicectl ruleset differs from nft list table (exit %d):\n%s\n---\n%s", code, out, kernel)
	}
	if out, code := runCtl(t, d, "ruleset", "-diff"); code != 0 || !strings.Contains(out, "as spliced installed it") {
		t.Errorf("ruleset -diff without drift (exit %d): %s", code, out)
	}

	// Prometheus metrics, scraped from inside the gateway.
	var c net.Conn
	if err := lab.Gateway.Do(func() (err error) {
		c, err = net.Dial("tcp", "127.0.0.1:9410") // a socket of the gateway's namespace
		return err
	}); err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) { return c, nil }}}
	resp, err := hc.Get("http://127.0.0.1:9410/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	metrics := string(b)
	for _, want := range []string{`spliced_flows{state="spliced"} 2`, "spliced_splices_total 3", "spliced_unsplices_total 1", "spliced_splice_duration_seconds_bucket",
		`spliced_bytes_total{direction="c2s",engine="splice"}`, `spliced_packets_total{verdict="forward"}`, "spliced_queue_kernel_drops_total", "spliced_rewrite_errors_total",
		`spliced_transition_phase_seconds_count{phase="capture",transition="splice"} 3`,
		`spliced_transition_phase_seconds_count{phase="rebuild",transition="unsplice"} 1`,
		`spliced_transition_phase_seconds_count{phase="hand_back",transition="unsplice"} 1`, "spliced_warnings 0"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	d.Stop()
	if out, code := runCtl(t, d, "status"); code != 1 || !strings.Contains(out, "spliced is not running") {
		t.Errorf("without a daemon (exit %d): %s", code, out)
	}
}

// TestLabCtlDiff: with repair off, an edit made with the nft command shows
// in `splicectl ruleset -diff`, which exits 1.
func TestLabCtlDiff(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(ctlConfig, "off\n  own_table: off")) // nft edits it
	if _, err := lab.Gateway.Run("nft", "add", "rule", "inet", "spliced", "services", "tcp", "dport", "9999", "counter", "accept"); err != nil {
		t.Fatal(err)
	}
	out, code := runCtl(t, d, "ruleset", "-diff")
	if code != 1 || !strings.Contains(out, "+\t\ttcp dport 9999 counter packets 0 bytes 0 accept") {
		t.Fatalf("ruleset -diff after an nft edit (exit %d):\n%s", code, out)
	}
	var rs api.Ruleset
	out, _ = runCtl(t, d, "-j", "ruleset", "-diff")
	if err := json.Unmarshal([]byte(out), &rs); err != nil || !rs.Drift {
		t.Fatalf("-j ruleset -diff: %v %+v", err, rs)
	}
	if err := d.WaitLog(15*time.Second, func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "ruleset drift") && strings.Contains(fmt.Sprint(l["msg"]), "leaving it")
	}); err != nil {
		t.Fatalf("drift not logged: %v", err)
	}
}

// TestLabRepairUnderLoad: deleting spliced's table with nft while flows
// run: the daemon notices and restores it within a second, logs it, new
// connections are intercepted again, and a spliced transfer running
// across the deletion completes intact.
func TestLabRepairUnderLoad(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(ctlConfig, "on\n  own_table: off")) // nft deletes it
	events := watch(t, d)

	// A spliced transfer spanning the deletion.
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5002)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	started := make(chan struct{})
	var once bool
	done := make(chan *testnet.Transfer, 1)
	go func() {
		done <- testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 100 << 20, S2C: 100 << 20, Seed: 9, WriteSize: 16 << 10,
			Progress: func(sent int64) {
				if sent > 10<<20 && !once {
					once = true
					close(started)
					time.Sleep(300 * time.Millisecond) // keep the flow alive across the deletion
				}
			}})
	}()
	<-started
	deleted := time.Now()
	if _, err := lab.Gateway.Run("nft", "delete", "table", "inet", "spliced"); err != nil {
		t.Fatal(err)
	}
	// Restored within a second.
	if err := testnet.Poll(time.Second, func() error {
		out, err := lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
		if err != nil || !strings.Contains(out, "tproxy") {
			return fmt.Errorf("not restored: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("restored %v after the deletion", time.Since(deleted).Round(time.Millisecond))
	for _, msg := range []string{"ruleset drift: someone changed spliced's table or routing; restoring it", "ruleset restored"} {
		if err := d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == msg }); err != nil {
			t.Errorf("%q not logged: %v", msg, err)
		}
	}
	if err := events.waitKind(api.EventRepaired, 5*time.Second); err != nil {
		t.Error(err)
	}
	// New connections are intercepted again.
	p := openPair(t, lab, 5001)
	p.exchange(t, 64<<10, 'x')
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow opened" && l["client"] == p.client.LocalAddr().String()
	}); err != nil {
		t.Errorf("a connection after the repair was not intercepted: %v", err)
	}
	tr := <-done
	if err := tr.Check(); err != nil {
		t.Fatalf("the spliced transfer across the deletion: %v", err)
	}
}

// TestLabReload: SIGHUP with an added service; new flows of that service
// are intercepted while a spliced transfer started before completes
// intact; a bad file is refused and nothing changes.
func TestLabReload(t *testing.T) {
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(ctlConfig, "on"))
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5002)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	reloaded := make(chan struct{})
	var once bool
	done := make(chan *testnet.Transfer, 1)
	added := fmt.Sprintf(ctlConfig, "on") + "  - name: added\n    listen: 15003\n    ports: [\"5003\"]\n"
	go func() {
		done <- testnet.RunTransfer(lab.Client(), ln, srv, testnet.TransferOptions{C2S: 200 << 20, S2C: 200 << 20, Seed: 4,
			Progress: func(sent int64) {
				if sent > 20<<20 && !once {
					once = true
					os.WriteFile(d.Config, []byte(added), 0o600)
					d.Signal(syscall.SIGHUP)
					d.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "configuration reloaded" })
					close(reloaded)
				}
			}})
	}()
	tr := <-done
	<-reloaded
	if err := tr.Check(); err != nil {
		t.Fatalf("spliced transfer across the reload: %v", err)
	}
	if d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" && l["server"] == srv.String() }) == nil {
		t.Fatal("the long transfer was not spliced")
	}
	p := openPair(t, lab, 5003)
	p.exchange(t, 64<<10, 'r')
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow opened" && l["service"] == "added"
	}); err != nil {
		t.Fatalf("the added service does not intercept: %v", err)
	}
	// A broken file is refused; the running configuration stays.
	os.WriteFile(d.Config, []byte("services:\n  - name: x\n    listn: 1\n"), 0o600)
	d.Signal(syscall.SIGHUP)
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
		return strings.HasPrefix(fmt.Sprint(l["msg"]), "reload refused")
	}); err != nil {
		t.Fatal(err)
	}
	var st api.Status
	ctlJSON(t, d, &st, "status")
	if len(st.Services) != 3 || st.Reloads != 1 {
		t.Fatalf("after a refused reload: services %v, reloads %d", st.Services, st.Reloads)
	}
}

// eventLog collects the daemon's event stream.
type eventLog struct {
	ch chan api.Event
}

func watch(t *testing.T, d *testnet.Daemon) *eventLog {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e := &eventLog{ch: make(chan api.Event, 1024)}
	go d.Client().Events(ctx, func(ev api.Event) error {
		select {
		case e.ch <- ev:
		default:
		}
		return nil
	})
	// The stream starts with a "subscribed" event: from then on nothing is
	// missed.
	if err := e.waitKind(api.EventSubscribed, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *eventLog) waitKind(kind string, within time.Duration) error {
	timeout := time.After(within)
	for {
		select {
		case ev := <-e.ch:
			if ev.Kind == kind {
				return nil
			}
		case <-timeout:
			return fmt.Errorf("no %q event within %v", kind, within)
		}
	}
}

// TestMain removes the daemon binaries the lab tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	testnet.RemoveBinaries()
	os.Exit(code)
}
