package ftp

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"spliced/config"
	"spliced/proxy"
)

// sessionLab is one FTP session on loopback: the test plays the client
// and the server; the session runs between them as if the client's
// control connection to the server had been intercepted.
type sessionLab struct {
	s      *session
	client *net.TCPConn // the test's end of the client leg
	server *net.TCPConn // the test's end of the server leg
	done   chan string  // the reason run returned
}

func startSession(t *testing.T, extra string, opts ...func(*proxy.Flow)) *sessionLab {
	t.Helper()
	cfg, err := config.Parse("ftp.yaml", []byte("services:\n  - name: ftp\n    listen: 15021\n    ports: [\"21\"]\n    proxy: ftp\n"+extra))
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Base: proxy.Base{Service: &cfg.Services[0], Flows: proxy.NewFlowTable(100), Log: slog.New(slog.DiscardHandler)}}
	lo := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}
	srvLn, err := net.ListenTCP("tcp4", lo)
	if err != nil {
		t.Fatal(err)
	}
	defer srvLn.Close()
	gwLn, err := net.ListenTCP("tcp4", lo)
	if err != nil {
		t.Fatal(err)
	}
	defer gwLn.Close()
	client, err := net.DialTCP("tcp4", nil, gwLn.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	gwClient, err := gwLn.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.DialTCP("tcp4", nil, srvLn.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	server, err := srvLn.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	flow := proxy.NewFlow("ftp", KindControl, proxy.AddrPort(gwClient.RemoteAddr()), proxy.AddrPort(srvLn.Addr()))
	flow.SetServerLeg(proxy.AddrPort(up.LocalAddr()), flow.Server)
	for _, o := range opts {
		o(flow)
	}
	p.Flows.Admit(flow)
	l := &sessionLab{s: newSession(p, flow, gwClient, up, p.Log), client: client, server: server, done: make(chan string, 1)}
	go func() { l.done <- l.s.run() }()
	// The server's greeting, read by the client.
	server.Write([]byte("220 ready\r\n"))
	client.SetReadDeadline(time.Now().Add(3 * time.Second))
	greet := make([]byte, len("220 ready\r\n"))
	if _, err := io.ReadFull(client, greet); err != nil || string(greet) != "220 ready\r\n" {
		t.Fatalf("the client got the greeting as %q, %v", greet, err)
	}
	t.Cleanup(func() {
		client.Close()
		server.Close()
		select {
		case <-l.done:
		case <-time.After(10 * time.Second):
			t.Error("the session did not end after both peers closed")
		}
		p.CloseFlows()
	})
	return l
}

// serverGets checks that the server reads these command lines next.
func (l *sessionLab) serverGets(t *testing.T, sr *bufio.Reader, want ...string) {
	t.Helper()
	l.server.SetReadDeadline(time.Now().Add(3 * time.Second))
	for _, w := range want {
		if got, err := sr.ReadString('\n'); err != nil || got != w {
			t.Fatalf("server got %q, %v; want %q", got, err, w)
		}
	}
}

// readReply reads one reply (all its lines) from r.
func readReply(t *testing.T, c *net.TCPConn, r *bufio.Reader) []string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	var lines []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read reply: %v (after %q)", err, lines)
		}
		lines = append(lines, line)
		if code, final := replyCode([]byte(line)); code != 0 && final && (len(lines) == 1 || line[:3] == lines[0][:3]) {
			return lines
		}
	}
}

// TestMultiLine227: a server that answers PASV with a multi-line 227
// must not get its address to the client. The final line of a multi-line
// reply is the reply a client acts on; the session passed every line of
// it through unrewritten, so the client connected to whatever address and
// port the server named (an FTP bounce against the client's side), and the
// gateway's pending PASV stayed set for an unasked 227 later.
func TestMultiLine227(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41000-41099\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("PASV\r\n"))
	l.server.SetReadDeadline(time.Now().Add(3 * time.Second))
	if cmd, err := sr.ReadString('\n'); err != nil || cmd != "PASV\r\n" {
		t.Fatalf("server got %q, %v", cmd, err)
	}
	l.server.Write([]byte("227-Entering Passive Mode (10,9,9,9,4,1)\r\n227 Entering Passive Mode (10,9,9,9,4,1).\r\n"))
	reply := readReply(t, l.client, cr)
	for _, line := range reply {
		if strings.Contains(line, "10,9,9,9") {
			t.Fatalf("the client got the server's own passive address: %q", reply)
		}
	}
	if got := reply[len(reply)-1]; !strings.HasPrefix(got, "227 ") || !strings.Contains(got, "(127,0,0,1,") {
		t.Fatalf("reply %q, want the gateway's 227", reply)
	}
}

// TestClientThatDoesNotRead: a client that stops reading while replies
// keep coming must not hold its session (and its slot of max_sessions)
// for ever. The server loop blocked in a write to the client holding
// clientMu; the idle timeout's and the session timeout's 421 then waited
// for clientMu, run with them, and the session never ended (and
// CloseFlows, waiting for it, never returned).
func TestClientThatDoesNotRead(t *testing.T) {
	l := startSession(t, "    idle_timeout: 1s\n    ftp:\n      session_timeout: 2s\n")
	l.client.SetReadBuffer(4096)
	l.s.client.SetWriteBuffer(4096)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // a server with a lot to say
		line := []byte("211-" + strings.Repeat("x", 1000) + "\r\n")
		for {
			select {
			case <-stop:
				return
			default:
			}
			l.server.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			l.server.Write(line)
		}
	}()
	start := time.Now()
	select {
	case reason := <-l.done:
		t.Logf("session ended after %v: %s", time.Since(start).Round(time.Millisecond), reason)
		l.done <- reason // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("the session of a client that does not read outlived its idle timeout (1s) and session timeout (2s)")
	}
}

// TestCommandSmuggling: a command the server reads as PORT or EPRT must
// be seen as one by the gateway. The session took the verb up to the
// first space, so a PORT behind Telnet commands (IAC IP, which ProFTPD
// strips, as clients send it before ABOR), leading whitespace or a tab
// (ProFTPD splits words at any isspace) was not recognized and went to
// the server as it was: the server connected wherever the client said
// (FTP bounce), past the gateway's check and its NAT.
func TestCommandSmuggling(t *testing.T) {
	l := startSession(t, "")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for _, cmd := range []string{
		"\xff\xf4\xff\xf2PORT 10,9,9,9,4,1\r\n",
		"\xff\xfb\x01PORT 10,9,9,9,4,1\r\n",
		" PORT 10,9,9,9,4,1\r\n",
		"\tPORT 10,9,9,9,4,1\r\n",
		"PORT\t10,9,9,9,4,1\r\n",
		"EPRT\v|1|10.9.9.9|1025|\r\n",
		"NOOP\rPORT 10,9,9,9,4,1\r\n",
	} {
		l.client.Write([]byte(cmd + "NOOP\r\n"))
		l.server.SetReadDeadline(time.Now().Add(3 * time.Second))
		for {
			got, err := sr.ReadString('\n')
			if err != nil {
				t.Fatalf("%q: server read: %v", cmd, err)
			}
			if strings.Contains(got, "10,9,9,9") || strings.Contains(got, "10.9.9.9") {
				t.Fatalf("%q reached the server as %q", cmd, got)
			}
			if got == "NOOP\r\n" {
				break
			}
		}
		l.server.Write([]byte("200 NOOP ok.\r\n"))
		if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "50") {
			t.Fatalf("%q: the client got %q, want a refusal", cmd, reply)
		}
		readReply(t, l.client, cr) // NOOP's
	}
	// ABOR as clients send it, behind IAC IP IAC DM, reaches the server.
	l.client.Write([]byte("\xff\xf4\xff\xf2ABOR\r\n"))
	if got, err := sr.ReadString('\n'); err != nil || !strings.HasSuffix(got, "ABOR\r\n") {
		t.Fatalf("ABOR reached the server as %q, %v", got, err)
	}
}

// TestPipelinedPASV: a client may send commands before it read the
// replies to earlier ones. The session kept one pending PASV that any
// final reply cleared, so TYPE I and PASV sent together got the PASV a
// 425: the 200 of TYPE cleared it before the 227 came.
func TestPipelinedPASV(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41100-41199\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("TYPE I\r\nPASV\r\n"))
	l.serverGets(t, sr, "TYPE I\r\n", "PASV\r\n")
	l.server.Write([]byte("200 Type set to I.\r\n227 Entering Passive Mode (127,0,0,1,4,1).\r\n"))
	if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "200 ") {
		t.Fatalf("TYPE got %q", reply)
	}
	if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "227 ") {
		t.Fatalf("PASV got %q, want the gateway's 227", reply)
	}
}

// TestGatewayRepliesInOrder: the gateway's own reply to a command (534 to
// AUTH here) comes after the server's replies to the commands the client
// sent before it, as a client that pipelines counts them.
func TestGatewayRepliesInOrder(t *testing.T) {
	l := startSession(t, "")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("NOOP\r\nAUTH TLS\r\nSYST\r\n"))
	l.serverGets(t, sr, "NOOP\r\n", "SYST\r\n")
	// The server answers late: the 534 waits for the NOOP's 200.
	time.Sleep(50 * time.Millisecond)
	l.server.Write([]byte("200 NOOP ok.\r\n215 UNIX Type: L8\r\n"))
	for _, want := range []string{"200 ", "534 ", "215 "} {
		if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], want) {
			t.Fatalf("got %q, want a reply starting %q", reply, want)
		}
	}
}

// TestTooManyTurns: a client that pipelines without end to a server that
// does not answer is told and dropped, before the replies it is owed
// grow without bound.
func TestTooManyTurns(t *testing.T) {
	l := startSession(t, "")
	var b strings.Builder
	for range maxTurns + 1 {
		b.WriteString("AUTH TLS\r\n")
	}
	l.client.Write([]byte("NOOP\r\n" + b.String()))
	select {
	case reason := <-l.done:
		if !strings.Contains(reason, "128") {
			t.Errorf("the session ended for %q", reason)
		}
		l.done <- reason // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("the session went on owing more than maxTurns replies")
	}
	cr := bufio.NewReader(l.client)
	if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "421 ") {
		t.Errorf("the client got %q, want the 421 that ends the session", reply)
	}
}

// TestEPRTFromLinkLocalClient: a client on a link without a global
// prefix connects from its link-local address, which the gateway's
// socket names with its interface (fe80::1%eth0); the client's EPRT
// names it without (a zone means nothing to the server, and clients do
// not send one). The session took that for another host, refused the
// EPRT as an FTP bounce and warned of one.
func TestEPRTFromLinkLocalClient(t *testing.T) {
	l := startSession(t, "", func(f *proxy.Flow) {
		f.Client = netip.AddrPortFrom(netip.MustParseAddr("fe80::1%eth0"), f.Client.Port())
	})
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("EPRT |2|fe80::1|40000|\r\n"))
	l.server.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, err := sr.ReadString('\n')
	if err != nil {
		l.client.SetReadDeadline(time.Now().Add(time.Second))
		reply, _ := cr.ReadString('\n')
		t.Fatalf("the server got no EPRT (%v); the client got %q", err, reply)
	}
	if !strings.HasPrefix(got, "EPRT |1|127.0.0.1|") {
		t.Fatalf("the server got %q, want the gateway's EPRT", got)
	}
	// A link-local address of another host is still refused.
	l.server.Write([]byte("200 EPRT ok.\r\n"))
	readReply(t, l.client, cr)
	l.client.Write([]byte("EPRT |2|fe80::2|40000|\r\n"))
	if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "500") {
		t.Fatalf("EPRT naming fe80::2: the client got %q, want a refusal", reply)
	}
}
