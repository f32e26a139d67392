package manpage

import (
	"fmt"
	"regexp"
	"strings"
)

// Markdown returns the README's section titled title ("## title"): the
// lines after its heading up to the next heading of the same or a higher
// level. A missing section is an error, so that renaming one in the README
// fails the build instead of shipping an empty man page.
func Markdown(readme, title string) (string, error) {
	lines := strings.Split(readme, "\n")
	start, level := -1, 0
	for i, l := range lines {
		h := headingLevel(l)
		if start < 0 {
			if h > 0 && strings.TrimSpace(l[h:]) == title {
				start, level = i+1, h
			}
			continue
		}
		if h > 0 && h <= level && !inFence(lines[start:i]) {
			return strings.Join(lines[start:i], "\n"), nil
		}
	}
	if start < 0 {
		return "", fmt.Errorf("README has no section %q", title)
	}
	return strings.Join(lines[start:], "\n"), nil
}

// headingLevel is the number of leading #s of a Markdown heading, 0 if l
// is not one.
func headingLevel(l string) int {
	n := 0
	for n < len(l) && l[n] == '#' {
		n++
	}
	if n == 0 || n >= len(l) || l[n] != ' ' {
		return 0
	}
	return n
}

// inFence reports whether lines leave a ``` code block open.
func inFence(lines []string) bool {
	open := false
	for _, l := range lines {
		if strings.HasPrefix(l, "```") {
			open = !open
		}
	}
	return open
}

// Roff converts the README's Markdown (paragraphs, ``` blocks, bullet
// lists, tables, ### headings; `code`, **bold** and links inline) to man(7)
// requests. A table's first column becomes a tagged paragraph's tag; the
// last column its text; columns between are added as "header: value".
func Roff(md string) string {
	var b strings.Builder
	lines := strings.Split(strings.Trim(md, "\n"), "\n")
	var para []string
	flush := func() {
		if len(para) > 0 {
			b.WriteString(".PP\n" + inline(strings.Join(para, " ")) + "\n")
			para = nil
		}
	}
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		switch {
		case strings.TrimSpace(l) == "":
			flush()
		case strings.HasPrefix(l, "```"):
			flush()
			b.WriteString(".PP\n.RS 2\n.nf\n")
			for i++; i < len(lines) && !strings.HasPrefix(lines[i], "```"); i++ {
				b.WriteString(literal(lines[i]) + "\n")
			}
			b.WriteString(".fi\n.RE\n")
		case headingLevel(l) > 0:
			flush()
			b.WriteString(".SS " + quote(inlinePlain(strings.TrimSpace(l[headingLevel(l):]))) + "\n")
		case strings.HasPrefix(l, "- "):
			flush()
			item := []string{strings.TrimPrefix(l, "- ")}
			for i+1 < len(lines) && strings.HasPrefix(lines[i+1], "  ") {
				i++
				item = append(item, strings.TrimSpace(lines[i]))
			}
			b.WriteString(".IP \\(bu 2\n" + inline(strings.Join(item, " ")) + "\n")
		case strings.HasPrefix(l, "|"):
			flush()
			var rows [][]string
			for ; i < len(lines) && strings.HasPrefix(lines[i], "|"); i++ {
				rows = append(rows, cells(lines[i]))
			}
			i--
			table(&b, rows)
		default:
			para = append(para, strings.TrimSpace(l))
		}
	}
	flush()
	return b.String()
}

// cells splits a table row at the | that are not escaped as \|.
func cells(row string) []string {
	row = strings.TrimSpace(row)
	row = strings.TrimPrefix(strings.TrimSuffix(row, "|"), "|")
	row = strings.ReplaceAll(row, `\|`, "\x00")
	var out []string
	for _, c := range strings.Split(row, "|") {
		out = append(out, strings.TrimSpace(strings.ReplaceAll(c, "\x00", "|")))
	}
	return out
}

var separatorRow = regexp.MustCompile(`^:?-+:?$`)

func table(b *strings.Builder, rows [][]string) {
	if len(rows) < 2 {
		return
	}
	header, body := rows[0], rows[1:]
	if len(body) > 0 && len(body[0]) > 0 && separatorRow.MatchString(body[0][0]) {
		body = body[1:]
	}
	for _, r := range body {
		if len(r) == 0 {
			continue
		}
		b.WriteString(".TP\n" + inline(r[0]) + "\n")
		text := inline(r[len(r)-1])
		var extra []string
		for c := 1; c < len(r)-1; c++ {
			if r[c] != "" && c < len(header) {
				extra = append(extra, header[c]+": "+inline(r[c]))
			}
		}
		if len(extra) > 0 {
			text += "\n(" + strings.Join(extra, "; ") + ")"
		}
		b.WriteString(text + "\n")
	}
}

var (
	code   = regexp.MustCompile("`([^`]+)`")
	bold   = regexp.MustCompile(`\*\*([^*]+)\*\*`)
	italic = regexp.MustCompile(`\*([^*\s][^*]*)\*`)
	link   = regexp.MustCompile(`\[([^\]]+)\]\(([^)]+)\)`)
)

// inline converts one paragraph's inline Markdown to roff: `code` and
// **bold** become bold, a link to a README anchor its text, another link
// "text (URL)".
func inline(s string) string {
	s = link.ReplaceAllStringFunc(s, func(m string) string {
		p := link.FindStringSubmatch(m)
		if strings.HasPrefix(p[2], "#") {
			return p[1]
		}
		return p[1] + " (" + p[2] + ")"
	})
	// Escape first, outside and inside code spans alike, then add fonts.
	var out strings.Builder
	rest := s
	for {
		loc := code.FindStringSubmatchIndex(rest)
		if loc == nil {
			out.WriteString(boldSpans(escape(rest)))
			break
		}
		out.WriteString(boldSpans(escape(rest[:loc[0]])))
		out.WriteString(`\fB` + strings.ReplaceAll(escape(rest[loc[2]:loc[3]]), "-", `\-`) + `\fR`)
		rest = rest[loc[1]:]
	}
	return lineStart(out.String())
}

func boldSpans(s string) string {
	return italic.ReplaceAllString(bold.ReplaceAllString(s, `\fB$1\fR`), `\fI$1\fR`)
}

// inlinePlain is inline without fonts, for .SS and .TH arguments.
func inlinePlain(s string) string {
	s = link.ReplaceAllString(s, "$1")
	s = strings.NewReplacer("`", "", "*", "").Replace(s)
	return escape(s)
}

// escape makes text safe for roff: backslashes, and the characters groff
// would turn into typographic ones.
func escape(s string) string {
	return strings.NewReplacer(`\`, `\e`, "'", `\(aq`, "`", `\(ga`, "^", `\(ha`, "~", `\(ti`).Replace(s)
}

// literal is one line of a code block: escaped, hyphens kept as ASCII
// minus so that commands can be copied.
func literal(s string) string {
	return lineStart(strings.ReplaceAll(escape(s), "-", `\-`))
}

// lineStart keeps a line that starts with . or ' from being a request.
func lineStart(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, ".") || strings.HasPrefix(l, "'") {
			l = `\&` + l
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `\(dq`) + `"` }
