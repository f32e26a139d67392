package manpage

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestREADMETestsExist: every test the README cites (as evidence of a
// claim, or to run) exists; a renamed or removed test left a claim
// nothing backs. A -run pattern TestX(A|B) stands for TestXA and TestXB.
func TestREADMETestsExist(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defined := map[string]bool{}
	funcRE := regexp.MustCompile(`(?m)^func (Test[A-Za-z0-9_]+)\(`)
	err = filepath.WalkDir("../..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && strings.HasPrefix(d.Name(), ".") && path != "../.." {
			return filepath.SkipDir
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range funcRE.FindAllSubmatch(src, -1) {
			defined[string(m[1])] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	cited := 0
	for _, m := range regexp.MustCompile(`\b(Test[A-Z][A-Za-z0-9_]*)(\([A-Za-z0-9_|]+\))?`).FindAllStringSubmatch(string(readme), -1) {
		names := []string{m[1]}
		if m[2] != "" {
			names = nil
			for _, alt := range strings.Split(strings.Trim(m[2], "()"), "|") {
				names = append(names, m[1]+alt)
			}
		}
		for _, n := range names {
			cited++
			if !defined[n] {
				t.Errorf("the README cites %s, which no test file defines", n)
			}
		}
	}
	if cited < 100 || len(defined) < 500 {
		t.Errorf("%d tests cited, %d defined", cited, len(defined))
	}
}
