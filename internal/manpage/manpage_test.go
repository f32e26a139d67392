package manpage

import (
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"spliced/internal/version"
)

// TestPages renders the three man pages from the repository's README and
// checks that they are complete (every configuration key of the
// reference, every splicectl command and flag, every daemon flag) and,
// where groff is installed, that groff formats them without a warning.
func TestPages(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	v := version.Info{Tag: "v1.2.0", Time: time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)}
	pages, err := Pages(string(readme), v)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]string{}
	for _, p := range pages {
		byName[p.Name] = p.Roff
		if !strings.Contains(p.Roff, `.TH "`) || !strings.Contains(p.Roff, `"2026-12-02" "spliced 1.2.0"`) {
			t.Errorf("%s: no .TH with date and version:\n%.300s", p.Name, p.Roff)
		}
	}
	want := map[string][]string{
		"spliced.8":   {`\fB\-config\fR \fIFILE\fR`, `\fB\-cleanup\fR`, `\fB\-version\fR`, ".SH KERNEL STATE", "SIGHUP", "/etc/spliced/spliced.yaml"},
		"splicectl.8": {".SH COMMANDS", `\fBruleset [\-diff]\fR`, `\fBconfig check FILE\fR`, `\fB\-j\fR`, "SPLICED_SOCKET", "spliced is not running"},
		"spliced.yaml.5": {".SH EXAMPLE", "services: []", ".SH FTP SERVICES", ".SH HTTP SERVICES",
			// What a SOCKS5 or direct service does beyond its keys: the
			// commands it serves, the backends' family.
			".SH SOCKS5 SERVICES", "BIND and UDP ASSOCIATE get 0x07", ".SH DIRECT SERVICES", `list backends of the listener\(aqs family`},
	}
	fixed := len(want["spliced.yaml.5"])
	// Every key of the README's configuration reference.
	key := regexp.MustCompile("(?m)^\\| `([a-z0-9_.\\[\\]]+)` \\|")
	ref, _ := Markdown(string(readme), "Configuration reference")
	for _, m := range key.FindAllStringSubmatch(ref, -1) {
		want["spliced.yaml.5"] = append(want["spliced.yaml.5"], `\fB`+m[1]+`\fR`)
	}
	if len(want["spliced.yaml.5"])-fixed < 30 {
		t.Errorf("the configuration reference has only %d keys", len(want["spliced.yaml.5"])-fixed)
	}
	for name, ws := range want {
		for _, w := range ws {
			if !strings.Contains(byName[name], w) {
				t.Errorf("%s lacks %q", name, w)
			}
		}
	}
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Log("groff is not installed; not formatting the pages")
		return
	}
	for _, p := range pages {
		cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-z")
		cmd.Stdin = strings.NewReader(p.Roff)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil || stderr.Len() > 0 {
			t.Errorf("groff %s: %v\n%s", p.Name, err, stderr.String())
		}
	}
}

// TestRoff covers the Markdown the README uses.
func TestRoff(t *testing.T) {
	md := "Run `spliced -check` **now**, *really*; see [FTP](#ftp) and [nft](https://netfilter.org).\n\n.dot 'quote' back\\slash\n\n" +
		"- one\n  two\n\n```sh\n-x 'a' \\n\n```\n\n| key | default | meaning |\n|---|---|---|\n| `a.b` | `1` | x \\| y |\n"
	got := Roff(md)
	for _, w := range []string{
		`Run \fBspliced \-check\fR \fBnow\fR, \fIreally\fR; see FTP and nft (https://netfilter.org).`,
		`\&.dot \(aqquote\(aq back\eslash`,
		".IP \\(bu 2\none two\n",
		".nf\n\\-x \\(aqa\\(aq \\en\n.fi",
		".TP\n\\fBa.b\\fR\nx | y\n(default: \\fB1\\fR)\n",
	} {
		if !strings.Contains(got, w) {
			t.Errorf("Roff lacks %q:\n%s", w, got)
		}
	}
	if _, err := Markdown("# t\n## A\nx\n", "B"); err == nil {
		t.Error("a missing section is not an error")
	}
	if md, _ := Markdown("## A\n```\n## not a heading\n```\nx\n## B\n", "A"); !strings.Contains(md, "x") || strings.Contains(md, "B") {
		t.Errorf("section with a fenced ##: %q", md)
	}
}
