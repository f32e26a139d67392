package version

import (
	"regexp"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

// debianVersion is an upstream version without an epoch or revision, as
// Debian policy 5.6.12 allows it: a digit first, then alphanumerics and
// . + ~ (a hyphen only when there is a Debian revision, which we never
// add).
var debianVersion = regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*$`)

const rev = "81694e9c1234567890abcdef0123456789abcdef"

var commit = time.Date(2026, 12, 2, 1, 58, 0, 0, time.UTC)

// TestVersionString covers every source of the version: the Makefile's
// git describe (tagged, after a tag, pre-release, dirty), the commit
// alone, Go's VCS stamp and module version, and nothing at all. Each
// result is a valid Debian version, and a snapshot after a tag sorts
// between that tag and the next.
func TestVersionString(t *testing.T) {
	for _, c := range []struct {
		name string
		info Info
		want string
	}{
		{"tag", Info{Tag: "v1.2.0", Revision: rev, Time: commit}, "1.2.0"},
		{"tag without v", Info{Tag: "1.2.0"}, "1.2.0"},
		{"pre-release", Info{Tag: "v1.2.0-rc1", Revision: rev, Time: commit}, "1.2.0~rc1"},
		{"after tag", Info{Tag: "v1.2.0-3-g81694e9", Revision: rev, Time: commit}, "1.2.0+git20261202.3.81694e9"},
		{"after pre-release", Info{Tag: "v1.2.0-rc1-12-g81694e9", Revision: rev, Time: commit}, "1.2.0~rc1+git20261202.12.81694e9"},
		{"after tag, dirty", Info{Tag: "v1.2.0-3-g81694e9-dirty", Revision: rev, Time: commit, Modified: true}, "1.2.0+git20261202.3.81694e9+dirty"},
		{"tag, dirty", Info{Tag: "v1.2.0-dirty", Revision: rev, Time: commit}, "1.2.0+dirty"},
		{"untagged", Info{Revision: rev, Time: commit}, "0.0~git20261202.81694e9"},
		{"untagged, modified", Info{Revision: rev, Time: commit, Modified: true}, "0.0~git20261202.81694e9+dirty"},
		{"untagged, no time", Info{Revision: rev}, "0.0~git81694e9"},
		{"pseudo-version", Info{Tag: "v0.0.0-20261202015800-81694e9c1234", Revision: rev, Time: commit}, "0.0~git20261202.81694e9"},
		{"pseudo-version after tag", Info{Tag: "v1.2.1-0.20261202015800-81694e9c1234", Revision: rev, Time: commit}, "1.2.0+git20261202.81694e9"},
		{"odd tag", Info{Tag: "release_5"}, "0~release.5"},
		{"nothing", Info{}, "0.0~unknown"},
	} {
		got := c.info.String()
		if got != c.want {
			t.Errorf("%s: %+v: got %q, want %q", c.name, c.info, got, c.want)
		}
		if !debianVersion.MatchString(got) {
			t.Errorf("%s: %q is not a valid Debian upstream version", c.name, got)
		}
	}
	// dpkg's order: 1.2.0~rc1 < 1.2.0 < 1.2.0+git... < 1.2.1~rc1; and a
	// snapshot before any tag sorts below the first release.
	order := []string{"0.0~git20261202.81694e9", "1.2.0~rc1", "1.2.0", "1.2.0+git20261202.3.81694e9", "1.2.1~rc1"}
	for i := 1; i < len(order); i++ {
		if debCompare(order[i-1], order[i]) >= 0 {
			t.Errorf("dpkg order: %s should sort before %s", order[i-1], order[i])
		}
	}
}

// TestVersionFromBuildInfo checks which source wins: the Makefile's
// values over Go's stamp, and the stamp's module version when the
// Makefile passed nothing.
func TestVersionFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{Main: debug.Module{Path: "spliced", Version: "v0.0.0-20261202015800-81694e9c1234+dirty"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: rev}, {Key: "vcs.time", Value: "2026-12-02T01:58:00Z"}, {Key: "vcs.modified", Value: "true"},
	}}
	if got := FromBuildInfo(bi, "", "", "", "").String(); got != "0.0~git20261202.81694e9+dirty" {
		t.Errorf("from the VCS stamp: %q", got)
	}
	i := FromBuildInfo(bi, "v1.3.0", "aaaaaaa", "1764640680", "false") // 2025-12-02
	if got := i.String(); got != "1.3.0" || i.Revision != "aaaaaaa" || i.Modified || i.Time.Year() != 2025 {
		t.Errorf("the Makefile's values lose: %q %+v", got, i)
	}
	noStamp := &debug.BuildInfo{Main: debug.Module{Path: "spliced", Version: "(devel)"}}
	if got := FromBuildInfo(noStamp, "", rev, "1764640680", "false").String(); got != "0.0~git20251202.81694e9" {
		t.Errorf("from the Makefile's commit alone: %q", got)
	}
	if got := FromBuildInfo(noStamp, "", "", "", "").String(); got != "0.0~unknown" {
		t.Errorf("nothing known: %q", got)
	}
	installed := &debug.BuildInfo{Main: debug.Module{Path: "spliced", Version: "v1.4.0"}}
	if got := FromBuildInfo(installed, "", "", "", "").String(); got != "1.4.0" {
		t.Errorf("go install spliced@v1.4.0: %q", got)
	}
	if d := FromBuildInfo(bi, "", "", "", "").Details(); !strings.Contains(d, "commit "+rev+" (2026-12-02T01:58:00Z) with uncommitted changes") {
		t.Errorf("details: %q", d)
	}
}

// debCompare is dpkg's version comparison (policy 5.6.12) for upstream
// versions: non-digit runs compare with ~ before everything (even the end)
// and letters before other characters; digit runs compare numerically.
func debCompare(a, b string) int {
	order := func(c byte) int {
		switch {
		case c == '~':
			return -1
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
			return int(c)
		default:
			return int(c) + 256
		}
	}
	isDigit := func(c byte) bool { return c >= '0' && c <= '9' }
	for a != "" || b != "" {
		for (a != "" && !isDigit(a[0])) || (b != "" && !isDigit(b[0])) {
			ac, bc := 0, 0 // the end of a non-digit run
			if a != "" && !isDigit(a[0]) {
				ac = order(a[0])
			}
			if b != "" && !isDigit(b[0]) {
				bc = order(b[0])
			}
			if ac != bc {
				return ac - bc
			}
			a, b = a[1:], b[1:] // equal, so both non-digits
		}
		na, nb := 0, 0
		for a != "" && isDigit(a[0]) {
			na, a = na*10+int(a[0]-'0'), a[1:]
		}
		for b != "" && isDigit(b[0]) {
			nb, b = nb*10+int(b[0]-'0'), b[1:]
		}
		if na != nb {
			return na - nb
		}
	}
	return 0
}
