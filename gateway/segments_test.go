package gateway

import (
	"strings"
	"testing"

	"spliced/splice"
)

// TestSegmentsTooBig: a flow stays proxied when one end's segments (the
// MSS the gateway's socket announced to it, as tcp_info's advmss: net of
// the timestamp option) exceed
// half the other end's largest window (or all of it, up to 536 bytes),
// as a Linux sender connected to that end itself would never send them;
// otherwise it splices.
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
			"the server's largest receive window (1152 bytes) holds less than two of the client's segments (1448 bytes)"},
		{"client offers at most 2,048 bytes", leg(1448, 2048), leg(1448, 65535),
			"the client's largest receive window (2048 bytes) holds less than two of the server's segments (1448 bytes)"},
		{"two segments fit exactly", leg(1448, 65535), leg(1448, 2896), ""},
		{"one byte short of two segments", leg(1448, 65535), leg(1448, 2895), "(2895 bytes)"},
		{"a window up to 536 bytes bounds segments whole", leg(400, 65535), leg(1448, 500), ""},
		{"a window of 500 bytes, segments of 536", leg(536, 65535), leg(1448, 500),
			"the server's largest receive window (500 bytes)"},
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
