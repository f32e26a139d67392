package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"spliced/testnet"
)

// scapyPython returns a python3 that imports scapy (Debian's
// python3-scapy is for /usr/bin/python3; a python3 earlier in PATH may
// lack it). As root it fails the test when there is none.
func scapyPython(t *testing.T) string {
	t.Helper()
	for _, py := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(py, "-c", "import scapy").Run() == nil {
			return py
		}
	}
	t.Fatal("no python3 imports scapy: install python3-scapy (scripts/deps.sh test)")
	return ""
}

// forged is what testdata/forge.py sent, per kind.
type forged map[string]uint64

// forge runs testdata/forge.py in ns for the direction from src to dst of
// a flow: count packets of each kind (blind RSTs, data with random
// sequence numbers, ACKs with random acknowledgment numbers, SYNs).
func forge(ctx context.Context, py string, ns *testnet.NS, src, dst netip.AddrPort, count int) (forged, error) {
	cmd := ns.Command(ctx, py, "testdata/forge.py", "eth0", src.Addr().String(), fmt.Sprint(src.Port()),
		dst.Addr().String(), fmt.Sprint(dst.Port()), fmt.Sprint(count))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("forge.py %v -> %v: %w\n%s%s", src, dst, err, out, stderr.String())
	}
	var f forged
	if err := json.Unmarshal(out, &f); err != nil {
		return nil, fmt.Errorf("forge.py %v -> %v: %w\n%s", src, dst, err, out)
	}
	return f, nil
}

// verdicts returns the splice engine's verdict counters.
func verdicts(t *testing.T, d *testnet.Daemon) map[string]uint64 {
	t.Helper()
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Engines {
		if e.Name == "splice" {
			return e.Verdicts
		}
	}
	return nil
}

// TestLabHostilePackets: while a flow moves data both ways, both of its
// ends' hosts forge packets on its tuple towards the other end (scapy,
// 1000 of each kind per direction): blind RSTs, data with random sequence
// numbers, ACKs acknowledging random sequence numbers, SYNs, and 100 RSTs
// inside the window but not at its edge. Spliced, the engine drops the
// first four kinds and counts each (drop_rst, drop_seq, drop_ack,
// drop_syn) and passes the in-window RSTs, which the receivers answer
// with challenge ACKs (RFC 5961) without ending the flow; copied, the
// gateway's sockets do their own checks. Either way the transfer finishes
// intact both ways (SHA-256). Found that any RST in the window ended a
// spliced flow for the engine: 5 s later its entries went and it stalled.
func TestLabHostilePackets(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) { testHostilePackets(t, mode) })
	}
}

func testHostilePackets(t *testing.T, mode string) {
	testnet.Privileged(t, "nft")
	py := scapyPython(t)
	lab := testnet.NewT(t, testnet.Options{})
	splice := "never"
	if mode == "splice" {
		splice = "immediate"
	}
	d := testnet.StartDaemon(t, lab, fmt.Sprintf(`
log:
  level: debug
services:
  - name: fwd
    listen: 15001
    ports: ["5001"]
    splice:
      mode: %s
`, splice))
	srv := netip.AddrPortFrom(lab.Server().IPv4, 5001)
	ln, err := lab.Server().Listen(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := lab.Client().Dial(srv, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	// Paced, so that the flow is busy both ways for about 12 s: three
	// times what forging took (3-4 s).
	const size, rate = 24 << 20, 2 << 20
	done := make(chan *testnet.Transfer, 1)
	go func() {
		done <- testnet.Exchange(c, s, testnet.TransferOptions{C2S: size, S2C: size, Seed: rand.Uint64(), Rate: rate, WriteSize: 16 << 10, Timeout: time.Minute})
	}()
	clientEnd := c.LocalAddr().(*net.TCPAddr).AddrPort()
	serverEnd := s.LocalAddr().(*net.TCPAddr).AddrPort()
	if mode == "splice" {
		if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
			return l["msg"] == "flow spliced" && l["client"] == clientEnd.String()
		}); err != nil {
			t.Fatal(err)
		}
	}
	before := verdicts(t, d)
	ends := []*testnet.NS{&lab.Client().NS, &lab.Server().NS, &lab.Gateway.NS}
	challenges, err := tcpExt(ends, "TCPChallengeACK")
	if err != nil {
		t.Fatal(err)
	}

	const count = 1000
	var wg sync.WaitGroup
	var mu sync.Mutex
	sent := forged{}
	start := time.Now()
	for _, f := range []struct {
		ns       *testnet.NS
		src, dst netip.AddrPort
	}{
		{&lab.Client().NS, clientEnd, c.RemoteAddr().(*net.TCPAddr).AddrPort()},
		{&lab.Server().NS, serverEnd, s.RemoteAddr().(*net.TCPAddr).AddrPort()},
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			got, err := forge(ctx, py, f.ns, f.src, f.dst, count)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			for k, n := range got {
				sent[k] += n
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	forging := time.Since(start)
	var tr *testnet.Transfer
	select {
	case tr = <-done:
		t.Errorf("the transfer ended before the forging did (%v): make it longer", forging)
	default:
		tr = <-done
	}
	if err := tr.Check(); err != nil {
		t.Fatalf("%s: %v\n%s", mode, err, tail(d.Log(), 30))
	}
	var total uint64
	for _, n := range sent {
		total += n
	}
	t.Logf("%s: %d packets forged in %v (%v), %d MB each way intact in %v", mode, total, forging.Round(time.Millisecond), sent, size>>20, tr.Elapsed.Round(time.Millisecond))
	if n, err := tcpExt(ends, "TCPChallengeACK"); err == nil {
		t.Logf("%s: challenge ACKs sent by the ends and the gateway: %d", mode, n-challenges)
	}
	if mode != "splice" {
		return
	}
	after := verdicts(t, d)
	dropped := map[string]uint64{}
	for _, v := range []string{"drop_rst", "drop_seq", "drop_ack", "drop_syn"} {
		dropped[v] = after[v] - before[v]
	}
	t.Logf("engine verdicts during the forging: %v", dropped)
	// Every SYN and nearly every blind RST and random-sequence segment is
	// dropped (a random number falls in a window of a few MB now and
	// then; the receiver then checks it again). ACKs carry the sequence
	// number the forger saw, which falls behind the flow as it moves:
	// later ones fail the sequence check, earlier ones the ack check.
	if dropped["drop_syn"] < sent["syn"] {
		t.Errorf("drop_syn %d, want %d", dropped["drop_syn"], sent["syn"])
	}
	if dropped["drop_rst"] < sent["rst"]*99/100 {
		t.Errorf("drop_rst %d of %d blind RSTs", dropped["drop_rst"], sent["rst"])
	}
	// The in-window RSTs pass (some fall behind the window on their way,
	// and are dropped): they are what ended a spliced flow before.
	if dropped["drop_rst"] >= sent["rst"]+sent["rst_in_window"] {
		t.Errorf("drop_rst %d: no in-window RST passed, the test proves nothing about them", dropped["drop_rst"])
	}
	if dropped["drop_seq"] < sent["data"]*99/100 { // and ACKs
		t.Errorf("drop_seq %d of %d data segments with random sequence numbers", dropped["drop_seq"], sent["data"])
	}
	// ACKs carry a sequence number learned 0-25 packets earlier; those
	// that fell behind the window meanwhile fail the sequence check.
	if dropped["drop_ack"] < sent["ack"]/2 {
		t.Errorf("drop_ack %d of %d ACKs of random sequence numbers", dropped["drop_ack"], sent["ack"])
	}
}
