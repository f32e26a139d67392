package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"spliced/api"
	"spliced/ctl"
	"spliced/testnet"
)

// TestLabStallReported: a spliced flow whose data stops in one direction
// while its sender keeps retransmitting is reported as stalled: counted,
// logged with the engine's state, and shown by `splicectl flow ID`; once
// the data moves again the report clears and the transfer completes
// intact. The stall is made by losing everything the client sends at the
// server for a while.
func TestLabStallReported(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, `
log:
  level: debug
services:
  - name: stall
    listen: 15001
    ports: ["7100"]
    upstream: nat
    splice:
      mode: immediate
      stall_after: 2s
`)
	dst := netip.AddrPortFrom(lab.Server().Addr(false), 7100)
	c, s := connectThrough(t, lab, dst)
	id := waitSpliced(t, d)
	// What the client sees, to explain a failure: TCP's recovery after
	// the loss decides whether the flow stalls a second time.
	capture := filepath.Join(t.TempDir(), "client.pcap")
	stopCapture, err := lab.Client().NS.Capture("eth0", capture, "tcp port 7100")
	if err != nil {
		t.Fatal(err)
	}
	defer stopCapture()

	// The client sends until told to stop.
	deadline := time.Now().Add(2 * time.Minute)
	c.SetDeadline(deadline)
	s.SetDeadline(deadline)
	stop := make(chan struct{})
	type result struct {
		n   int64
		sum [32]byte
	}
	sent := make(chan result, 1)
	go func() {
		h := sha256.New()
		src := io.TeeReader(testnet.NewRandomStream(3), h)
		buf := make([]byte, 32<<10)
		var n int64
		for {
			select {
			case <-stop:
				c.CloseWrite()
				sent <- result{n, [32]byte(h.Sum(nil))}
				return
			default:
			}
			io.ReadFull(src, buf)
			if _, err := c.Write(buf); err != nil {
				t.Errorf("client: %v", err)
				close(sent)
				return
			}
			n += int64(len(buf))
		}
	}()
	// The server reads all the time; the loss starts once data flows.
	got := &countingHash{h: sha256.New()}
	received := make(chan error, 1)
	go func() {
		_, err := io.Copy(got, s)
		received <- err
	}()
	testnet.Eventually(t, 10*time.Second, func() error {
		if n := got.n.Load(); n < 256<<10 {
			return fmt.Errorf("server got %d bytes", n)
		}
		return nil
	})

	nft(t, &lab.Server().NS, "add table inet lose",
		"add chain inet lose in { type filter hook input priority 0; }",
		`add rule inet lose in iifname "eth0" tcp dport 7100 counter drop`)
	if err := d.WaitLog(20*time.Second, func(l map[string]any) bool { return l["msg"] == stallMsg }); err != nil {
		f, _ := d.Client().Flow(context.Background(), id)
		t.Fatalf("no stall reported: %v\n%s\n%+v", err, tail(d.Log(), 10), f)
	}
	rec := d.FindLog(func(l map[string]any) bool { return l["msg"] == stallMsg })
	if rec["direction"] != "c2s" || uint64(rec["flow"].(float64)) != id {
		t.Errorf("stall reported for flow %v direction %v, want flow %d c2s", rec["flow"], rec["direction"], id)
	}
	if _, ok := rec["c2s"].([]any); !ok {
		if _, ok := rec["c2s"].(map[string]any); !ok {
			t.Errorf("the stall line has no engine state: %v", rec)
		}
	}
	f, err := d.Client().Flow(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Engine) != 2 || !f.Engine[0].Stalled || f.Engine[0].Unacknowledged == 0 || f.Engine[1].Stalled {
		t.Errorf("flow state: %+v", f.Engine)
	}
	var out, errOut bytes.Buffer
	if code := ctl.Run([]string{"-s", d.Socket, "flow", fmt.Sprint(id)}, &out, &errOut); code != 0 {
		t.Fatalf("splicectl flow: %d %s", code, errOut.String())
	}
	if !regexp.MustCompile(`client->server\s+STALLED: [1-9]\d* bytes unacknowledged`).MatchString(out.String()) || !strings.Contains(out.String(), "last verdict forward") {
		t.Errorf("splicectl flow shows no stall:\n%s", out.String())
	}
	t.Logf("splicectl flow %d:\n%s", id, out.String())
	if n := stalledFlows(t, d); n != 1 {
		t.Errorf("stalled flows counted: %d, want 1", n)
	}

	nft(t, &lab.Server().NS, "delete table inet lose")
	lossEnded := time.Now()
	before := got.n.Load()
	testnet.Eventually(t, 30*time.Second, func() error {
		if n := got.n.Load(); n < before+(1<<20) {
			return fmt.Errorf("server got %d bytes since the loss ended", n-before)
		}
		return nil
	})
	close(stop)
	if err := <-received; err != nil {
		t.Fatalf("server: %v", err)
	}
	if r := <-sent; got.n.Load() != r.n || [32]byte(got.h.Sum(nil)) != r.sum {
		t.Fatalf("the server got %d bytes, not the %d the client sent", got.n.Load(), r.n)
	}
	testnet.Eventually(t, 10*time.Second, func() error {
		f, err := d.Client().Flow(context.Background(), id)
		if err != nil {
			return nil // finished and reaped
		}
		if f.Engine[0].Stalled {
			return fmt.Errorf("still reported stalled: %+v", f.Engine[0])
		}
		return nil
	})
	if n := stalledFlows(t, d); n != 1 {
		stopCapture()
		t.Errorf("stalled flows counted: %d, want 1\nclient TCP: %s\nserver TCP: %s\nthe client's packets from 0.5 s before the loss ended:\n%s",
			n, tcpRecovery(lab.Client()), tcpRecovery(lab.Server()), decodeCapture(capture, lossEnded.Add(-500*time.Millisecond), 400))
	}
}

// tcpRecovery summarises a host's counters of TCP loss recovery.
func tcpRecovery(h *testnet.Host) string {
	return nstatCounters(h, "RetransSegs", "TCPTimeouts", "TCPLossUndo", "TCPSpuriousRTOs", "TCPLossFailures", "TCPFastRetrans",
		"TCPSlowStartRetrans", "TCPLostRetransmit", "TCPSackRecovery", "TCPOFOQueue", "TCPPartialUndo", "TCPFullUndo",
		"TCPDSACKUndo", "TCPRetransFail", "TCPSpuriousRtxHostQueues", "PAWSEstab", "TCPACKSkippedPAWS", "TCPSACKReneging")
}

// decodeCapture lists at most max packets of a capture from since on, as
// tshark summarises them (retransmissions and duplicate ACKs named,
// sequence numbers relative, SACK blocks and timestamps shown).
func decodeCapture(file string, since time.Time, max int) string {
	out, err := exec.Command("tshark", "-r", file, "-Y", fmt.Sprintf("frame.time_epoch >= %d.%09d", since.Unix(), since.Nanosecond()),
		"-T", "fields", "-e", "frame.time", "-e", "_ws.col.Info").Output()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > max {
		lines = append(lines[:max], fmt.Sprintf("(%d more)", len(lines)-max))
	}
	if err != nil {
		lines = append(lines, err.Error())
	}
	return strings.Join(lines, "\n")
}

const stallMsg = "spliced flow stalled: data unacknowledged while the flow is alive; please report it with this line"

// stalledFlows is the number of stalls the daemon counted.
func stalledFlows(t *testing.T, d *testnet.Daemon) uint64 {
	t.Helper()
	return spliceEngine(t, d).StalledFlows
}

// spliceEngine returns the splice engine's part of the daemon's status.
func spliceEngine(t *testing.T, d *testnet.Daemon) api.Engine {
	t.Helper()
	st, err := d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Engines {
		if e.Name == "splice" {
			return e
		}
	}
	t.Fatal("no splice engine in the status")
	return api.Engine{}
}

// countingHash hashes what is written to it and counts the bytes, which
// another goroutine may read.
type countingHash struct {
	h hash.Hash
	n atomic.Int64
}

func (c *countingHash) Write(p []byte) (int, error) {
	c.h.Write(p)
	c.n.Add(int64(len(p)))
	return len(p), nil
}
