// Command stage writes what the Debian package needs besides the binaries
// and the files in packaging/ (make deb runs it): the package version,
// computed as the packaged binary computes its own (internal/version, from
// the binary's build information and the Makefile's git facts); the man
// pages, gzipped (internal/manpage); and splicectl's bash completion.
package main

import (
	"bytes"
	"compress/gzip"
	"debug/buildinfo"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"spliced/ctl"
	"spliced/internal/manpage"
	"spliced/internal/version"
)

func main() {
	bin := flag.String("bin", "", "the spliced binary being packaged (any architecture)")
	readme := flag.String("readme", "README.md", "the README the man pages come from")
	out := flag.String("out", "", "directory to write VERSION, man/ and splicectl.bash to")
	tag := flag.String("tag", "", "git describe --tags, as passed to the binary")
	rev := flag.String("revision", "", "the commit, as passed to the binary")
	ts := flag.String("time", "", "the commit time (seconds), as passed to the binary")
	mod := flag.String("modified", "", `"true" if the tree was modified, as passed to the binary`)
	flag.Parse()
	if err := run(*bin, *readme, *out, *tag, *rev, *ts, *mod); err != nil {
		fmt.Fprintln(os.Stderr, "stage:", err)
		os.Exit(1)
	}
}

func run(bin, readme, out, tag, rev, ts, mod string) error {
	if bin == "" || out == "" {
		return fmt.Errorf("-bin and -out are required")
	}
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return err
	}
	v := version.FromBuildInfo(bi, tag, rev, ts, mod)
	if err := os.WriteFile(filepath.Join(out, "VERSION"), []byte(v.String()+"\n"), 0o644); err != nil {
		return err
	}
	md, err := os.ReadFile(readme)
	if err != nil {
		return err
	}
	pages, err := manpage.Pages(string(md), v)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(out, "man"), 0o755); err != nil {
		return err
	}
	for _, p := range pages {
		var gz bytes.Buffer
		w, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression) // no name, no time: reproducible
		w.Write([]byte(p.Roff))
		w.Close()
		if err := os.WriteFile(filepath.Join(out, "man", p.Name+".gz"), gz.Bytes(), 0o644); err != nil {
			return err
		}
	}
	var comp, errb bytes.Buffer
	if ctl.Run([]string{"completion", "bash"}, &comp, &errb) != 0 {
		return fmt.Errorf("splicectl completion bash: %s", errb.String())
	}
	return os.WriteFile(filepath.Join(out, "splicectl.bash"), comp.Bytes(), 0o644)
}
