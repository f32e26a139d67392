package ftp

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/proxy"
)

// TestNestedPassiveLine: a server answers PASV (or EPSV) with a
// multi-line reply of another code whose middle line is "227 ..." ("229
// ..."). RFC 959 clients skip it, but curl ends a reply at any line that
// starts with three digits and a space (LASTLINE in lib/ftp.c): it took
// the server's own 227/229, unrewritten, as the answer to its PASV and
// connected where the server said, past the gateway's data listener. The
// gateway pads such a line (RFC 959 4.2 has servers do so), and the
// client reads the whole reply, whose code is the server's 200.
func TestNestedPassiveLine(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41200-41299\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for _, c := range []struct{ cmd, reply, bad string }{ // bad: what the server's passive line names
		{"PASV", "200-x\r\n227 Entering Passive Mode (10,9,9,9,0,22).\r\n200 x\r\n", "10,9,9,9"},
		{"EPSV", "200-x\r\n229 Entering Extended Passive Mode (|||22|).\r\n200 x\r\n", "|||22|"},
	} {
		l.client.Write([]byte(c.cmd + "\r\n"))
		l.serverGets(t, sr, c.cmd+"\r\n")
		l.server.Write([]byte(c.reply))
		lines := readReply(t, l.client, cr)
		for _, line := range lines[1 : len(lines)-1] {
			if code, final := replyCode([]byte(line)); code != 0 && final {
				t.Errorf("%s: the client got %q inside the reply: a line curl takes for the reply's last", c.cmd, line)
			}
		}
		if last := lines[len(lines)-1]; last != "200 x\r\n" || len(lines) != 3 || !strings.Contains(lines[1], c.bad) {
			t.Errorf("%s: the client got %q, want the server's 3 lines, the middle one padded", c.cmd, lines)
		}
	}
}

// TestIACPrefixedPassiveLine: a server answers PASV with a 227 behind a
// Telnet command (IAC NOP). The gateway saw no reply code and passed the
// line through; a client that strips Telnet commands before it reads the
// code (BSD/inetutils ftp's getreply) sees "227 ...(10,9,9,9,4,1)" and
// connects to 10.9.9.9:1025. The gateway strips them first now: the line
// is the 227 of the PASV, rewritten.
func TestIACPrefixedPassiveLine(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41300-41399\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("PASV\r\n"))
	l.serverGets(t, sr, "PASV\r\n")
	l.server.Write([]byte("\xff\xf1227 Entering Passive Mode (10,9,9,9,4,1).\r\n227 Entering Passive Mode (127,0,0,1,4,1).\r\n"))
	l.client.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := cr.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(line, "10,9,9,9") || !strings.HasPrefix(line, "227 ") {
		t.Errorf("the client got %q: want the gateway's 227 (a Telnet-aware client reads the server's as the 227 of its PASV)", line)
	}
}

// TestGatewayReplyOvertakes: the gateway's own reply (502 to LPSV) to a
// command read while the server's reply to the previous command was
// being written (after answered emptied turns, before writeClient) was
// written at once, ahead of the server's reply: the client paired them
// the wrong way round (in 3 of 3 runs within 50 rounds).
func TestGatewayReplyOvertakes(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41400-41999\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for i := range 300 {
		l.client.Write([]byte("PASV\r\n"))
		l.serverGets(t, sr, "PASV\r\n")
		done := make(chan struct{})
		go func() {
			l.server.Write([]byte("227 Entering Passive Mode (127,0,0,1,4,1).\r\n"))
			close(done)
		}()
		l.client.Write([]byte("LPSV\r\n"))
		<-done
		first := readReply(t, l.client, cr)
		second := readReply(t, l.client, cr)
		if !strings.HasPrefix(first[0], "227 ") || !strings.HasPrefix(second[0], "502 ") {
			t.Fatalf("round %d: PASV then LPSV got %q then %q; want the 227 first", i, first, second)
		}
	}
}

// TestPartialCommandAtIdleDeadline: while a data connection is open, the
// idle deadline that fires in the middle of a command line made bufio's
// ReadSlice hand back (and drop) the bytes read so far; the loop went on
// and the rest of the line went to the server as a command of its own.
func TestPartialCommandAtIdleDeadline(t *testing.T) {
	l := startSession(t, "    idle_timeout: 1s\n")
	f := proxy.NewFlow("ftp", KindData, l.s.flow.Client, l.s.flow.Server)
	l.s.p.Flows.Admit(f)
	defer l.s.p.Flows.Remove(f)
	l.s.mu.Lock()
	l.s.dataFlows = append(l.s.dataFlows, f)
	l.s.mu.Unlock()
	sr := bufio.NewReader(l.server)
	l.client.Write([]byte("DELE old/a"))
	time.Sleep(1500 * time.Millisecond)
	l.client.Write([]byte(".txt\r\n"))
	l.server.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, err := sr.ReadString('\n')
	if err != nil || got != "DELE old/a.txt\r\n" {
		t.Errorf("the server got %q, %v; want \"DELE old/a.txt\\r\\n\"", got, err)
	}
}

// TestParse227NoText: RFC 1123 4.1.2.6 has clients scan a 227 for the
// first digit; a 227 whose numbers follow the code directly was read as
// one run with the code ("227 10") and refused (425).
func TestParse227NoText(t *testing.T) {
	want := netip.MustParseAddrPort("10.1.0.2:40000")
	for _, text := range []string{"227 10,1,0,2,156,64", "227-x\r\n227 10,1,0,2,156,64", "227 =10,1,0,2,156,64"} {
		if got, err := parse227(text); err != nil || got != want {
			t.Errorf("%q: %v, %v; want %v", text, got, err, want)
		}
	}
}

// TestClientThatDoesNotReadSendsAUTH: a client that stops reading while
// the server's replies keep coming, and sends a command the gateway
// answers itself (AUTH), must not hold its session for the whole
// session_timeout (24h by default). The server loop blocked in a write
// to the client while it held order; answer waited for order, so the
// client loop read no more and its idle deadline never fired.
func TestClientThatDoesNotReadSendsAUTH(t *testing.T) {
	l := startSession(t, "    idle_timeout: 1s\n    ftp:\n      session_timeout: 1h\n")
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
	time.Sleep(500 * time.Millisecond) // the server loop is blocked by now
	l.client.Write([]byte("AUTH TLS\r\n"))
	start := time.Now()
	select {
	case reason := <-l.done:
		t.Logf("session ended after %v: %s", time.Since(start).Round(time.Millisecond), reason)
		l.done <- reason // for the cleanup
	case <-time.After(8 * time.Second):
		t.Fatal("the session of a client that does not read outlived its idle timeout (1s)")
	}
}

// TestDataFlowsLetGo: a session keeps its data connections to know
// whether one is open (the idle timeout spares a control connection
// while one is), and let go of closed ones only when its idle deadline
// fired: a client busy with transfers for a day (a mirror, or one
// looping on LIST) made the session hold every data connection it ever
// had, a flow each, until the gateway ran out of memory.
func TestDataFlowsLetGo(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"42000-42099\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	const transfers = 3 * maxDataFlows
	for i := range transfers {
		dataLn, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		port := dataLn.Addr().(*net.TCPAddr).Port
		l.client.Write([]byte("PASV\r\n"))
		l.serverGets(t, sr, "PASV\r\n")
		fmt.Fprintf(l.server, "227 Entering Passive Mode (127,0,0,1,%d,%d).\r\n", port>>8, port&0xff)
		reply := readReply(t, l.client, cr)
		at, err := parse227(strings.TrimSpace(reply[0]))
		if err != nil {
			t.Fatalf("transfer %d: %q: %v", i, reply, err)
		}
		c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(at))
		if err != nil {
			t.Fatalf("transfer %d: %v", i, err)
		}
		dataLn.SetDeadline(time.Now().Add(3 * time.Second))
		sc, err := dataLn.AcceptTCP()
		dataLn.Close()
		if err != nil {
			t.Fatalf("transfer %d: the server's data connection never came: %v", i, err)
		}
		sc.Write([]byte("listing\r\n"))
		sc.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if b, err := io.ReadAll(c); err != nil || string(b) != "listing\r\n" {
			t.Fatalf("transfer %d: the client got %q, %v", i, b, err)
		}
		c.Close()
	}
	// Every data connection ends; the session must not hold them.
	deadline := time.Now().Add(3 * time.Second)
	for l.s.transfers.Load() < transfers || l.s.p.Flows.Len() > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d transfers, %d flows still in the table", l.s.transfers.Load(), l.s.p.Flows.Len())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Those still open when the last came may be held until the next
	// one: no more than that.
	l.s.mu.Lock()
	held := len(l.s.dataFlows)
	l.s.mu.Unlock()
	if held > maxDataFlows {
		t.Errorf("after %d transfers, all closed, the session holds %d data flows", transfers, held)
	}
}

// TestDataFlowsPerSession: one control connection may hold only a few
// data connections open at once (FTP moves one file at a time). A
// client with a server that accepts every data connection and keeps it
// (its own, hostile or just lenient) opened one per PASV for as long as
// it liked: a single session filled limits.max_flows, which every
// service of the gateway shares, and locked every client out.
func TestDataFlowsPerSession(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"42100-42199\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	dataLn, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer dataLn.Close()
	var held []net.Conn // both ends of every data connection, kept open
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	accepted := make(chan net.Conn, 100)
	go func() {
		for {
			c, err := dataLn.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	port := dataLn.Addr().(*net.TCPAddr).Port
	const tries = 3 * maxDataFlows
	for i := range tries {
		l.client.Write([]byte("PASV\r\n"))
		l.serverGets(t, sr, "PASV\r\n")
		fmt.Fprintf(l.server, "227 Entering Passive Mode (127,0,0,1,%d,%d).\r\n", port>>8, port&0xff)
		reply := readReply(t, l.client, cr)
		at, err := parse227(strings.TrimSpace(reply[0]))
		if err != nil {
			t.Fatalf("PASV %d: %q: %v", i, reply, err)
		}
		c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(at))
		if err != nil {
			continue // reset by the gateway already
		}
		held = append(held, c)
		select {
		case sc := <-accepted:
			held = append(held, sc)
		case <-time.After(time.Second):
			// refused by the gateway: the server's connection never came
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := l.s.p.Flows.ServiceLen("ftp") - 1; n > maxDataFlows { // the control flow is one
		t.Errorf("one session holds %d data connections open (of %d tried); want at most %d", n, tries, maxDataFlows)
	}
}

// TestEmptyCommandTurn: an empty command line goes to the server, which
// answers it (500), like any other. Its turn had no verb, which marks a
// reply of the gateway's own: the reply to the command before it took
// it too, and the gateway's 534 to a later AUTH overtook the server's
// 500 to the empty line (the README promises the order of the commands).
func TestEmptyCommandTurn(t *testing.T) {
	l := startSession(t, "")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	l.client.Write([]byte("NOOP\r\n\r\nAUTH TLS\r\n"))
	l.serverGets(t, sr, "NOOP\r\n", "\r\n")
	time.Sleep(50 * time.Millisecond) // the AUTH is read and waits
	l.server.Write([]byte("200 NOOP ok.\r\n500 Empty command.\r\n"))
	for _, want := range []string{"200 ", "500 ", "534 "} {
		if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], want) {
			t.Fatalf("got %q, want a reply starting %q", reply, want)
		}
	}
}

// TestUrgentABOR: clients send ABOR behind the Telnet Synch, its last
// byte as TCP urgent data (lftp: "IAC IP IAC" then DM with MSG_OOB;
// inetutils ftp: "IAC IP IAC" with MSG_OOB, then "DM ABOR"). Linux takes
// the urgent byte out of the stream of a socket without SO_OOBINLINE:
// the gateway read "IAC IP IAC ABOR", took "IAC A" for a Telnet command
// and sent the server "BOR" (inetutils: "\xf2ABOR"), so no client could
// abort a transfer through it. The server must get the Synch too, its DM
// urgent: the gateway sent a plain "ABOR", which vsftpd, busy sending a
// file, reads only on the SIGURG of the urgent byte, and then only with
// the four Telnet bytes in front (TestLabFTPAbort). A plain ABOR stays
// plain.
func TestUrgentABOR(t *testing.T) {
	l := startSession(t, "")
	// The test's server keeps urgent data inline, as vsftpd does.
	if err := proxy.KeepUrgentInline(l.server); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		normal, urgent, rest, line string
		mark                       int // where the urgent byte is in line
	}{
		{"\xff\xf4\xff", "\xf2", "ABOR\r\n", "\xff\xf4\xff\xf2ABOR\r\n", 3}, // lftp
		{"", "\xff\xf4\xff", "\xf2ABOR\r\n", "\xff\xf4\xff\xf2ABOR\r\n", 3}, // inetutils, BSD ftp
		{"ABOR\r\n", "", "", "ABOR\r\n", -1},                                // no Synch
	} {
		if c.normal != "" {
			l.client.Write([]byte(c.normal))
		}
		if c.urgent != "" {
			if err := sendUrgent(l.client, []byte(c.urgent)); err != nil {
				t.Fatal(err)
			}
		}
		if c.rest != "" {
			l.client.Write([]byte(c.rest))
		}
		line, mark := readMarkedLine(t, l.server)
		if line != c.line || mark != c.mark {
			t.Errorf("the server got %q, urgent byte at %d; want %q, at %d", line, mark, c.line, c.mark)
		}
	}
}

// readMarkedLine reads a line from c (SO_OOBINLINE) a byte at a time and
// returns it with the index of its urgent byte (-1 if none): SIOCATMARK
// says the next byte is the one the urgent pointer names.
func readMarkedLine(t *testing.T, c *net.TCPConn) (string, int) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	var line []byte
	mark := -1
	for !strings.HasSuffix(string(line), "\n") {
		var b [1]byte
		if _, err := c.Read(b[:]); err != nil {
			t.Fatalf("read %q: %v", line, err)
		}
		line = append(line, b[0])
		// Checked once the next byte's segment is in: the bytes before
		// the urgent one come with it.
		var at int
		var ierr error
		if err := raw.Control(func(fd uintptr) { at, ierr = unix.IoctlGetInt(int(fd), unix.SIOCATMARK) }); err != nil || ierr != nil {
			t.Fatal(err, ierr)
		}
		if at == 1 {
			mark = len(line)
		}
	}
	return string(line), mark
}

// TestEscapedIACInReplyCode: BSD and inetutils ftp's getreply drop IAC
// and the byte after it, IAC IAC included, before they count the digits
// of the code. The gateway kept IAC IAC (a literal 0xff to Telnet), saw
// no code in "\xff\xff227 ..." or "22\xff\xff7 ..." and passed the line on
// unrewritten: such a client read the server's 227 as the answer to its
// PASV and connected where the server said.
func TestEscapedIACInReplyCode(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"41300-41399\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for _, reply := range []string{
		"\xff\xff227 Entering Passive Mode (10,9,9,9,4,1).\r\n",
		"22\xff\xff7 Entering Passive Mode (10,9,9,9,4,1).\r\n",
		"227\xff\xff Entering Passive Mode (10,9,9,9,4,1).\r\n",
	} {
		l.client.Write([]byte("PASV\r\n"))
		l.serverGets(t, sr, "PASV\r\n")
		l.server.Write([]byte(reply))
		l.client.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, err := cr.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(got, "10,9,9,9") || !strings.HasPrefix(got, "227 ") {
			t.Fatalf("the server's %q reached the client as %q; want the gateway's 227", reply, got)
		}
	}
}

// TestPassivePrivilegedPort: a server's 227 or 229 naming a port below
// 1024 was taken: the client's data connection went to that port of the
// server host, from the gateway's external address (an FTP bounce by the
// server's hand, to its host's ssh, smtp or rsh, past the gateway's
// policy for that port, with the gateway's address as the source). The
// gateway refuses PORT and EPRT naming such a port; now such a passive
// reply too (425), as OpenBSD's ftp-proxy does.
func TestPassivePrivilegedPort(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"42200-42299\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for _, c := range []struct{ cmd, reply string }{
		{"PASV", "227 Entering Passive Mode (127,0,0,1,0,22).\r\n"},
		{"EPSV", "229 Entering Extended Passive Mode (|||25|).\r\n"},
		{"PASV", "227 Entering Passive Mode (127,0,0,1,3,255).\r\n"},
	} {
		l.client.Write([]byte(c.cmd + "\r\n"))
		l.serverGets(t, sr, c.cmd+"\r\n")
		l.server.Write([]byte(c.reply))
		if reply := readReply(t, l.client, cr); !strings.HasPrefix(reply[0], "425 ") {
			t.Errorf("the server's %q reached the client as %q; want a 425", c.reply, reply)
		}
	}
	l.s.mu.Lock()
	open := len(l.s.dataLns)
	l.s.mu.Unlock()
	if open != 0 {
		t.Errorf("%d data listeners open for refused passive replies", open)
	}
}

// TestNestedPassiveContinuationLine: BSD, inetutils and netkit ftp (and
// tnftp) take the address of a passive reply from the first line of the
// reply whose code is 227, whatever its fourth byte ("227-" too), and
// accept any 2xx as the answer to PASV (tnftp refuses only 22x other
// than 227). A server that answered PASV with "200-", "227-... (10,9,9,9,
// 4,1)", "200 x" had the gateway pass the middle line on as it was (only
// a line that reads as a reply's last was padded): such a client
// connected to 10.9.9.9:1025, past the gateway's data listener. A line
// inside a reply that starts with another code is padded now, as RFC 959
// 4.2 has servers pad any such line.
func TestNestedPassiveContinuationLine(t *testing.T) {
	l := startSession(t, "    ftp:\n      data_ports: \"42300-42399\"\n")
	cr, sr := bufio.NewReader(l.client), bufio.NewReader(l.server)
	for _, c := range []struct{ cmd, reply string }{
		{"PASV", "200-x\r\n227-Entering Passive Mode (10,9,9,9,4,1).\r\n200 x\r\n"},
		{"PASV", "200-x\r\n227xEntering Passive Mode (10,9,9,9,4,1).\r\n200 x\r\n"},
		{"EPSV", "200-x\r\n229-Entering Extended Passive Mode (|||1025|).\r\n200 x\r\n"},
	} {
		l.client.Write([]byte(c.cmd + "\r\n"))
		l.serverGets(t, sr, c.cmd+"\r\n")
		l.server.Write([]byte(c.reply))
		lines := readReply(t, l.client, cr)
		for _, line := range lines {
			if strings.HasPrefix(line, "227") || strings.HasPrefix(line, "229") {
				t.Errorf("%q: the client got %q, whose code a BSD ftp reads as the answer to its %s", c.reply, line, c.cmd)
			}
		}
		if len(lines) != 3 || lines[2] != "200 x\r\n" {
			t.Errorf("%q: the client got %q, want the server's 3 lines", c.reply, lines)
		}
	}
	// Lines that repeat the reply's own code stay as they are.
	l.client.Write([]byte("NOOP\r\n"))
	l.serverGets(t, sr, "NOOP\r\n")
	l.server.Write([]byte("200-a\r\n200-b\r\n200 c\r\n"))
	if lines := readReply(t, l.client, cr); strings.Join(lines, "") != "200-a\r\n200-b\r\n200 c\r\n" {
		t.Errorf("the client got %q", lines)
	}
}
