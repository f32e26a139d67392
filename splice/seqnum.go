package splice

// Seq is a TCP sequence number. Comparisons are modulo 2^32 (RFC 793
// section 3.3): a is before b when the signed distance b-a is positive, so
// they stay right across the wrap at 2^32.
type Seq uint32

// LessThan reports whether s is before t.
func (s Seq) LessThan(t Seq) bool { return int32(s-t) < 0 }

// LessThanEq reports whether s is before or equal to t.
func (s Seq) LessThanEq(t Seq) bool { return int32(s-t) <= 0 }

// Add returns s advanced by n.
func (s Seq) Add(n uint32) Seq { return s + Seq(n) }

// Sub returns s moved back by n.
func (s Seq) Sub(n uint32) Seq { return s - Seq(n) }

// Size returns the distance from s to t (t-s), as an unsigned count.
func (s Seq) Size(t Seq) uint32 { return uint32(t - s) }

// InWindow reports whether s lies in [first, first+size).
func (s Seq) InWindow(first Seq, size uint32) bool { return uint32(s-first) < size }

// minSeq returns the earlier of a and b.
func minSeq(a, b Seq) Seq {
	if b.LessThan(a) {
		return b
	}
	return a
}

// maxSeq returns the later of a and b.
func maxSeq(a, b Seq) Seq {
	if a.LessThan(b) {
		return b
	}
	return a
}
