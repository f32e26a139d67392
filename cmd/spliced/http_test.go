package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"spliced/api"
	"spliced/testnet"
)

// httpLab is a lab with two nginx backends (server 0 serves /a/, server 1
// /b/, each file random and distinct) and spliced running an HTTP service
// on port 80.
type httpLab struct {
	lab  *testnet.Lab
	d    *testnet.Daemon
	sums map[string]string // path -> SHA-256 of the body
	vip  netip.AddrPort    // where clients send their requests
}

const (
	httpSmall  = 4 << 10
	httpMedium = 256 << 10
	httpBig    = 1 << 20
	httpHuge   = 50 << 20
)

func httpConfig(mode string) string {
	splice, kernel := "never", ""
	if spliceMode(mode) {
		splice = "immediate"
	}
	if mode == "splice-bpf" {
		kernel = "kernel:\n  datapath: bpf\n"
	}
	return fmt.Sprintf(`
log:
  level: debug
%smetrics:
  listen: 127.0.0.1:9410
services:
  - name: web
    listen: 15080
    ports: ["80"]
    proxy: http
    splice:
      mode: %s
    http:
      splice_min: 64KiB
      splice_policy: always
      routes:
        - path: /a/
          backends: ["10.2.0.2:8080"]
        - path: /b/
          backends: ["10.2.1.2:8080"]
        - path: /private/
          action: deny
        - path: /dead/
          backends: ["10.2.0.2:9"]
        - path: /fake/
          backends: ["10.2.0.2:9001"]
        - host: www.example
          path: /
          backends: ["10.2.0.2:8080", "10.2.1.2:8080"]
          balance: least_conn
`, kernel, splice)
}

func startHTTPLab(t *testing.T, mode string, opt testnet.Options, setup func(*testnet.Lab)) *httpLab {
	t.Helper()
	return startHTTPLabConf(t, httpConfig(mode), opt, setup)
}

// startHTTPLabConf is startHTTPLab with the daemon's configuration.
func startHTTPLabConf(t *testing.T, conf string, opt testnet.Options, setup func(*testnet.Lab)) *httpLab {
	t.Helper()
	testnet.Privileged(t, "nginx")
	opt.Servers = 2
	hl := &httpLab{lab: testnet.NewT(t, opt), sums: map[string]string{}}
	if setup != nil {
		setup(hl.lab)
	}
	for k, dir := range []string{"a", "b"} {
		root := t.TempDir()
		os.Chmod(root, 0o755)
		www := filepath.Join(root, "www", dir)
		if err := os.MkdirAll(www, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, size := range map[string]int64{"small.bin": httpSmall, "medium.bin": httpMedium, "big.bin": httpBig, "huge.bin": httpHuge} {
			f, err := os.Create(filepath.Join(www, i))
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			io.CopyN(io.MultiWriter(f, h), testnet.NewRandomStream(uint64(k*10+len(i))), size)
			f.Close()
			hl.sums["/"+dir+"/"+i] = hex.EncodeToString(h.Sum(nil))
		}
		stop, err := hl.lab.Servers[k].StartNginx(root)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stop)
	}
	hl.d = testnet.StartDaemon(t, hl.lab, conf)
	hl.vip = netip.AddrPortFrom(hl.lab.Server().IPv4, 80)
	return hl
}

// httpClient is one keep-alive connection from the client namespace.
type httpClient struct {
	t *testing.T
	c *net.TCPConn
	r *bufio.Reader
	// pending is a response whose header was read and whose body was
	// not (or only its start, hashed in pendingHash).
	pending     *http.Response
	pendingHash hash.Hash
}

func (hl *httpLab) dial(t *testing.T) *httpClient {
	t.Helper()
	c, err := hl.lab.Client().Dial(hl.vip, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &httpClient{t: t, c: c, r: bufio.NewReader(c)}
}

func (hc *httpClient) send(path string) {
	hc.t.Helper()
	if _, err := fmt.Fprintf(hc.c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		hc.t.Fatal(err)
	}
}

// response reads one response and returns its status and body hash.
func (hc *httpClient) response() (int, string, error) {
	hc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(hc.r, nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return resp.StatusCode, "", err
	}
	return resp.StatusCode, hex.EncodeToString(h.Sum(nil)), nil
}

func (hl *httpLab) expect(hc *httpClient, path string) {
	hc.t.Helper()
	code, sum, err := hc.response()
	if err != nil || code != 200 || sum != hl.sums[path] {
		hc.t.Fatalf("%s: status %d, %v, body sha %s, want %s\n%s", path, code, err, sum, hl.sums[path], tail(hl.d.Log(), 20))
	}
}

// metrics scrapes the daemon's Prometheus endpoint in the gateway's
// namespace.
func (hl *httpLab) metrics(t *testing.T) string {
	t.Helper()
	return scrapeMetrics(t, hl.lab, "127.0.0.1:9410")
}

// scrapeMetrics reads a daemon's Prometheus endpoint at addr in the
// lab's gateway namespace.
func scrapeMetrics(t *testing.T, lab *testnet.Lab, addr string) string {
	t.Helper()
	var c net.Conn
	if err := lab.Gateway.Do(func() error {
		var err error
		c, err = net.Dial("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	// Parsed, not read raw: a chunked body's chunk boundaries fall
	// anywhere, in the middle of a metric's line too.
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// took lists the took_us of the first log lines with msg.
func (hl *httpLab) took(msg string) string {
	var took []string
	for _, l := range hl.d.Lines() {
		if l["msg"] == msg && len(took) < 8 {
			took = append(took, fmt.Sprint(l["took_us"]))
		}
	}
	return strings.Join(took, " ")
}

func (hl *httpLab) count(msg string) int {
	n := 0
	for _, l := range hl.d.Lines() {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// keepAliveLoop sends requests on one connection, alternating between the
// two backends by path, big responses mostly, and checks every body; it
// returns how many big responses there were.
func (hl *httpLab) keepAliveLoop(t *testing.T, n int, proofEvery int, mode string) int {
	hc := hl.dial(t)
	big := 0
	for i := range n {
		dir := []string{"a", "b"}[i%2]
		file := "big.bin"
		if i%10 == 9 {
			file = "small.bin"
		}
		path := "/" + dir + "/" + file
		hc.send(path)
		if file != "big.bin" {
			hl.expect(hc, path)
			continue
		}
		big++
		if !spliceMode(mode) || proofEvery == 0 || big%proofEvery != 0 {
			hl.expect(hc, path)
			continue
		}
		// While this response flows, the gateway holds no socket of the
		// flow. The client reads a part first, as clients do: one that
		// reads nothing would hold the splice's drain until its timeout.
		if code, err := readStatus(hc); err != nil || code != 200 {
			t.Fatalf("%s: status %d, %v", path, code, err)
		}
		if err := readBodyStart(hc, 64<<10); err != nil {
			t.Fatal(err)
		}
		if err := hl.d.WaitLog(10*time.Second, func(map[string]any) bool { return hl.count("flow spliced") >= big }); err != nil {
			t.Fatalf("response %d not spliced: %v", i, err)
		}
		if err := gatewayHasSocket(hl.lab, hc.c.LocalAddr().String()); err == nil {
			t.Fatalf("request %d: the gateway has a socket of the spliced flow", i)
		}
		hl.expectBody(hc, path)
	}
	return big
}

// TestLabHTTPKeepAlive: 200 requests on one connection alternating
// between two nginx backends by path; every body verified; with splicing,
// every big response is spliced (and proven so regularly: no gateway
// socket) and the flow is unspliced for every request after one.
func TestLabHTTPKeepAlive(t *testing.T) {
	t.Parallel()
	for _, mode := range bpfModes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			big := hl.keepAliveLoop(t, 200, 20, mode)
			spliced, unspliced := hl.count("flow spliced"), hl.count("flow unspliced")
			want := 0
			if spliceMode(mode) {
				want = big
			}
			if spliced != want {
				t.Errorf("%s: %d big responses, %d splices, want %d", mode, big, spliced, want)
			}
			if spliceMode(mode) && unspliced < big-1 {
				t.Errorf("%d unsplices for %d spliced responses", unspliced, spliced)
			}
			if mode == "splice-bpf" {
				// Responses ran on the program; the next request, which
				// the program passes to the queue, took the flow back to
				// the Go engine for its unsplice. (The datapath in a
				// "flow spliced" record is a snapshot: a request that
				// comes at once demotes the flow before it is logged.)
				st, err := hl.d.Client().Status(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				for _, e := range st.Engines {
					if e.Datapath == "bpf" {
						// Each splice is promoted, or not when its unsplice
						// began first (the next request came while the
						// promotion waited for the queue to empty). Each
						// promoted flow but the last is demoted by the next
						// request; the last one ends spliced.
						if e.BPFPromotions+e.BPFPromoteSkipped != uint64(spliced) || e.BPFPromotions == 0 || e.BPFPromoteFails != 0 ||
							e.BPFDemotions+1 < e.BPFPromotions || e.BPFVerdicts["pass"] == 0 {
							t.Errorf("%d splices, %d promotions (%d failed, %d not promoted: unspliced first), %d demotions, program verdicts %v",
								spliced, e.BPFPromotions, e.BPFPromoteFails, e.BPFPromoteSkipped, e.BPFDemotions, e.BPFVerdicts)
						}
						t.Logf("bpf: %d promotions, %d not promoted (unspliced first), %d demotions, %d stragglers dropped, forwarded %d",
							e.BPFPromotions, e.BPFPromoteSkipped, e.BPFDemotions, e.BPFStragglers, e.BPFVerdicts["forward"])
					}
				}
			}
			// Counters per route and backend: 100 requests each way.
			metrics := hl.metrics(t)
			for _, want := range []string{
				`spliced_http_requests_total{backend="10.2.0.2:8080",route="/a/",service="web"} 100`,
				`spliced_http_requests_total{backend="10.2.1.2:8080",route="/b/",service="web"} 100`,
				`spliced_http_requests_total{backend="",route="/a/",service="web"} 100`,
			} {
				if !strings.Contains(metrics, want) {
					t.Errorf("metrics lack %s", want)
				}
			}
			t.Logf("%s: 200 requests, %d big responses, %d splices, %d unsplices; in µs, splices took %s, unsplices %s", mode, big, spliced, unspliced,
				hl.took("flow spliced"), hl.took("flow unspliced"))
		})
	}
}

// TestLabHTTPPipelined: the client sends its next request while the
// previous response still flows: the gateway unsplices in the middle of a
// response, the proxy relays its rest, then serves the next one, to the
// other backend; everything arrives intact and in order.
func TestLabHTTPPipelined(t *testing.T) {
	t.Parallel()
	for _, mode := range bpfModes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			if dir := os.Getenv("SPLICED_CAPTURE"); dir != "" {
				stop, err := hl.lab.Client().Capture("eth0", dir+testFileName(t, "client.pcap"), "tcp port 80")
				if err != nil {
					t.Fatal(err)
				}
				defer stop()
				stop2, err := hl.lab.Server().Capture("eth0", dir+testFileName(t, "server.pcap"), "tcp port 8080")
				if err != nil {
					t.Fatal(err)
				}
				defer stop2()
			}
			hc := hl.dial(t)
			// Each next request goes out while the previous response
			// still flows; after a huge response has started spliced, so
			// the unsplice happens in the middle of it.
			paths := []string{"/a/huge.bin", "/b/huge.bin", "/a/big.bin", "/b/huge.bin", "/a/small.bin", "/b/big.bin"}
			hc.send(paths[0])
			// Response i's own splice is the one logged with more bytes
			// relayed than the bodies of all responses before it: an
			// earlier response's splice may be logged after response i
			// started (pipelined), so counting splices cannot tell them
			// apart.
			var before int64 // body bytes of the responses before i
			busy := 0
			for i := range paths {
				if i+1 == len(paths) {
					hl.expect(hc, paths[i])
					break
				}
				code, err := readStatus(hc)
				if err != nil || code != 200 {
					t.Fatalf("%s: status %d, %v", paths[i], code, err)
				}
				if spliceMode(mode) && strings.HasSuffix(paths[i], "huge.bin") {
					// Read a part, as a client does: a receiver that reads
					// nothing would hold the splice's drain until its
					// timeout (the response then stays proxied).
					if err := readBodyStart(hc, 1<<20); err != nil {
						t.Fatal(err)
					}
					if err := hl.d.WaitLog(10*time.Second, func(l map[string]any) bool {
						n, _ := l["bytes_s2c"].(float64)
						return l["msg"] == "flow spliced" && int64(n) >= before
					}); err != nil {
						t.Fatalf("%s not spliced: %v", paths[i], err)
					}
					busy++
				}
				hc.send(paths[i+1])
				hl.expectBody(hc, paths[i])
				before += httpBodySize(paths[i])
			}
			mid := hl.count("http: relaying the rest of a response after an unsplice")
			if spliceMode(mode) && mid < busy {
				t.Errorf("%d unsplices in the middle of a response, want %d (one per huge response)\n%s", mid, busy, tail(hl.d.Log(), 30))
			}
			t.Logf("%s: %d pipelined requests intact; %d splices, %d unsplices, %d in the middle of a response (took %s µs)",
				mode, len(paths), hl.count("flow spliced"), hl.count("flow unspliced"), mid, hl.took("flow unspliced"))
		})
	}
}

// httpBodySize is the size of a lab file by its path.
func httpBodySize(path string) int64 {
	for name, n := range map[string]int64{"small.bin": httpSmall, "medium.bin": httpMedium, "big.bin": httpBig, "huge.bin": httpHuge} {
		if strings.HasSuffix(path, "/"+name) {
			return n
		}
	}
	panic("no lab file " + path)
}

// readBodyStart reads the first n bytes of the pending response's body.
func readBodyStart(hc *httpClient, n int64) error {
	h := sha256.New()
	hc.pendingHash = h
	_, err := io.CopyN(h, hc.pending.Body, n)
	return err
}

func readStatus(hc *httpClient) (int, error) {
	hc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(hc.r, nil)
	if err != nil {
		return 0, err
	}
	hc.pending = resp
	return resp.StatusCode, nil
}

func (hl *httpLab) expectBody(hc *httpClient, path string) {
	hc.t.Helper()
	resp, h := hc.pending, hc.pendingHash
	hc.pending, hc.pendingHash = nil, nil
	if h == nil {
		h = sha256.New()
	}
	_, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	if sum := hex.EncodeToString(h.Sum(nil)); err != nil || sum != hl.sums[path] {
		hc.t.Fatalf("%s: body sha %s, %v; want %s\n%s", path, sum, err, hl.sums[path], tail(hl.d.Log(), 20))
	}
}

// TestLabHTTPHuge: a 50 MB response each from both backends, with curl.
func TestLabHTTPHuge(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			out := filepath.Join(t.TempDir(), "out")
			for _, path := range []string{"/a/huge.bin", "/b/huge.bin"} {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				b, err := hl.lab.Client().Command(ctx, "curl", "-sS", "-o", out, "http://"+hl.vip.String()+path).CombinedOutput()
				cancel()
				if err != nil {
					t.Fatalf("curl %s: %v: %s", path, err, b)
				}
				if sum, err := fileSum(out); err != nil || sum != hl.sums[path] {
					t.Fatalf("%s: sha %s, %v", path, sum, err)
				}
			}
		})
	}
}

// TestLabHTTPErrors: a malformed request gets 400 and the connection
// closes; a host and path no route matches 404; a denied path 403; a
// route whose backend is dead 502; each is logged, and the next
// connection works.
func TestLabHTTPErrors(t *testing.T) {
	t.Parallel()
	hl := startHTTPLab(t, "splice", testnet.Options{}, nil)
	for _, c := range []struct {
		name, request string
		code          int
		log           string
	}{
		{"malformed", "GET /a/small.bin HTTP/1.1\r\nHost: test\r\nbroken header line\r\n\r\n", 400, "http: malformed request, closing the connection"},
		{"unknown host and path", "GET /nowhere HTTP/1.1\r\nHost: test\r\n\r\n", 404, "http: no route"},
		{"denied", "GET /private/x HTTP/1.1\r\nHost: test\r\n\r\n", 403, "http: denied"},
		{"dead backend", "GET /dead/x HTTP/1.1\r\nHost: test\r\n\r\n", 502, "http: no backend reachable"},
	} {
		t.Run(c.name, func(t *testing.T) {
			hc := hl.dial(t)
			fmt.Fprint(hc.c, c.request)
			code, _, err := hc.response()
			if err != nil || code != c.code {
				t.Fatalf("status %d, %v; want %d", code, err, c.code)
			}
			hc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if rest, err := io.ReadAll(hc.r); err != nil || len(rest) != 0 {
				t.Errorf("connection not closed after %d: %q, %v", code, rest, err)
			}
			if err := hl.d.WaitLog(5*time.Second, func(l map[string]any) bool { return l["msg"] == c.log }); err != nil {
				t.Errorf("no log line %q: %v", c.log, err)
			}
			next := hl.dial(t)
			next.send("/b/small.bin")
			hl.expect(next, "/b/small.bin")
		})
	}
	// An upload larger than nginx takes (client_max_body_size, 1 MiB by
	// default) gets nginx's 413, from curl as from any client, and the
	// service goes on.
	t.Run("upload over the backend's limit", func(t *testing.T) {
		upload := filepath.Join(t.TempDir(), "upload")
		if err := os.WriteFile(upload, make([]byte, 16<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := hl.lab.Client().Run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30",
			"--data-binary", "@"+upload, fmt.Sprintf("http://%s/a/upload", hl.vip))
		if strings.TrimSpace(out) != "413" {
			t.Fatalf("curl: %q, %v; want nginx's 413", out, err)
		}
		next := hl.dial(t)
		next.send("/a/small.bin")
		hl.expect(next, "/a/small.bin")
	})
	// A host route with two backends works as well.
	hc := hl.dial(t)
	fmt.Fprint(hc.c, "GET /a/small.bin HTTP/1.1\r\nHost: www.example\r\n\r\n")
	if code, _, err := hc.response(); err != nil || (code != 200 && code != 404) {
		t.Fatalf("host route: %d, %v", code, err)
	}
}

// TestLabHTTPLoss: the keep-alive loop with 1% random loss on both sides
// of the gateway completes intact.
func TestLabHTTPLoss(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, func(lab *testnet.Lab) {
				for _, ns := range []*testnet.NS{&lab.Client().NS, &lab.Servers[0].NS, &lab.Servers[1].NS} {
					nft(t, ns, "add table inet loss",
						"add chain inet loss in { type filter hook input priority 0; }",
						`add rule inet loss in iifname "eth0" meta l4proto tcp numgen random mod 100 < 1 drop`)
				}
			})
			big := hl.keepAliveLoop(t, 200, 0, mode)
			hl.checkSpliced(t, mode, big)
			t.Logf("%s: 200 requests with 1%% loss, %d big; %d splices, %d unsplices", mode, big, hl.count("flow spliced"), hl.count("flow unspliced"))
		})
	}
}

// TestLabHTTPInvalidDrop: `ct state invalid drop` in the gateway's forward
// and input chains does not break the loop.
func TestLabHTTPInvalidDrop(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			nft(t, &hl.lab.Gateway.NS, "add table inet fw",
				"add chain inet fw forward_filter { type filter hook forward priority 0; }",
				"add rule inet fw forward_filter ct state invalid counter drop",
				"add chain inet fw in { type filter hook input priority 0; }",
				"add rule inet fw in ct state invalid counter drop")
			if dir := os.Getenv("SPLICED_CAPTURE"); dir != "" {
				for _, h := range []*testnet.Host{hl.lab.Client(), hl.lab.Server()} {
					stop, err := h.Capture("eth0", dir+mode+"-"+h.Name+".pcap", "tcp")
					if err != nil {
						t.Fatal(err)
					}
					defer stop()
				}
			}
			// Evidence for a failure: what the drop rules took, and what
			// the gateway's TCP refused.
			defer func() {
				if t.Failed() {
					fw, _ := hl.lab.Gateway.Run("nft", "list", "table", "inet", "fw")
					t.Logf("the gateway's drop rules:\n%s\nthe gateway's TCP refused: %s", fw, tcpRejects(hl.lab.Gateway))
				}
			}()
			big := hl.keepAliveLoop(t, 200, 20, mode)
			hl.checkSpliced(t, mode, big)
		})
	}
}

// checkSpliced: with splicing, every big response was spliced; without,
// none was.
func (hl *httpLab) checkSpliced(t *testing.T, mode string, big int) {
	t.Helper()
	want := 0
	if mode == "splice" {
		want = big
	}
	if n := hl.count("flow spliced"); n != want {
		t.Errorf("%s: %d splices for %d big responses, want %d", mode, n, big, want)
	}
}

// TestLabHTTPWrk: wrk with 8 keep-alive connections against both backends
// for a few seconds: no socket error, no response other than 200, and in
// splice mode the responses were spliced and unspliced.
func TestLabHTTPWrk(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "wrk")
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			if dir := os.Getenv("SPLICED_CAPTURE"); dir != "" {
				for i, h := range []*testnet.Host{hl.lab.Client(), hl.lab.Server()} {
					stop, err := h.Capture("eth0", fmt.Sprintf("%s%s-%d.pcap", dir, mode, i), "tcp")
					if err != nil {
						t.Fatal(err)
					}
					defer stop()
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, err := hl.lab.Client().Command(ctx, "wrk", "-t2", "-c8", "-d3s", "http://"+hl.vip.String()+"/a/big.bin").CombinedOutput()
			if err != nil {
				t.Fatalf("wrk: %v\n%s", err, out)
			}
			if strings.Contains(string(out), "Socket errors") || strings.Contains(string(out), "Non-2xx") {
				t.Fatalf("wrk saw errors:\n%s\n%s", out, tail(hl.d.Log(), 40))
			}
			if mode == "splice" && (hl.count("flow spliced") == 0 || hl.count("flow unspliced") == 0) {
				t.Errorf("no splice or unsplice under wrk: %d, %d", hl.count("flow spliced"), hl.count("flow unspliced"))
			}
			t.Logf("%s: %s; %d splices, %d unsplices", mode, strings.TrimSpace(wrkRequests.FindString(string(out))), hl.count("flow spliced"), hl.count("flow unspliced"))
		})
	}
}

var wrkRequests = regexp.MustCompile(`Requests/sec:\s+[0-9.]+`)

// TestLabHTTPCloseSemantics: an HTTP/1.0 request and a request with
// Connection: close get their response, big (spliced when splicing) or
// small, and then the connection ends, as a careful proxy does.
func TestLabHTTPCloseSemantics(t *testing.T) {
	t.Parallel()
	hl := startHTTPLab(t, "splice", testnet.Options{}, nil)
	for _, c := range []struct{ name, request, path string }{
		{"http/1.0", "GET /a/big.bin HTTP/1.0\r\n\r\n", "/a/big.bin"},
		{"connection close", "GET /b/big.bin HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", "/b/big.bin"},
		{"http/1.0 small", "GET /a/small.bin HTTP/1.0\r\n\r\n", "/a/small.bin"},
	} {
		t.Run(c.name, func(t *testing.T) {
			hc := hl.dial(t)
			fmt.Fprint(hc.c, c.request)
			hl.expect(hc, c.path)
			hc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if rest, err := io.ReadAll(hc.r); err != nil || len(rest) != 0 {
				t.Errorf("connection not closed after the response: %q, %v", rest, err)
			}
		})
	}
}

// TestLabHTTPUpgradeAndChunked: a chunked response (from a Go backend) is
// relayed intact and never spliced; an upgrade request (101, then an echo
// protocol) is passed through spliced for the rest of its life, 8 MB each
// way intact, with no gateway socket for it meanwhile.
func TestLabHTTPUpgradeAndChunked(t *testing.T) {
	t.Parallel()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			ln, err := hl.lab.Server().Listen(netip.AddrPortFrom(hl.lab.Server().IPv4, 9001))
			if err != nil {
				t.Fatal(err)
			}
			chunk := strings.Repeat("chunked body through the gateway\n", 1000)
			mux := http.NewServeMux()
			mux.HandleFunc("/fake/chunked", func(w http.ResponseWriter, r *http.Request) {
				for i := 0; i < len(chunk); i += 4000 {
					io.WriteString(w, chunk[i:min(i+4000, len(chunk))])
					w.(http.Flusher).Flush() // no Content-Length: chunked
				}
			})
			mux.HandleFunc("/fake/ws", func(w http.ResponseWriter, r *http.Request) {
				c, rw, err := w.(http.Hijacker).Hijack()
				if err != nil {
					return
				}
				defer c.Close()
				rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
				rw.Flush()
				io.Copy(c, rw) // echo until the client closes its side
			})
			srv := &http.Server{Handler: mux}
			go srv.Serve(ln)
			defer srv.Close()

			hc := hl.dial(t)
			fmt.Fprint(hc.c, "GET /fake/chunked HTTP/1.1\r\nHost: test\r\n\r\n")
			hc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(hc.r, nil)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			if err != nil || string(body) != chunk || len(resp.TransferEncoding) == 0 {
				t.Fatalf("chunked response: %d bytes, %v, transfer encoding %v", len(body), err, resp.TransferEncoding)
			}
			if n := hl.count("flow spliced"); n != 0 {
				t.Errorf("a chunked response was spliced (%d)", n)
			}

			fmt.Fprint(hc.c, "GET /fake/ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
			resp, err = http.ReadResponse(hc.r, nil)
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("upgrade: %v, %v", resp, err)
			}
			if mode == "splice" {
				if err := hl.d.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "flow spliced" }); err != nil {
					t.Fatalf("the upgraded connection was not spliced: %v", err)
				}
				if err := gatewayHasSocket(hl.lab, hc.c.LocalAddr().String()); err == nil {
					t.Fatalf("the gateway still has a socket of the upgraded connection")
				}
			}
			const size = 8 << 20
			sent := make(chan error, 1)
			go func() {
				_, err := io.CopyN(hc.c, testnet.NewRandomStream(42), size)
				sent <- err
			}()
			want := sha256.New()
			io.CopyN(want, testnet.NewRandomStream(42), size)
			got := sha256.New()
			hc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.CopyN(got, hc.r, size); err != nil {
				t.Fatalf("echo: %v", err)
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
			if hex.EncodeToString(got.Sum(nil)) != hex.EncodeToString(want.Sum(nil)) {
				t.Fatalf("the echo differs from what was sent")
			}
			t.Logf("%s: chunked response of %d bytes relayed; upgraded connection echoed 8 MB; %d splices", mode, len(chunk), hl.count("flow spliced"))
		})
	}
}

// TestLabHTTPGatewayAddress: reverse-proxy use, where clients send their
// requests to an address of the gateway itself: the same service answers,
// and splices and unsplices as for an intercepted address.
func TestLabHTTPGatewayAddress(t *testing.T) {
	t.Parallel()
	hl := startHTTPLab(t, "splice", testnet.Options{}, nil)
	hl.vip = netip.AddrPortFrom(hl.lab.GatewayClientSide[0].IPv4, 80)
	big := hl.keepAliveLoop(t, 20, 0, "splice")
	hl.checkSpliced(t, "splice", big)
	if n := hl.count("flow unspliced"); n < big-1 {
		t.Errorf("%d unsplices for %d big responses", n, big)
	}
}

// smuggleNginx starts nginx on a server with an access log that records,
// for every request it serves, the request line as received and the path
// it resolved ($uri: decoded, dot segments and double slashes resolved).
// www/pub/index.txt is public; www/private/secret.txt holds a marker
// that must never reach a client; www/slow/big.bin (4 MiB) is sent at 1
// MiB/s. It returns the access log's path.
func smuggleNginx(t *testing.T, h *testnet.Host, port uint16) string {
	t.Helper()
	root := t.TempDir()
	os.Chmod(root, 0o755)
	for file, body := range map[string]string{"www/pub/index.txt": "public\n", "www/private/secret.txt": smuggleSecret + "\n",
		"www/slow/big.bin": strings.Repeat("0123456789abcdef", 4<<20/16)} {
		path := filepath.Join(root, file)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(root, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 1024; }
http {
    log_format smuggle '$request_uri|$uri|$status|$host';
    access_log %[1]s/access.log smuggle;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    server {
        listen %[2]d;
        root %[1]s/www;
        location /slow/ { limit_rate 1m; }
    }
}
`, root, port)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := h.Command(context.Background(), "nginx", "-c", conf)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("nginx: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if err := h.WaitListening(port, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "access.log")
}

const smuggleSecret = "SECRET-4f1c9a"

// smuggleConfig: /private/ is denied, everything else goes to nginx.
// Unsplices that cannot drain give up after 500 ms.
func smuggleConfig(mode string) string {
	splice := "never"
	if mode == "splice" {
		splice = "immediate"
	}
	return fmt.Sprintf(`
log:
  level: info
services:
  - name: web
    listen: 15080
    ports: ["80"]
    proxy: http
    splice:
      mode: %s
      drain_timeout: 500ms
    http:
      splice_min: 1
      splice_policy: always
      routes:
        - path: /private/
          action: deny
        - path: /
          backends: ["10.2.0.2:8081"]
`, splice)
}

// labSmuggleRequests are raw requests, each of which asks nginx for
// /private/secret.txt under some disguise (or hides such a request
// behind another), with the status the client must get first.
var labSmuggleRequests = []struct {
	name, raw string
	code      int
}{
	{"control: public file", "GET /pub/index.txt HTTP/1.1\r\nHost: t\r\n\r\n", 200},
	{"control: denied", "GET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"dot-dot", "GET /pub/../private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"dot", "GET /./private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"double slash", "GET //private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"encoded letters", "GET /%70rivate/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"encoded dots", "GET /pub/%2e%2e/private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"encoded slash", "GET /pub/..%2Fprivate%2Fsecret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"path parameter", "GET /pub/..;/private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"absolute-form", "GET http://t/pub/../private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 403},
	{"CL.TE", "POST /pub/index.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 51\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"TE.CL", "POST /pub/index.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n34\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\nX: \r\n\r\n0\r\n\r\n", 400},
	{"TE obfuscated", "POST /pub/index.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\nContent-Length: 51\r\n\r\n0\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"TE in HTTP/1.0", "POST /pub/index.txt HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"TE with space before colon", "POST /pub/index.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\nContent-Length: 51\r\n\r\n0\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"obs-fold", "GET /pub/index.txt HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400},
	{"bare LF", "GET /pub/../private/secret.txt HTTP/1.1\nHost: t\n\n", 400},
	{"bad chunk size", "POST /pub/index.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 400},
	{"upgrade nginx refuses", "GET /pub/index.txt HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 200},
	{"pipelined", "GET /pub/index.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /pub/../private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n", 200},
}

// TestLabHTTPSmuggling sends raw requests that hide a request for a
// denied path (/private/) through the daemon to a real nginx, copy and
// splice: the first status is as expected, no response carries the
// secret, and nginx's access log shows it never resolved a request to
// /private/. A last request sent to nginx directly, around the gateway,
// shows that the access log would tell.
func TestLabHTTPSmuggling(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "nginx")
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			lab := testnet.NewT(t, testnet.Options{})
			server := lab.Server()
			accessLog := smuggleNginx(t, server, 8081)
			d := testnet.StartDaemon(t, lab, smuggleConfig(mode))
			vip := netip.AddrPortFrom(server.IPv4, 80)
			for _, c := range labSmuggleRequests {
				c := c
				conn, err := lab.Client().Dial(vip, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				sent := time.Now()
				fmt.Fprint(conn, c.raw)
				conn.CloseWrite()
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				all, err := io.ReadAll(conn)
				conn.Close()
				if err != nil {
					t.Errorf("%s: %v after %q", c.name, err, all)
				}
				code := 0
				if resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(all)), nil); err == nil {
					code = resp.StatusCode
				}
				if code != c.code {
					t.Errorf("%s: status %d, want %d: %q", c.name, code, c.code, all)
				}
				if bytes.Contains(all, []byte(smuggleSecret)) {
					t.Errorf("%s: the secret reached the client:\n%s", c.name, all)
				}
				t.Logf("%-28s %d  %d responses  %v", c.name, code, bytes.Count(all, []byte("HTTP/1.1 ")), time.Since(sent).Round(time.Millisecond))
			}
			log, err := os.ReadFile(accessLog)
			if err != nil {
				t.Fatal(err)
			}
			served := strings.Count(string(log), "\n")
			for _, l := range strings.Split(strings.TrimSpace(string(log)), "\n") {
				if f := strings.Split(l, "|"); len(f) > 1 && strings.HasPrefix(f[1], "/private") {
					t.Errorf("nginx served a denied path through the gateway: %s", l)
				}
			}
			// The control: the same file asked of nginx directly shows
			// in its log.
			direct, err := lab.Client().Dial(netip.AddrPortFrom(server.IPv4, 8081), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprint(direct, "GET /pub/../private/secret.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
			direct.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, _ := io.ReadAll(direct)
			direct.Close()
			if !bytes.Contains(got, []byte(smuggleSecret)) {
				t.Errorf("control: nginx asked directly did not serve the secret: %q", got)
			}
			if err := testnet.Poll(5*time.Second, func() error {
				log, _ = os.ReadFile(accessLog)
				if !strings.Contains(string(log), "|/private/secret.txt|200|") {
					return fmt.Errorf("not in the access log")
				}
				return nil
			}); err != nil {
				t.Errorf("control: the direct request is not in nginx's access log: %v\n%s", err, log)
			}
			t.Logf("%s: %d raw requests; nginx served %d requests through the gateway, none under /private/; %d refusals logged, %d suppressed",
				mode, len(labSmuggleRequests), served, countMsg(d, "http: malformed request, closing the connection")+countMsg(d, "http: denied"), suppressedTotal(d))
		})
	}
}

func countMsg(d *testnet.Daemon, msg string) int {
	n := 0
	for _, l := range d.Lines() {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// suppressedTotal sums the "suppressed" counts of the daemon's lines.
func suppressedTotal(d *testnet.Daemon) int {
	n := 0
	for _, l := range d.Lines() {
		if s, ok := l["suppressed"].(float64); ok {
			n += int(s)
		}
	}
	return n
}

// TestLabHTTPLogFlood: 300 malformed requests, each on its own
// connection, leave the daemon's log (at info) a handful of lines, not
// one or two per request; the suppressed count is reported on the first
// such line after the limiter's 10 s interval.
func TestLabHTTPLogFlood(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "nginx")
	lab := testnet.NewT(t, testnet.Options{})
	smuggleNginx(t, lab.Server(), 8081)
	d := testnet.StartDaemon(t, lab, smuggleConfig("copy"), "-log-level", "info")
	vip := netip.AddrPortFrom(lab.Server().IPv4, 80)
	send := func(raw string) string {
		c, err := lab.Client().Dial(vip, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprint(c, raw)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c) // the daemon closes after its answer
		if err != nil {
			t.Fatal(err)
		}
		return string(got)
	}
	const flood = 300
	malformed := "GET /pub/index.txt HTTP/1.1\r\nHost: t\r\nbroken header line\r\n\r\n"
	before := len(d.Lines())
	start := time.Now()
	for i := range flood {
		if got := send(malformed); !strings.HasPrefix(got, "HTTP/1.1 400 ") {
			t.Fatalf("request %d: %q", i, got)
		}
	}
	took := time.Since(start)
	// A valid request last: once its "connection closed" line is read,
	// every line the flood caused was (one pipe, in order).
	if got := send("GET /pub/index.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 200 ") {
		t.Fatalf("valid request after the flood: %q", got)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "http connection closed" && l["reason"] == "finished"
	}); err != nil {
		t.Fatal(err)
	}
	lines := d.Lines()[before:]
	var msgs []string
	for _, l := range lines {
		msgs = append(msgs, fmt.Sprint(l["level"], " ", l["msg"]))
	}
	t.Logf("%d malformed requests in %v: %d log lines: %q", flood, took.Round(time.Millisecond), len(lines), msgs)
	if len(lines) > 5 {
		t.Errorf("%d log lines for %d malformed requests, want at most 5", len(lines), flood)
	}
	if n := countMsg(d, "http: malformed request, closing the connection"); n != 1 {
		t.Errorf("%d malformed-request lines, want 1", n)
	}
	// After the interval, the next one is logged with the count of those
	// suppressed. (Waiting for the limiter's interval, not for readiness.)
	time.Sleep(time.Until(start.Add(10*time.Second + 100*time.Millisecond)))
	send(malformed)
	var suppressed any
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		suppressed = l["suppressed"]
		return l["msg"] == "http: malformed request, closing the connection" && suppressed != nil
	}); err != nil {
		t.Fatalf("no line reports the suppressed count: %v\n%s", err, tail(d.Log(), 10))
	}
	if suppressed != float64(flood-1) {
		t.Errorf("suppressed %v, want %d", suppressed, flood-1)
	}
	t.Logf("after the interval: one line with suppressed=%v", suppressed)
}

// TestLabHTTPUnspliceAbortNoBypass: a client makes the unsplice its next
// request triggers fail (it stops acknowledging the spliced response, so
// the flow cannot drain), then asks for a denied path. The held request
// must not go to the backend unrouted: nginx's access log never shows it,
// and the secret never reaches the client.
func TestLabHTTPUnspliceAbortNoBypass(t *testing.T) {
	t.Parallel()
	testnet.Privileged(t, "nginx")
	lab := testnet.NewT(t, testnet.Options{})
	accessLog := smuggleNginx(t, lab.Server(), 8081)
	d := testnet.StartDaemon(t, lab, smuggleConfig("splice"))
	hc := &httpClient{t: t}
	c, err := lab.Client().Dial(netip.AddrPortFrom(lab.Server().IPv4, 80), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hc.c, hc.r = c, bufio.NewReader(c)
	fmt.Fprint(c, "GET /slow/big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
	if code, err := readStatus(hc); err != nil || code != 200 {
		t.Fatalf("status %d, %v", code, err)
	}
	if err := readBodyStart(hc, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool { return l["msg"] == "flow spliced" }); err != nil {
		t.Fatalf("the response was not spliced: %v", err)
	}
	id := uint64(d.FindLog(func(l map[string]any) bool { return l["msg"] == "flow spliced" })["flow"].(float64))
	// Keep reading, so that the response is in flight, then stop
	// acknowledging it: drop everything from the service in the client.
	body := make(chan error, 1)
	go func() {
		_, err := io.Copy(hc.pendingHash, hc.pending.Body)
		body <- err
	}()
	client := &lab.Client().NS
	nft(t, client, "add table inet mute", "add chain inet mute in { type filter hook input priority 0; }", "add rule inet mute in tcp sport 80 counter drop")
	// Whatever the engine forwards to the client from now on arrives
	// after the mute, and is never acknowledged. A dropped segment alone
	// does not show that: it may be a copy (a tail loss probe) of one
	// the client received and acknowledged before the mute, and then
	// the unsplice drains (it did once in CI).
	muted := serverSent(t, d, id)
	if err := testnet.Poll(10*time.Second, func() error {
		if sent := serverSent(t, d, id); int32(sent-muted) <= 0 {
			return fmt.Errorf("nothing forwarded to the client since the mute (highest %d)", sent)
		}
		if counted(t, client, "mute") == 0 {
			return fmt.Errorf("nothing dropped yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(c, "GET /private/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n")
	// The unsplice cannot drain: it gives up after drain_timeout.
	if err := d.WaitLog(10*time.Second, func(l map[string]any) bool {
		return strings.Contains(fmt.Sprint(l["err"]), "unsplice abandoned")
	}); err != nil {
		t.Fatalf("the unsplice did not give up: %v\n%s", err, tail(d.Log(), 20))
	}
	nft(t, client, "delete table inet mute")
	// Whatever the client gets now, it is not the secret, and nginx never
	// saw the request.
	var rest []byte
	select {
	case err := <-body:
		t.Logf("the big response ended: %v", err)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		rest, _ = io.ReadAll(hc.r)
	case <-time.After(30 * time.Second):
		t.Fatal("the client's connection neither ended nor finished its response")
	}
	if bytes.Contains(rest, []byte(smuggleSecret)) {
		t.Errorf("the denied file reached the client after the abandoned unsplice: %q", rest)
	}
	if err := d.WaitLog(5*time.Second, func(l map[string]any) bool {
		return l["msg"] == "flow closed" && strings.Contains(fmt.Sprint(l["reason"]), "unsplice abandoned")
	}); err != nil {
		t.Errorf("the flow did not end after the abandoned unsplice: %v", err)
	}
	log, _ := os.ReadFile(accessLog)
	if strings.Contains(string(log), "/private") {
		t.Errorf("nginx served the denied path after the abandoned unsplice:\n%s", log)
	}
	t.Logf("after the abandoned unsplice the client got %d more bytes (%q...); nginx's log:\n%s", len(rest), truncateBytes(rest, 80), log)
}

// serverSent is the end of the highest data the engine forwarded from
// the server to the client of spliced flow id, in the server's sequence
// space.
func serverSent(t *testing.T, d *testnet.Daemon, id uint64) uint32 {
	t.Helper()
	f, err := d.Client().Flow(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range f.Engine {
		if dir.Name == "s2c" {
			return dir.HighestSeq
		}
	}
	t.Fatalf("flow %d has no server-to-client engine state: %+v", id, f)
	return 0
}

func truncateBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// queueReceived is what the daemon's queues received, all together.
func queueReceived(t *testing.T, d *testnet.Daemon) uint64 {
	t.Helper()
	st, err := d.Client().Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, e := range st.Engines {
		for _, q := range e.Queues {
			n += q.Received
		}
	}
	return n
}

// TestLabHTTPUnsplicedLeavesQueue: once an unspliced flow's queue is
// empty, its divert entries go, so the responses relayed after it no
// longer cross the queue; a later response is spliced again (the entries
// come back) and every body is intact.
func TestLabHTTPUnsplicedLeavesQueue(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"splice", "splice-bpf"} {
		t.Run(mode, func(t *testing.T) {
			hl := startHTTPLab(t, mode, testnet.Options{}, nil)
			hc := hl.dial(t)
			get := func(path string) {
				hc.send(path)
				hl.expect(hc, path)
			}
			get("/a/big.bin") // spliced
			get("/a/small.bin")
			if err := hl.d.WaitLog(10*time.Second, func(map[string]any) bool { return hl.count("flow unspliced") == 1 }); err != nil {
				t.Fatalf("not unspliced: %v\n%s", err, tail(hl.d.Log(), 20))
			}
			if err := testnet.Poll(10*time.Second, func() error {
				out, err := hl.lab.Gateway.Run("nft", "list", "table", "inet", "spliced")
				if err != nil {
					return err
				}
				for _, set := range strings.Split(out, "\tset ")[1:] {
					if strings.HasPrefix(set, "divert") && strings.Contains(set, "elements = ") {
						return fmt.Errorf("divert entries stay:\n%s", set)
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			before := queueReceived(t, hl.d)
			for range 20 {
				get("/b/small.bin")
			}
			if after := queueReceived(t, hl.d); after != before {
				t.Errorf("20 relayed responses after the unsplice crossed the queue: %d packets", after-before)
			}
			get("/b/big.bin") // spliced again
			get("/a/small.bin")
			// The splice is logged once recorded (and promoted, on bpf),
			// which may come after the next request unspliced it.
			if err := hl.d.WaitLog(10*time.Second, func(map[string]any) bool { return hl.count("flow spliced") == 2 }); err != nil {
				t.Errorf("%d splices, want 2: %v\n%s", hl.count("flow spliced"), err, tail(hl.d.Log(), 20))
			}
			// Relayed again, whichever of the two logged last.
			if f, err := hl.d.Client().Flow(t.Context(), 1); err != nil || f.State != api.StateProxied {
				t.Errorf("the flow after its last response: %+v, %v; want state %s", f, err, api.StateProxied)
			}
			t.Logf("%s: divert entries gone after the unsplice; 20 relayed responses, 0 packets queued; spliced again", mode)
		})
	}
}

// TestLabHTTPUnsplicedConntrack: after an unsplice the flow's conntrack
// entry still runs from the client (the direction its SYN gave it), so
// that when the client resets the connection and connects again from the
// same port, conntrack takes the new SYN, and an operator's `ct state
// invalid drop` lets it through. Before, a splice deleted the entry and
// the rebuilt socket's first packet (the client's still crossed the queue
// untracked) started one from the service's address to the client:
// conntrack held the client's next SYN from that port INVALID.
func TestLabHTTPUnsplicedConntrack(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"splice", "splice-bpf"} {
		t.Run(mode, func(t *testing.T) {
			testnet.Privileged(t, "nft", "conntrack")
			hl := startHTTPLab(t, mode, testnet.Options{}, func(lab *testnet.Lab) {
				nft(t, &lab.Gateway.NS, "add table inet operator",
					"add chain inet operator input { type filter hook input priority 0; }",
					"add rule inet operator input ct state invalid counter drop")
			})
			hc := hl.dial(t)
			local := hc.c.LocalAddr().(*net.TCPAddr).AddrPort()
			hc.send("/a/big.bin") // spliced
			hl.expect(hc, "/a/big.bin")
			hc.send("/a/small.bin") // unspliced
			hl.expect(hc, "/a/small.bin")
			if err := hl.d.WaitLog(10*time.Second, func(map[string]any) bool { return hl.count("flow unspliced") == 1 }); err != nil {
				t.Fatalf("not unspliced: %v\n%s", err, tail(hl.d.Log(), 20))
			}
			hc.send("/a/small.bin") // relayed, tracked both ways once the passthrough ends
			hl.expect(hc, "/a/small.bin")
			entry := func() string {
				out, _ := hl.lab.Gateway.Run("conntrack", "-L", "-p", "tcp")
				for _, l := range strings.Split(out, "\n") {
					if strings.Contains(l, fmt.Sprintf("port=%d ", local.Port())) {
						return l
					}
				}
				return ""
			}
			e := entry()
			if want := fmt.Sprintf("src=%s dst=%s sport=%d dport=80 ", local.Addr(), hl.vip.Addr(), local.Port()); !strings.Contains(e, want) || strings.Index(e, "src=") != strings.Index(e, want) {
				t.Fatalf("the flow's conntrack entry after the unsplice: %q, want it from the client (%q first)", e, want)
			}
			// The client resets the connection and connects again from
			// its port.
			hc.c.SetLinger(0)
			hc.c.Close()
			again, synRetrans := hl.dialFrom(t, local)
			if synRetrans != 0 {
				t.Fatalf("the client's SYN from %v was retransmitted %d times; conntrack: %q; invalid dropped: %d", local, synRetrans, entry(), counted(t, &hl.lab.Gateway.NS, "operator"))
			}
			again.send("/b/small.bin")
			hl.expect(again, "/b/small.bin")
			if n := counted(t, &hl.lab.Gateway.NS, "operator"); n != 0 {
				t.Errorf("the operator's rule dropped %d invalid packets", n)
			}
			t.Logf("%s: conntrack entry after the unsplice %q; a reset, a new connection from %v: no SYN retransmission, 0 invalid", mode, e, local)
		})
	}
}

// dialFrom connects from local (a port of an earlier connection) and
// returns the connection and how often its SYN was retransmitted.
func (hl *httpLab) dialFrom(t *testing.T, local netip.AddrPort) (*httpClient, uint32) {
	t.Helper()
	c, retrans, err := dialFrom(hl.lab.Client(), local, hl.vip, 5*time.Second)
	if err != nil {
		t.Fatalf("connect from %v: %v", local, err)
	}
	t.Cleanup(func() { c.Close() })
	return &httpClient{t: t, c: c, r: bufio.NewReader(c)}, retrans
}

// TestLabHTTPBackendClosesWhileSpliced: a backend that closes its
// connection in the middle of a spliced response (it crashed, or it
// is hostile) has its FIN go through the engine to the client, which
// then sends its next request, or closes too. The flow must end: its
// client can read nothing more (it has had its end of stream), and a
// rebuilt socket cannot carry a FIN it already passed. Before, the
// flow was unspliced anyway: the proxy waited on the rebuilt upstream
// socket for the rest of the response, which never came nor ended, for
// upstream_timeout (here 0: for ever), and the client waited with it.
func TestLabHTTPBackendClosesWhileSpliced(t *testing.T) {
	for _, mode := range []string{"splice", "splice-bpf"} {
		t.Run(mode, func(t *testing.T) { testHTTPBackendClosesWhileSpliced(t, mode) })
	}
}

func testHTTPBackendClosesWhileSpliced(t *testing.T, mode string) {
	conf := strings.Replace(httpConfig(mode), "      splice_policy: always\n", "      splice_policy: always\n      upstream_timeout: 0s\n", 1)
	hl := startHTTPLabConf(t, conf, testnet.Options{}, nil)
	ln, err := hl.lab.Server().Listen(netip.AddrPortFrom(hl.lab.Server().IPv4, 9001))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	spliced := make(chan struct{}, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", 4<<20)
				c.Write(make([]byte, 256<<10))
				<-spliced // then close, short of the Content-Length
			}()
		}
	}()
	for _, how := range []string{"next request", "close"} {
		t.Run(how, func(t *testing.T) {
			before := hl.count("flow spliced")
			hc := hl.dial(t)
			defer hc.c.Close()
			fmt.Fprint(hc.c, "GET /fake/cut HTTP/1.1\r\nHost: test\r\n\r\n")
			hc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(hc.r, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.CopyN(io.Discard, resp.Body, 256<<10); err != nil {
				t.Fatal(err)
			}
			if err := hl.d.WaitLog(10*time.Second, func(map[string]any) bool { return hl.count("flow spliced") > before }); err != nil {
				t.Fatalf("the response was not spliced: %v", err)
			}
			spliced <- struct{}{}
			if _, err := io.Copy(io.Discard, resp.Body); err == nil {
				t.Fatal("the cut response read as whole")
			}
			if how == "close" {
				hc.c.CloseWrite()
			} else {
				fmt.Fprint(hc.c, "GET /a/small.bin HTTP/1.1\r\nHost: test\r\n\r\n")
			}
			// The flow ends: the daemon logs its close.
			port := float64(hc.c.LocalAddr().(*net.TCPAddr).Port)
			err = hl.d.WaitLog(20*time.Second, func(l map[string]any) bool {
				if l["msg"] != "flow closed" && l["msg"] != "http connection closed" {
					return false
				}
				return strings.HasSuffix(fmt.Sprint(l["client"]), fmt.Sprintf(":%d", int(port)))
			})
			if err != nil {
				t.Errorf("the flow did not end after its backend closed while spliced and its client %s: %v\n%s", how, err, tail(hl.d.Log(), 20))
			}
		})
	}
}
