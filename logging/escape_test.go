package logging

import (
	"bytes"
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"testing"
)

// TestTextLogNoRawEscapes: with log.format text, attribute values
// chosen by a remote client (a SOCKS5 username of a failed login, an HTTP
// path of a denied request) reach the log with a raw ESC byte: tint, in
// its colored mode, counts ESC as a safe byte (written unquoted), and when
// it does quote a value it turns every `\x1b` of the quoted text back into
// ESC, so both a real ESC and the printable characters \x1b (in a value
// with a space) become a terminal escape sequence (here ESC[2J: clear
// the screen of whoever reads the log).
func TestTextLogNoRawEscapes(t *testing.T) {
	for _, user := range []string{"a\x1b[2Jb", `a\x1b[2J b`} {
		var buf bytes.Buffer
		log, err := New(&buf, "text", "info")
		if err != nil {
			t.Fatal(err)
		}
		log.Warn("socks5: login failed", "user", user)
		if strings.Contains(buf.String(), "\x1b[2J") {
			t.Errorf("user %q: the log line carries a raw ESC[2J: %q", user, buf.String())
		}
	}
}

// stringer is a value tint formats with fmt.
type stringer string

func (s stringer) String() string { return string(s) }

// sgr matches the color sequences tint writes itself.
var sgr = regexp.MustCompile(`\x1b\[[0-9;]*m`)

// TestColoredTextLogNoRawEscapes: on a terminal (colored), no value,
// message or error a client may have chosen puts a control byte or an
// unprintable character in the log line; only tint's own color
// sequences remain, and values without such bytes are written as before.
func TestColoredTextLogNoRawEscapes(t *testing.T) {
	for _, hostile := range []string{
		"a\x1b[2Jb", `a\x1b[2J b`, "a\x1b]0;title\x07b", "a\rb", "a\x7fb",
		"a\u009b2Jb", "a\xffb", "a\u2028b", "a\x00b",
	} {
		for _, color := range []bool{true, false} {
			var buf bytes.Buffer
			log := slog.New(newText(&buf, slog.LevelInfo, color)).With("peer", hostile)
			log.Warn("denied "+hostile, "user", hostile, "path", stringer(hostile),
				Err(errors.New("bad name "+hostile)), slog.Group("g", "v", hostile))
			line := buf.String()
			if !color && strings.Contains(line, "\x1b") {
				t.Errorf("%q: uncolored line has an ESC: %q", hostile, line)
			}
			plain := sgr.ReplaceAllString(strings.TrimSuffix(line, "\n"), "")
			for _, r := range plain {
				if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == '\u2028' {
					t.Errorf("color %v, %q: the line carries %U raw: %q", color, hostile, r, line)
					break
				}
			}
		}
	}
	var buf bytes.Buffer
	slog.New(newText(&buf, slog.LevelInfo, false)).Info("relayed", "service", "web", "path", "/a b")
	if got := buf.String(); !strings.HasSuffix(got, ` INF relayed service=web path="/a b"`+"\n") {
		t.Errorf("plain values changed: %q", got)
	}
}
