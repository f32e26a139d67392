package socks5

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"spliced/config"
)

// TestReadRequest: request parsing, address types and limits, byte by
// byte.
func TestReadRequest(t *testing.T) {
	long := bytes.Repeat([]byte("a"), 64) // one label too long
	cases := []struct {
		name  string
		in    []byte
		want  Request
		reply Reply // of a *requestError; 0xff: another error
	}{
		{"ipv4", []byte{5, 1, 0, 1, 10, 2, 0, 2, 0, 80}, Request{Cmd: 1, Addr: netip.MustParseAddr("10.2.0.2"), Port: 80}, 0},
		{"ipv6", append(append([]byte{5, 1, 0, 4}, netip.MustParseAddr("fd00::2").AsSlice()...), 1, 187), Request{Cmd: 1, Addr: netip.MustParseAddr("fd00::2"), Port: 443}, 0},
		{"v4-mapped ipv6 unmapped", append(append([]byte{5, 1, 0, 4}, netip.MustParseAddr("::ffff:10.0.0.1").AsSlice()...), 0, 80), Request{Cmd: 1, Addr: netip.MustParseAddr("10.0.0.1"), Port: 80}, 0},
		{"name", append(append([]byte{5, 1, 0, 3, 11}, "www.example"...), 0, 80), Request{Cmd: 1, Name: "www.example", Port: 80}, 0},
		{"address as a name", append(append([]byte{5, 1, 0, 3, 8}, "10.2.0.2"...), 0, 80), Request{Cmd: 1, Addr: netip.MustParseAddr("10.2.0.2"), Port: 80}, 0},
		{"label too long", append(append([]byte{5, 1, 0, 3, 64}, long...), 0, 80), Request{}, HostUnreachable},
		{"empty name", []byte{5, 1, 0, 3, 0, 0, 80}, Request{}, HostUnreachable},
		{"NUL in name", append(append([]byte{5, 1, 0, 3, 5}, "a\x00b.c"...), 0, 80), Request{}, HostUnreachable},
		{"address type", []byte{5, 1, 0, 9, 0, 0}, Request{}, AtypNotSupported},
		{"version", []byte{4, 1, 0, 1, 1, 2, 3, 4, 0, 80}, Request{}, GeneralFailure},
		{"truncated address", []byte{5, 1, 0, 4, 1, 2, 3}, Request{}, 0xff},
		{"truncated name", []byte{5, 1, 0, 3, 20, 'a'}, Request{}, 0xff},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q, err := readRequest(bytes.NewReader(c.in))
			var re *requestError
			switch {
			case c.reply == 0 && err != nil:
				t.Fatalf("error %v", err)
			case c.reply == 0 && *q != c.want:
				t.Fatalf("got %+v, want %+v", *q, c.want)
			case c.reply == 0xff && (err == nil || errors.As(err, &re)):
				t.Fatalf("want a read error, got %v", err)
			case c.reply != 0 && c.reply != 0xff && (!errors.As(err, &re) || re.reply != c.reply):
				t.Fatalf("want reply %v, got %v", c.reply, err)
			}
		})
	}
}

func TestAppendReply(t *testing.T) {
	for _, c := range []struct {
		bound netip.AddrPort
		want  []byte
	}{
		{netip.MustParseAddrPort("10.2.0.1:40000"), []byte{5, 0, 0, 1, 10, 2, 0, 1, 0x9c, 0x40}},
		{netip.MustParseAddrPort("[fd00::1]:80"), append(append([]byte{5, 0, 0, 4}, netip.MustParseAddr("fd00::1").AsSlice()...), 0, 80)},
		{netip.AddrPort{}, []byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0}},
	} {
		if got := appendReply(nil, Succeeded, c.bound); !bytes.Equal(got, c.want) {
			t.Errorf("%v: got %x, want %x", c.bound, got, c.want)
		}
	}
}

// FuzzHandshake feeds arbitrary bytes to the three readers: they never
// panic, never return more than the protocol's limits, and a request
// they accept names a valid address or a valid name.
func FuzzHandshake(f *testing.F) {
	f.Add([]byte{5, 1, 0}, []byte{1, 1, 'a', 1, 'b'}, []byte{5, 1, 0, 1, 10, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 2, 0, 2}, []byte{1, 0, 0}, append(append([]byte{5, 1, 0, 3, 7}, "a.b.com"...), 0, 80))
	f.Add([]byte{5, 255}, []byte{1, 255}, []byte{5, 3, 0, 4})
	f.Fuzz(func(t *testing.T, greeting, auth, req []byte) {
		if m, err := readGreeting(bytes.NewReader(greeting)); err == nil && (len(m) == 0 || len(m) > 255) {
			t.Fatalf("%d methods", len(m))
		}
		if u, p, err := readCredentials(bytes.NewReader(auth)); err == nil && (len(u) == 0 || len(u) > 255 || len(p) == 0 || len(p) > 255) {
			t.Fatalf("user %d bytes, password %d bytes", len(u), len(p))
		}
		if q, err := readRequest(bytes.NewReader(req)); err == nil {
			if q.Name != "" && (!validName(q.Name) || q.Addr.IsValid()) || q.Name == "" && !q.Addr.IsValid() {
				t.Fatalf("request %+v", q)
			}
		}
	})
}

// TestConfigRefusesNegatives: a negative failed_logins was taken as 1
// (a source backed off at its first failure) without a word; it is
// refused, naming the key, as a negative max_sessions is.
func TestConfigRefusesNegatives(t *testing.T) {
	for key, want := range map[string]string{
		"failed_logins: -1": "services[0].socks5.failed_logins: \"-1\" is negative",
		"max_sessions: -1":  "services[0].socks5.max_sessions: \"-1\" is negative",
	} {
		_, err := config.Parse("t.yaml", []byte("services:\n  - name: s\n    proxy: socks5\n    listen_on: [\"127.0.0.1:1080\"]\n    socks5:\n      "+key+"\n"))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error with %q", key, err, want)
		}
	}
}
