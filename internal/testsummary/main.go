// Command testsummary reads `go test -json` on standard input, prints a
// per-package summary with the full output of every failed test, and exits
// non-zero when anything failed. Run as root, it also fails when any test
// skipped: lab tests skip only without root, so a skip under root (as in
// CI) is a missing test. It ends with the 30 slowest top-level tests: the
// lab package runs them one after the other, against make test's
// timeout.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

func main() {
	outputs := map[string][]string{} // package/test -> output lines
	var failed, skipped []string
	var timed []timing // top-level tests that ended
	buildFailed := false
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 4<<20), 4<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			fmt.Println(sc.Text()) // not JSON: e.g. a build error from go vet
			continue
		}
		key := e.Package + " " + e.Test
		if (e.Action == "pass" || e.Action == "fail") && e.Test != "" && !strings.Contains(e.Test, "/") {
			timed = append(timed, timing{key, e.Elapsed})
		}
		switch e.Action {
		case "output", "build-output":
			outputs[key] = append(outputs[key], e.Output)
		case "build-fail":
			buildFailed = true
			fmt.Printf("BUILD FAIL %s\n%s", e.Package, strings.Join(outputs[key], ""))
		case "fail":
			if e.Test == "" {
				fmt.Printf("FAIL\t%s\t%.1fs\n", e.Package, e.Elapsed)
				// Package-level output holds panics and TestMain failures.
				if lines := outputs[key]; len(lines) > 0 {
					fmt.Print(indent(lines))
				}
			} else {
				failed = append(failed, key)
				fmt.Printf("--- FAIL: %s (%.1fs)\n%s", key, e.Elapsed, indent(outputs[key]))
			}
		case "pass":
			if e.Test == "" {
				fmt.Printf("ok\t%s\t%.1fs\n", e.Package, e.Elapsed)
			}
			delete(outputs, key)
		case "skip":
			if e.Test != "" {
				skipped = append(skipped, key+": "+skipReason(outputs[key]))
			} else {
				fmt.Printf("?\t%s\t[no test files]\n", e.Package)
			}
			delete(outputs, key)
		}
	}
	printSlowest(timed, 30)
	sort.Strings(skipped)
	if len(skipped) > 0 {
		fmt.Printf("\n%d skipped:\n  %s\n", len(skipped), strings.Join(skipped, "\n  "))
	}
	code := 0
	if buildFailed || len(failed) > 0 {
		fmt.Printf("\nFAILED: %d tests\n", len(failed))
		code = 1
	}
	if len(skipped) > 0 && os.Geteuid() == 0 {
		fmt.Println("\nFAILED: tests skipped although running as root; a skipped lab test is a missing test")
		code = 1
	}
	if code == 0 {
		fmt.Println("\nPASS")
	}
	os.Exit(code)
}

func indent(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		if strings.HasPrefix(l, "=== ") {
			continue
		}
		b.WriteString("    " + l)
	}
	return b.String()
}

func skipReason(lines []string) string {
	for _, l := range lines {
		if i := strings.Index(l, ".go:"); i >= 0 {
			return strings.TrimSpace(l)
		}
	}
	return "no reason given"
}

type timing struct {
	test    string
	elapsed float64
}

// printSlowest prints the n slowest tests of timed.
func printSlowest(timed []timing, n int) {
	if len(timed) == 0 {
		return
	}
	sort.SliceStable(timed, func(i, j int) bool { return timed[i].elapsed > timed[j].elapsed })
	fmt.Printf("\nslowest tests:\n")
	for _, t := range timed[:min(n, len(timed))] {
		fmt.Printf("  %7.1fs  %s\n", t.elapsed, t.test)
	}
}
