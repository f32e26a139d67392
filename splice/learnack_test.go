package splice

import "testing"

// TestLearnAckChecksSequence: an unsplice holds packets with new data
// and learns the acknowledgment they carry (LearnAck), and the drain
// ends once each end acknowledged everything forwarded to it. A forged
// packet whose sequence number lies beyond the receiver's window (any
// of about 2^31 values counts as new data) had its acknowledgment
// learned: a receiver drops such a segment before it reads its ACK
// (tcp_validate_incoming: tcp_sequence comes first), but here it ended
// the drain while the data it claimed acknowledged was still in flight,
// and the rebuilt socket would never resend what was lost of it.
func TestLearnAckChecksSequence(t *testing.T) {
	f := newFixture(t, false, false)
	data := f.s2c(0xffffff00, 0x7ffffff0, FlagACK)
	data.payload = make([]byte, 1000)
	if v := f.run(t, data.bytes(), S2C, true); v != Forward {
		t.Fatalf("the server's data: %v", v)
	}
	srv, cli := uint32(0xffffff00), uint32(1000) // where each sender was at the splice
	off := uint32(0xfffffff0) - srv              // the server-to-client sequence offset
	all := srv + 1000 + off                      // acknowledges all the server sent
	for _, tc := range []struct {
		name  string
		seq   uint32
		flags uint8
	}{
		{"beyond the window", cli + 1<<30, FlagACK | FlagPSH},
		{"far behind", cli - 1<<30, FlagACK | FlagPSH},
		{"a SYN", cli, FlagSYN | FlagACK},
	} {
		forged := f.c2s(tc.seq, all, tc.flags)
		forged.payload = []byte("GET / HTTP/1.1\r\n\r\n")
		var p Packet
		if p.Parse(forged.bytes()) != OK {
			t.Fatal("parse")
		}
		if v := f.e.LearnAck(&p, C2S); v == Forward {
			t.Errorf("%s: LearnAck passed a forged held packet", tc.name)
		}
		if got := f.e.Snapshot().Info(S2C).HighestAck; got != Seq(srv) {
			t.Errorf("%s: a forged held packet moved the server's acknowledged data to %#x, want %#x (the client acknowledged none of it)",
				tc.name, uint32(got), srv)
		}
	}
	real := f.c2s(cli, srv+500+off, FlagACK|FlagPSH)
	real.payload = []byte("GET / HTTP/1.1\r\n\r\n")
	var p Packet
	if p.Parse(real.bytes()) != OK {
		t.Fatal("parse")
	}
	if v := f.e.LearnAck(&p, C2S); v != Forward {
		t.Errorf("the client's real request: %v, want forward", v)
	}
	if got := f.e.Snapshot().Info(S2C).HighestAck; got != Seq(srv+500) {
		t.Errorf("the client's real request: acknowledged %#x, want %#x", uint32(got), srv+500)
	}
}

// TestLearnAckOldAck: a held request whose acknowledgment lies more than
// a window behind what the client acknowledged since is the client's
// own: on the bpf datapath its later pure ACKs overtake it (the program
// forwards them at once, the request waits in the queue). It may be
// held (its ACK is raised before it goes on), and it lowers nothing.
func TestLearnAckOldAck(t *testing.T) {
	f := newFixture(t, false, false)
	srv, off := uint32(0xffffff00), uint32(0xfffffff0-0xffffff00)
	for i := range uint32(3) {
		data := f.s2c(srv+i*60000, 0x7ffffff0, FlagACK)
		data.payload = make([]byte, 60000)
		if v := f.run(t, data.bytes(), S2C, true); v != Forward {
			t.Fatalf("the server's data %d: %v", i, v)
		}
		if v := f.run(t, f.c2s(1000, srv+(i+1)*60000+off, FlagACK).bytes(), C2S, true); v != Forward {
			t.Fatalf("the client's ACK %d: %v", i, v)
		}
	}
	req := f.c2s(1000, srv+500+off, FlagACK|FlagPSH)
	req.payload = []byte("GET / HTTP/1.1\r\n\r\n")
	var p Packet
	if p.Parse(req.bytes()) != OK {
		t.Fatal("parse")
	}
	if v := f.e.CheckHeld(&p, C2S); v != Forward {
		t.Errorf("CheckHeld of the client's request with an old ACK: %v, want forward", v)
	}
	if v := f.e.LearnAck(&p, C2S); v != Forward {
		t.Errorf("LearnAck of the client's request with an old ACK: %v, want forward", v)
	}
	if got := f.e.Snapshot().Info(S2C).HighestAck; got != Seq(srv+180000) {
		t.Errorf("acknowledged %#x after an old ACK, want %#x", uint32(got), srv+180000)
	}
}
