package ftp

import (
	"net/netip"
	"testing"
)

func TestParsePORT(t *testing.T) {
	good := map[string]string{
		"10,1,0,2,156,64":         "10.1.0.2:40000",
		" 192,168,1,1,0,21 ":      "192.168.1.1:21",
		"255,255,255,255,255,255": "255.255.255.255:65535",
	}
	for in, want := range good {
		got, err := parsePORT(in)
		if err != nil || got != netip.MustParseAddrPort(want) {
			t.Errorf("parsePORT(%q) = %v, %v; want %s", in, got, err, want)
		}
		if back, _ := parsePORT(formatPORT(got)); back != got {
			t.Errorf("formatPORT(%v) does not parse back: %q", got, formatPORT(got))
		}
	}
	for _, in := range []string{"", "10,1,0,2,156", "10,1,0,2,156,64,1", "10,1,0,256,1,1", "a,b,c,d,e,f", "10,1,0,2,-1,4"} {
		if got, err := parsePORT(in); err == nil {
			t.Errorf("parsePORT(%q) = %v, want an error", in, got)
		}
	}
}

func TestParseEPRT(t *testing.T) {
	good := map[string]string{
		"|1|10.1.0.2|40000|":  "10.1.0.2:40000",
		"|2|fd00:1::2|40001|": "[fd00:1::2]:40001",
		"!1!10.1.0.2!5282!":   "10.1.0.2:5282", // any delimiter
	}
	for in, want := range good {
		got, err := parseEPRT(in)
		if err != nil || got != netip.MustParseAddrPort(want) {
			t.Errorf("parseEPRT(%q) = %v, %v; want %s", in, got, err, want)
		}
		if back, _ := parseEPRT(formatEPRT(got)); back != got {
			t.Errorf("formatEPRT(%v) does not parse back: %q", got, formatEPRT(got))
		}
	}
	for _, in := range []string{"", "|1|10.1.0.2|40000", "|2|10.1.0.2|40000|", "|1|fd00::1|40000|", "|3|10.1.0.2|1|",
		"|1|10.1.0.2|70000|", "|1|fe80::1%eth0|1|", "|1|host|21|", " 1 10.1.0.2 1 "} {
		if got, err := parseEPRT(in); err == nil {
			t.Errorf("parseEPRT(%q) = %v, want an error", in, got)
		}
	}
}

func TestParsePassiveReplies(t *testing.T) {
	for in, want := range map[string]string{
		"227 Entering Passive Mode (10,2,0,2,117,49).":  "10.2.0.2:30001",
		"227 Entering Passive Mode 10,2,0,2,117,49":     "10.2.0.2:30001",
		"227 =10,2,0,2,117,49":                          "10.2.0.2:30001",
		"227 Ok (1 file) (10,2,0,99,4,1)":               "10.2.0.99:1025",
		"227 Entering Passive Mode (10, 2, 0, 2, 4, 1)": "10.2.0.2:1025",
	} {
		got, err := parse227(in)
		if err != nil || got != netip.MustParseAddrPort(want) {
			t.Errorf("parse227(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"227 Entering Passive Mode", "227 (10,2,0,2,117)", "227 (10,2,0,300,1,1)"} {
		if got, err := parse227(in); err == nil {
			t.Errorf("parse227(%q) = %v, want an error", in, got)
		}
	}
	for in, want := range map[string]uint16{
		"229 Entering Extended Passive Mode (|||30001|)": 30001,
		"229 Ok (!!!2121!)": 2121,
	} {
		if got, err := parse229(in); err != nil || got != want {
			t.Errorf("parse229(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"229 Entering Extended Passive Mode", "229 (|||0|)", "229 (|||70000|)", "229 (||1|2|)", "229 (|||x|)"} {
		if got, err := parse229(in); err == nil {
			t.Errorf("parse229(%q) = %d, want an error", in, got)
		}
	}
	if got := format227(netip.MustParseAddrPort("10.1.0.1:41001")); got != "227 Entering Passive Mode (10,1,0,1,160,41).\r\n" {
		t.Errorf("format227: %q", got)
	}
	if got := format229(41001); got != "229 Entering Extended Passive Mode (|||41001|).\r\n" {
		t.Errorf("format229: %q", got)
	}
}

func TestReplyCode(t *testing.T) {
	cases := []struct {
		line  string
		code  int
		final bool
	}{
		{"220 ready\r\n", 220, true},
		{"211-Features:\r\n", 211, false},
		{" EPSV\r\n", 0, false},
		{"211 End\r\n", 211, true},
		{"226\r\n", 226, true},
		{"22x nope\r\n", 0, false},
		{"12\r\n", 0, false},
	}
	for _, c := range cases {
		if code, final := replyCode([]byte(c.line)); code != c.code || final != c.final {
			t.Errorf("replyCode(%q) = %d, %v; want %d, %v", c.line, code, final, c.code, c.final)
		}
	}
}

func TestSplitCommand(t *testing.T) {
	for in, want := range map[string][2]string{
		"port 10,1,0,2,4,1\r\n": {"PORT", "10,1,0,2,4,1"},
		"PASV\r\n":              {"PASV", ""},
		"EPSV ALL\n":            {"EPSV", "ALL"},
		"STOR a b.txt\r\n":      {"STOR", "a b.txt"},
	} {
		if v, a := splitCommand([]byte(in)); v != want[0] || a != want[1] {
			t.Errorf("splitCommand(%q) = %q, %q; want %q", in, v, a, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"10,1,0,2,156,64", "|1|10.1.0.2|40000|", "227 Entering Passive Mode (10,2,0,2,117,49).", "229 (|||1|)"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ap, err := parsePORT(s); err == nil {
			if back, err := parsePORT(formatPORT(ap)); err != nil || back != ap {
				t.Fatalf("PORT %q -> %v does not round-trip", s, ap)
			}
		}
		if ap, err := parseEPRT(s); err == nil {
			if back, err := parseEPRT(formatEPRT(ap)); err != nil || back != ap {
				t.Fatalf("EPRT %q -> %v does not round-trip", s, ap)
			}
		}
		parse227(s)
		if p, err := parse229(s); err == nil && p == 0 {
			t.Fatalf("229 %q gave port 0", s)
		}
		replyCode([]byte(s))
	})
}
