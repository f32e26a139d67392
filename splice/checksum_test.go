package splice

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// TestSumMatchesReference compares Sum with the plain 16-bit loop on random
// data of every length up to 300 and some large ones.
func TestSumMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	lengths := []int{65535, 65536, 9000}
	for n := 0; n <= 300; n++ {
		lengths = append(lengths, n)
	}
	for _, n := range lengths {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if n%3 == 0 {
			for i := range b {
				b[i] = 0xff // all-ones stresses carries
			}
		}
		init := uint64(rng.Uint32())
		if got, want := Fold(Sum(b, init)), refFold(refSum(b, uint32(init>>16)+uint32(init&0xffff))); got != want {
			t.Fatalf("len %d: Sum folds to %#04x, reference %#04x", n, got, want)
		}
	}
}

// TestUpdateChecksumMatchesRecompute changes random 16-bit words of random
// packets and checks the RFC 1624 update against a full recomputation.
func TestUpdateChecksumMatchesRecompute(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 20000; i++ {
		b := make([]byte, 2+2*rng.IntN(40))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		binary.BigEndian.PutUint16(b, 0)
		binary.BigEndian.PutUint16(b, ^refFold(refSum(b, 0)))
		w := 2 + 2*rng.IntN(len(b)/2-1+1)
		if w >= len(b) {
			w = len(b) - 2
		}
		if w < 2 {
			continue
		}
		old := binary.BigEndian.Uint16(b[w:])
		nw := uint16(rng.Uint32())
		if i%5 == 0 {
			nw = ^old // forces -0/+0 edge cases
		}
		binary.BigEndian.PutUint16(b[w:], nw)
		if Fold(Sum(b[2:], 0)) == 0 {
			continue // all-zero data: see UpdateChecksum
		}
		hc := UpdateChecksum(binary.BigEndian.Uint16(b), old, nw)
		binary.BigEndian.PutUint16(b, hc)
		if refFold(refSum(b, 0)) != 0xffff {
			t.Fatalf("case %d: updated checksum %#04x invalid", i, hc)
		}
	}
}

func FuzzChecksum(f *testing.F) {
	f.Add([]byte{0xff, 0xff, 0, 1}, uint16(0), uint16(0xffff))
	f.Add([]byte{1, 2, 3}, uint16(7), uint16(9))
	f.Fuzz(func(t *testing.T, b []byte, old, nw uint16) {
		if Fold(Sum(b, 0)) != refFold(refSum(b, 0)) {
			t.Fatal("Sum differs from the reference")
		}
		if len(b) < 4 {
			return
		}
		b = b[:len(b)&^1]
		binary.BigEndian.PutUint16(b, 0)
		binary.BigEndian.PutUint16(b[2:], old)
		binary.BigEndian.PutUint16(b, ^refFold(refSum(b, 0)))
		binary.BigEndian.PutUint16(b[2:], nw)
		if Fold(Sum(b[2:], 0)) == 0 {
			return // all-zero data: see UpdateChecksum; impossible under a TCP pseudo-header
		}
		binary.BigEndian.PutUint16(b, UpdateChecksum(binary.BigEndian.Uint16(b), old, nw))
		if refFold(refSum(b, 0)) != 0xffff {
			t.Fatal("incremental update gives an invalid checksum")
		}
	})
}
