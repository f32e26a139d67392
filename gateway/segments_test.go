package gateway

import (
	"strings"
	"testing"

	"spliced/splice"
)

// TestSegmentsTooBig: a flow stays proxied when one end's segments (the
// MSS the gateway's socket announced to it, as tcp_info's advmss: net of
// the timestamp option) are larger than the largest window the other end
// offered; otherwise it splices.
func TestSegmentsTooBig(t *testing.T) {
	leg := func(advMSS uint16, maxWnd uint32) splice.Conn {
		return splice.Conn{AdvMSS: advMSS, MaxWnd: maxWnd, Timestamps: true}
	}
	for _, c := range []struct {
		name           string
		client, server splice.Conn
		want           string // in the reason; "" splices
	}{
		{"common windows", leg(1448, 65535), leg(1448, 64240), ""},
		{"server offers at most 1,152 bytes", leg(1448, 65535), leg(1448, 1152),
			"the server's largest receive window (1152 bytes) is smaller than the client's segments (1448 bytes)"},
		{"client offers at most 1,152 bytes", leg(1448, 1152), leg(1448, 65535),
			"the client's largest receive window (1152 bytes) is smaller than the server's segments (1448 bytes)"},
		{"one segment fits exactly", leg(1448, 65535), leg(1448, 1448), ""},
		{"one byte short of a segment", leg(1448, 65535), leg(1448, 1447), "(1447 bytes)"},
		{"jumbo segments, a handshake window of two", leg(8948, 65535), leg(8936, 17872), ""},
		{"an unknown largest window", leg(1448, 65535), leg(1448, 0), ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := segmentsTooBig(&splice.Params{Client: c.client, Server: c.server})
			switch {
			case c.want == "" && got != "":
				t.Errorf("stays proxied: %s", got)
			case c.want != "" && !strings.Contains(got, c.want):
				t.Errorf("reason %q, want it to contain %q", got, c.want)
			}
		})
	}
}
