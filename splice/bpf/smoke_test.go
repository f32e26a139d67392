//go:build linux

package bpf

import (
	"testing"

	"spliced/splice"
)

func TestSmoke(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, nat := range []bool{false, true} {
			f := newFixture(t, v6, nat)
			f.send(f.c2s(1000, 0x7ffffff0, splice.FlagACK|splice.FlagPSH), splice.C2S, 1000)
		}
	}
}
