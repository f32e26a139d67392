package gateway

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestMetricsDocumented keeps the README's metrics and the daemon's the
// same: every metric the gateway or a proxy exports is named in the
// README, with every label of the gateway's own in one place at least
// (its list of metrics), and every metric the README names exists,
// with labels it has. A metric added without a word, or renamed, left
// a stranger with a dashboard of series that never came.
func TestMetricsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string][]string{} // metric: its labels (proxies' without theirs)
	ch := make(chan *prometheus.Desc, 64)
	(&collector{}).Describe(ch)
	close(ch)
	descRE := regexp.MustCompile(`fqName: "([a-z0-9_]+)".*variableLabels: \{([a-z_,]*)\}`)
	for d := range ch {
		m := descRE.FindStringSubmatch(d.String())
		if m == nil {
			t.Fatalf("cannot read %s", d)
		}
		labels[m[1]] = strings.Split(m[2], ",")
		if m[2] == "" {
			labels[m[1]] = nil
		}
	}
	gateway := len(labels)
	// The proxies' metrics (proxy.MetricsSource) exist only once a
	// service runs; their names are in their sources.
	files, _ := filepath.Glob("../proxy/*.go")
	more, _ := filepath.Glob("../proxy/*/*.go")
	for _, f := range append(files, more...) {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range regexp.MustCompile(`Name: +"(spliced_[a-z0-9_]+)"`).FindAllSubmatch(src, -1) {
			if _, ok := labels[string(m[1])]; !ok {
				labels[string(m[1])] = []string{"?"} // labels not known here
			}
		}
	}
	if gateway < 20 || len(labels)-gateway < 15 {
		t.Fatalf("found %d metrics of the gateway and %d of proxies", gateway, len(labels)-gateway)
	}
	// The README names a metric as `name` or `name{label,label="value"}`,
	// the braces sometimes on the next line.
	named := map[string][][]string{}
	for _, m := range regexp.MustCompile("`(spliced_[a-z0-9_]+)\\s*(\\{[^}`]*\\})?").FindAllStringSubmatch(string(readme), -1) {
		var ls []string
		for _, l := range strings.Split(strings.Trim(m[2], "{}"), ",") {
			if l, _, _ = strings.Cut(strings.TrimSpace(l), "="); l != "" {
				ls = append(ls, l)
			}
		}
		named[m[1]] = append(named[m[1]], ls)
	}
	for name, want := range labels {
		mentions, ok := named[name]
		if !ok {
			t.Errorf("metric %s is not in the README", name)
			continue
		}
		if slices.Equal(want, []string{"?"}) {
			continue
		}
		full := false
		for _, ls := range mentions {
			for _, l := range ls {
				if !slices.Contains(want, l) {
					t.Errorf("the README gives metric %s a label %s; it has %v", name, l, want)
				}
			}
			full = full || len(ls) == len(want)
		}
		if !full {
			t.Errorf("the README never names all labels of metric %s: %v", name, want)
		}
	}
	for name := range named {
		if _, ok := labels[name]; !ok {
			t.Errorf("the README names metric %s, which does not exist", name)
		}
	}
}
