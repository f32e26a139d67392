// Package version is spliced's version: what `spliced -version`,
// `splicectl version`, the control API's status and the Debian package
// report, all from one computation.
//
// The facts come from the Makefile, which passes `git describe --tags`,
// the commit, its time and whether the tree was modified with -ldflags -X
// (Go does not stamp builds from a git worktree, and this machine's go env
// has -buildvcs=false), or else from the VCS stamp Go embeds (vcs.revision,
// vcs.time, vcs.modified), or else from the module version of a `go
// install spliced@vX.Y.Z`.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"golang.org/x/mod/module"
)

// Set by the Makefile: go build -ldflags "-X spliced/internal/version.tag=..."
var (
	tag      string // git describe --tags --match 'v[0-9]*' --dirty (empty: no tag)
	revision string // git rev-parse HEAD
	commitTS string // committer time, seconds since the epoch (git log -1 --format=%ct)
	modified string // "true" when the tree had uncommitted changes
)

// Info is what is known about the build.
type Info struct {
	// Tag is `git describe --tags` output: "v1.2.0", "v1.2.0-3-g81694e9",
	// with "-dirty" when modified; or a module version (a tag, or a Go
	// pseudo-version when it is not a tag). Empty when unknown.
	Tag      string
	Revision string    // full commit hash; empty when unknown
	Time     time.Time // commit time; zero when unknown
	Modified bool      // built from a tree with uncommitted changes
}

// Get returns the running binary's Info.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return FromBuildInfo(bi, tag, revision, commitTS, modified)
}

// FromBuildInfo combines what the Makefile passed (any of which may be
// empty) with a binary's build information (may be nil); the Makefile's
// values win.
func FromBuildInfo(bi *debug.BuildInfo, tag, revision, commitTS, modified string) Info {
	i := Info{Tag: tag, Revision: revision, Modified: modified == "true"}
	if sec, err := strconv.ParseInt(commitTS, 10, 64); err == nil {
		i.Time = time.Unix(sec, 0).UTC()
	}
	if bi == nil {
		return i
	}
	stamped := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			stamped = true
			if i.Revision == "" {
				i.Revision = s.Value
			}
		case "vcs.time":
			if t, err := time.Parse(time.RFC3339, s.Value); err == nil && i.Time.IsZero() {
				i.Time = t.UTC()
			}
		case "vcs.modified":
			if revision == "" {
				i.Modified = s.Value == "true"
			}
		}
	}
	// Go 1.24 and later put a tag or pseudo-version of the stamped
	// commit in Main.Version; `go install spliced@v1.2.0` puts the tag.
	if v := bi.Main.Version; i.Tag == "" && v != "" && v != "(devel)" && (stamped || revision == "") {
		i.Tag = strings.TrimSuffix(v, "+dirty")
	}
	return i
}

// String is the version people and programs see: the Debian package
// version, so that `dpkg -l spliced`, `spliced -version` and `splicectl
// status` agree:
//
//	v1.2.0                       -> 1.2.0
//	v1.2.0-rc1                   -> 1.2.0~rc1 (sorts before 1.2.0)
//	v1.2.0-3-g81694e9 (describe) -> 1.2.0+git20261202.3.81694e9
//	no tag, commit 81694e9...    -> 0.0~git20261202.81694e9
//	uncommitted changes          -> ...+dirty
//	nothing known                -> 0.0~unknown
//
// The date is the commit's (UTC), left out when unknown.
func (i Info) String() string {
	base, after, hash := "", "", ""
	post := false // commits after the tag base
	t := strings.TrimSuffix(i.Tag, "-dirty")
	switch {
	case t == "":
	case module.IsPseudoVersion(t):
		// A Go pseudo-version: the commit, after the tag it names if any.
		b, _ := module.PseudoVersionBase(t)
		base = b
		if r, err := module.PseudoVersionRev(t); err == nil {
			hash = r
		}
		post = base != ""
	default:
		base = t
		// git describe: TAG-N-gHASH when HEAD is N commits after TAG.
		if parts := strings.Split(t, "-"); len(parts) >= 3 {
			n, g := parts[len(parts)-2], parts[len(parts)-1]
			if _, err := strconv.Atoi(n); err == nil && strings.HasPrefix(g, "g") {
				base, after, hash, post = strings.Join(parts[:len(parts)-2], "-"), n, g[1:], true
			}
		}
	}
	if hash == "" && i.Revision != "" && (base == "" || post) {
		hash = i.Revision
	}
	if len(hash) > 7 {
		hash = hash[:7]
	}
	var v string
	date := ""
	if !i.Time.IsZero() {
		date = i.Time.UTC().Format("20060102")
	}
	switch {
	case base != "" && !post:
		v = debianUpstream(base)
	case base != "":
		v = debianUpstream(base) + "+git" + join(date, after, hash)
	case hash != "":
		v = "0.0~git" + join(date, hash)
	default:
		v = "0.0~unknown"
	}
	if i.Modified || strings.HasSuffix(i.Tag, "-dirty") {
		v += "+dirty"
	}
	return v
}

// join joins the non-empty elements with dots.
func join(elems ...string) string {
	var out []string
	for _, e := range elems {
		if e != "" {
			out = append(out, e)
		}
	}
	return strings.Join(out, ".")
}

// debianUpstream turns a tag into a Debian upstream version: no leading
// v, a pre-release after ~ (so 1.2.0~rc1 sorts before 1.2.0), build
// metadata after +, and only the characters Debian allows. A tag that
// does not start with a digit gets "0~" in front.
func debianUpstream(tag string) string {
	v := strings.TrimPrefix(tag, "v")
	meta := ""
	if i := strings.IndexByte(v, '+'); i >= 0 {
		v, meta = v[:i], v[i+1:]
	}
	if i := strings.IndexByte(v, '-'); i >= 0 {
		v = v[:i] + "~" + v[i+1:]
	}
	if meta != "" {
		v += "+" + meta
	}
	v = strings.Map(func(r rune) rune {
		switch {
		case r >= '0' && r <= '9', r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', strings.ContainsRune(".+~", r):
			return r
		}
		return '.'
	}, v)
	if v == "" || v[0] < '0' || v[0] > '9' {
		v = "0~" + v
	}
	return v
}

// Details is a second line for -version: the tag, commit, its time,
// whether the tree was modified, and the Go toolchain and platform.
func (i Info) Details() string {
	var parts []string
	if i.Tag != "" {
		parts = append(parts, i.Tag)
	}
	if i.Revision != "" {
		c := "commit " + i.Revision
		if !i.Time.IsZero() {
			c += " (" + i.Time.UTC().Format(time.RFC3339) + ")"
		}
		if i.Modified {
			c += " with uncommitted changes"
		}
		parts = append(parts, c)
	}
	parts = append(parts, fmt.Sprintf("%s %s/%s", runtime.Version(), runtime.GOOS, runtime.GOARCH))
	return strings.Join(parts, ", ")
}
