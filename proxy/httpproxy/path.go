package httpproxy

import (
	"strings"
)

// normalizePath returns the form of a request path the proxy routes on
// and forwards, and the other readings of it a backend might make (alt).
// The rules, decided for a gateway whose deny routes must hold whatever
// the backend behind it is:
//
//   - Percent-encoding (RFC 3986 6.2.2): an encoded unreserved character
//     (ALPHA DIGIT - . _ ~) is decoded, so /%61dmin/ is /admin/ and
//     /%2e%2e/ is /../; other encodings stay, in upper-case hex. A bad
//     escape (%4, %zz), an encoded NUL (%00) and a raw control byte are
//     refused (400).
//   - A byte that may not appear in a path (raw non-ASCII, ", <, >, \,
//     ^, `, {, |, }) is percent-encoded: every server decodes %XX to the
//     same byte, so the reading does not change.
//   - Dot segments are resolved (RFC 3986 5.2.4): /x/../admin/x is
//     /admin/x; what climbs above the root stays at the root.
//   - Empty segments are merged: //admin/ is /admin/ (nginx's
//     merge_slashes does the same by default, Go's ServeMux too).
//
// Some servers read more into a path: Tomcat and Jetty drop ;parameters
// from each segment (so /..;/ is /../), many decode %2F to a slash before
// resolving dot segments (nginx among them), Windows servers take \ as a
// slash. These readings are returned in alt; the proxy refuses (400) a
// request whose readings do not all route alike, so /a/..%2Fadmin/ and
// /a/..;/admin/ are refused when /admin/ has its own route, and
// /api/v4/projects/group%2Fproject stays usable. A double encoding
// (%252F) is left alone: a backend that decodes twice is not supported.
func normalizePath(p string) (norm string, alt []string, err error) {
	if p == "" || p[0] != '/' {
		return "", nil, badRequest("request path %q does not start with /", truncate([]byte(p)))
	}
	if plainPath(p) {
		// The common case, allocation-free: nothing to decode, escape
		// or resolve, and no other reading.
		return p, nil, nil
	}
	return normalizeFully(p)
}

// normalizeFully is normalizePath without the shortcut for plain paths
// (p starts with /).
func normalizeFully(p string) (norm string, alt []string, err error) {
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '%':
			if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
				return "", nil, badRequest("invalid percent-encoding in the request path")
			}
			v := unhex(p[i+1])<<4 | unhex(p[i+2])
			i += 2
			switch {
			case v == 0:
				return "", nil, badRequest("encoded NUL in the request path")
			case isUnreserved(v):
				b.WriteByte(v)
			default:
				writeEscaped(&b, v)
			}
		case c < ' ' || c == 0x7f:
			return "", nil, badRequest("control byte in the request path")
		case isPathByte(c):
			b.WriteByte(c)
		default:
			writeEscaped(&b, c)
		}
	}
	norm = removeDotSegments(b.String())
	// The other readings of norm, the path the backend gets (not of
	// the path as sent: /admin;/;/.. is /admin;/ once its dot segments
	// are resolved, which Tomcat reads as /admin/, while the path as
	// sent, its parameters dropped, reads /): ;parameters dropped, %2F
	// or %5C or both as slashes (nginx takes %2F as a slash and %5C as
	// a backslash, which on Unix is none; Windows servers take both),
	// and the parameters dropped before or after the decoding: Tomcat
	// drops those of each raw segment first (so in
	// /a/..%2Fadmin;%2F..%2Fa/x the parameter hides two slashes, and it
	// reads /admin/x), a server that decodes first reads /a/x.
	for _, slashes := range slashReplacers {
		for _, v := range []string{
			slashes.Replace(norm),
			dropParams(slashes.Replace(norm)),
			slashes.Replace(dropParams(norm)),
		} {
			if v = removeDotSegments(v); v != norm && !contains(alt, v) {
				alt = append(alt, v)
			}
		}
	}
	return norm, alt, nil
}

// slashReplacers are the ways a server may read encoded slashes in a
// normalised path (which has upper-case escapes): none, %2F, %5C or both
// as slashes.
var slashReplacers = []*strings.Replacer{
	strings.NewReplacer(),
	strings.NewReplacer("%2F", "/"),
	strings.NewReplacer("%5C", "/"),
	strings.NewReplacer("%2F", "/", "%5C", "/"),
}

// plainPath: p is an absolute path that is its own normal form and has no
// other reading: only bytes that stay as they are (no %, no ;), and no
// empty (but the last), "." or ".." segment.
func plainPath(p string) bool {
	if p == "" || p[0] != '/' {
		return false
	}
	seg := 1 // where the current segment starts
	for i := 1; i <= len(p); i++ {
		if i < len(p) {
			c := p[i]
			if c != '/' {
				if c == '%' || c == ';' || !isPathByte(c) {
					return false
				}
				continue
			}
		}
		switch p[seg:i] {
		case "":
			if i < len(p) {
				return false
			}
		case ".", "..":
			return false
		}
		seg = i + 1
	}
	return true
}

// removeDotSegments resolves "." and ".." segments of an absolute path
// (RFC 3986 5.2.4) and merges empty segments; a trailing slash, or a
// final dot segment, leaves a trailing slash.
func removeDotSegments(p string) string {
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	trailing := false
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case "", ".":
			trailing = last
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			trailing = last
		default:
			out = append(out, s)
			trailing = false
		}
	}
	r := "/" + strings.Join(out, "/")
	if trailing && len(out) > 0 {
		r += "/"
	}
	return r
}

// dropParams removes ;parameters from every segment, the way Servlet
// containers read a path.
func dropParams(p string) string {
	if !strings.Contains(p, ";") {
		return p
	}
	segs := strings.Split(p, "/")
	for i, s := range segs {
		s, _, _ = strings.Cut(s, ";")
		segs[i] = s
	}
	return strings.Join(segs, "/")
}

// routePath normalises a configured route path the way request paths
// are, so that the two compare (a route path with a space matches the
// request's %20). A route path that does not normalise is kept as it is.
func routePath(p string) string {
	norm, _, err := normalizePath(p)
	if err != nil {
		return p
	}
	if strings.HasSuffix(p, "/") && !strings.HasSuffix(norm, "/") {
		norm += "/"
	}
	return norm
}

// windowsReading is a normalised path as a Windows server that maps it
// to file names may read it (with http.paths_ignore_case): Windows drops
// a name's trailing dots and spaces (admin. and "admin " are admin), and
// "name:stream" is a stream of the file name (admin::$INDEX_ALLOCATION
// is the directory admin, admin::$DATA the file's content). So each
// segment loses what follows a colon, raw or encoded, then its trailing
// dots and encoded spaces. Other Windows readings (8.3 short names such
// as ADMINI~1) cannot be told from the path and are not covered.
func windowsReading(p string) string {
	if !windowsReads(p) {
		return p // the common case, allocation-free
	}
	segs := strings.Split(p, "/")
	for i, s := range segs {
		if j := strings.IndexByte(s, ':'); j >= 0 {
			s = s[:j]
		}
		if j := strings.Index(s, "%3A"); j >= 0 {
			s = s[:j]
		}
		for {
			t := strings.TrimRight(s, ".")
			t = strings.TrimSuffix(t, "%20")
			if t == s {
				break
			}
			s = t
		}
		segs[i] = s
	}
	return removeDotSegments(strings.Join(segs, "/"))
}

// windowsReads: windowsReading changes p: a colon, raw or encoded, or a
// segment that ends in a dot or an encoded space.
func windowsReads(p string) bool {
	segEnd := func(j int) bool { return j == len(p) || p[j] == '/' }
	for i := 0; i < len(p); i++ {
		switch {
		case p[i] == ':', strings.HasPrefix(p[i:], "%3A"),
			p[i] == '.' && segEnd(i+1),
			strings.HasPrefix(p[i:], "%20") && segEnd(i+3):
			return true
		}
	}
	return false
}

// pathMatches: path is under prefix; a prefix ending in a slash also
// matches the path without it (/admin for /admin/), which most servers
// serve as the same directory (or redirect to it).
//
// fold compares ASCII letters without case (http.paths_ignore_case): the
// other bytes of a normalised path are percent-encoded, with upper-case
// hex digits, so they compare alike in any case.
func pathMatches(prefix, path string, fold bool) bool {
	if !fold {
		if strings.HasPrefix(path, prefix) {
			return true
		}
		return len(prefix) > 1 && prefix[len(prefix)-1] == '/' && path == prefix[:len(prefix)-1]
	}
	if len(path) >= len(prefix) && strings.EqualFold(path[:len(prefix)], prefix) {
		return true
	}
	return len(prefix) > 1 && prefix[len(prefix)-1] == '/' && strings.EqualFold(path, prefix[:len(prefix)-1])
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func writeEscaped(b *strings.Builder, c byte) {
	const hex = "0123456789ABCDEF"
	b.WriteByte('%')
	b.WriteByte(hex[c>>4])
	b.WriteByte(hex[c&15])
}

// isUnreserved: ALPHA / DIGIT / "-" / "." / "_" / "~" (RFC 3986 2.3).
func isUnreserved(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || isDigit(c) || c == '-' || c == '.' || c == '_' || c == '~'
}

// isPathByte: a byte that may appear as is in a path: unreserved,
// sub-delims, ":", "@" and "/" (RFC 3986 3.3).
func isPathByte(c byte) bool {
	return isUnreserved(c) || strings.IndexByte("!$&'()*+,;=:@/", c) >= 0
}
