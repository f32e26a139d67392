package main

import (
	"bytes"
	"os"
	"regexp"
	"slices"
	"testing"
)

// TestFlagsDocumented keeps the README's flag table, from which spliced(8)
// is generated (internal/manpage), and the daemon's flags the same.
func TestFlagsDocumented(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"-h"}, &bytes.Buffer{}, &stderr); code != 2 {
		t.Fatalf("spliced -h: exit %d", code)
	}
	var defined []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(stderr.String(), -1) {
		defined = append(defined, m[1])
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `-([a-z-]+)[ `]").FindAllStringSubmatch(string(readme), -1) {
		documented = append(documented, m[1])
	}
	slices.Sort(defined)
	slices.Sort(documented)
	if len(defined) < 7 || !slices.Equal(defined, documented) {
		t.Errorf("flags %v, README's flag table %v", defined, documented)
	}
}
