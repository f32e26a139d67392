package main

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"spliced/proxy/httpproxy"
	"spliced/testnet"
)

// policyExplore is the lab's http.splice_explore: exploring may cost
// half the predicted time, so that a short run explores.
const policyExplore = 2

// TestLabHTTPSplicePolicy: the measured splice policy with real nginx
// on one keep-alive connection (each request sent once the previous
// response is read): responses below splice_min are relayed; eligible
// ones are relayed to measure, then spliced to measure (forced: the
// estimates do not exist yet), then spliced or relayed by the model,
// some the other way to explore. Nothing here is timed:
// which way the model goes depends on this machine, so the test checks
// that every decision is the one its logged estimates give (recomputed
// with httpproxy.Decide, exploring replayed with httpproxy.Explorer),
// that every body is intact, that the gateway
// spliced exactly the responses the proxy chose to splice, and that
// the Prometheus counters agree with the decisions logged.
func TestLabHTTPSplicePolicy(t *testing.T) {
	t.Parallel()
	conf := strings.Replace(httpConfig("splice"), "      splice_policy: always\n",
		// splice_idle_min 0: the model decides alone, whatever else
		// the machine is doing (cpu_busy has its unit tests).
		fmt.Sprintf("      splice_policy: measured\n      splice_explore: %d\n      splice_idle_min: 0\n", policyExplore), 1)
	hl := startHTTPLabConf(t, conf, testnet.Options{}, nil)
	hc := hl.dial(t)
	files := []string{"small.bin", "big.bin", "medium.bin", "big.bin", "small.bin", "medium.bin"}
	var paths []string
	for i := range 48 {
		file := files[i%len(files)]
		if i%20 == 19 {
			file = "huge.bin"
		}
		paths = append(paths, "/"+[]string{"a", "b"}[i%2]+"/"+file)
	}
	for _, path := range paths {
		hc.send(path)
		hl.expect(hc, path)
	}
	var decisions []map[string]any
	if err := testnet.Poll(10*time.Second, func() error {
		decisions = decisions[:0]
		for _, l := range hl.d.Lines() {
			if l["msg"] == "http splice decision" {
				decisions = append(decisions, l)
			}
		}
		if len(decisions) < len(paths) {
			return fmt.Errorf("%d decisions logged for %d responses", len(decisions), len(paths))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(decisions) != len(paths) {
		t.Fatalf("%d decisions for %d responses", len(decisions), len(paths))
	}

	counts := map[string]int{}
	withEstimates := 0 // eligible decisions made with every estimate known
	x := httpproxy.Explorer{N: policyExplore}
	for i, l := range decisions {
		path, why, decision := paths[i], l["reason"].(string), l["decision"].(string)
		counts[decision+"/"+why]++
		length := int64(l["content_length"].(float64))
		if want := map[string]int64{"small.bin": httpSmall, "medium.bin": httpMedium, "big.bin": httpBig, "huge.bin": httpHuge}[path[3:]]; length != want {
			t.Fatalf("decision %d (%s): content_length %d, want %d", i, path, length, want)
		}
		if length < 64<<10 {
			if decision != "relayed" || why != "below_splice_min" {
				t.Errorf("decision %d (%s): %s/%s below splice_min", i, path, decision, why)
			}
			continue
		}
		onTheWay, ok := l["body_on_the_way"].(float64)
		if !ok || onTheWay > float64(length) {
			t.Fatalf("decision %d (%s, %s/%s): body_on_the_way %v of %d bytes", i, path, decision, why, l["body_on_the_way"], length)
		}
		if why == "arrived" || onTheWay < 64<<10 {
			// Less than splice_min still to come: relayed.
			if decision != "relayed" || why != "arrived" {
				t.Errorf("decision %d (%s): %s/%s with %v bytes on their way", i, path, decision, why, onTheWay)
			}
			t.Logf("%2d %-14s %-8s %-13s %d bytes on their way", i, path, decision, why, int64(onTheWay))
			continue
		}
		if l["deferred"] != nil {
			// Only with another spliced connection open.
			t.Errorf("decision %d (%s): deferred on the only connection: %v", i, path, l)
		}
		est, ok := l["estimates"].(map[string]any)
		if !ok {
			t.Fatalf("decision %d (%s, %s/%s) logged no estimates: %v", i, path, decision, why, l)
		}
		e := httpproxy.Estimates{
			Transition: time.Duration(est["transition_ns"].(float64)), TransitionOK: est["transition_ok"].(bool),
			Relayed: httpproxy.Fit{Fixed: time.Duration(est["relayed_fixed_ns"].(float64)), PerByte: est["relayed_ns_per_byte"].(float64),
				Samples: uint64(est["relayed_samples"].(float64)), OK: est["relayed_ok"].(bool)},
			Spliced: httpproxy.Fit{Fixed: time.Duration(est["spliced_fixed_ns"].(float64)), PerByte: est["spliced_ns_per_byte"].(float64),
				Samples: uint64(est["spliced_samples"].(float64)), OK: est["spliced_ok"].(bool)},
		}
		explore := false
		if e.Relayed.OK && e.Spliced.OK && e.TransitionOK {
			withEstimates++
			_, _, relayed, spliced := httpproxy.Decide(length, e, false)
			explore = x.Next(relayed, spliced)
		}
		splice, wantWhy, relayed, spliced := httpproxy.Decide(length, e, explore)
		if why != wantWhy || (decision == "spliced") != splice {
			t.Errorf("decision %d (%s): %s/%s, but its estimates give %s (splice %v): %v", i, path, decision, why, wantWhy, splice, est)
		}
		t.Logf("%2d %-14s %-8s %-13s predicted relayed %6d µs, spliced %6d µs", i, path, decision, why, relayed.Microseconds(), spliced.Microseconds())
		if why == "pays" || why == "does_not_pay" || why == "explore" {
			if int64(relayed) != int64(l["predicted_relayed_ns"].(float64)) || int64(spliced) != int64(l["predicted_spliced_ns"].(float64)) {
				t.Errorf("decision %d (%s): logged predictions %v/%v, the estimates give %d/%d", i, path,
					l["predicted_relayed_ns"], l["predicted_spliced_ns"], relayed, spliced)
			}
		}
	}
	t.Logf("decisions: %v; transitions: spliced %s; unspliced %s", counts, hl.took("flow spliced"), hl.took("flow unspliced"))
	// The estimates were built in order: relayed first, then spliced to
	// measure, then the model decided.
	if counts["relayed/measure"] == 0 || counts["spliced/measure"] == 0 {
		t.Errorf("no measuring phase: %v", counts)
	}
	if withEstimates == 0 {
		t.Errorf("the model never decided: %v", counts)
	}

	// The gateway spliced what the proxy chose to splice (a splice it
	// gave up leaves the response relayed, with a debug line).
	spliced := 0
	for k, n := range counts {
		if strings.HasPrefix(k, "spliced/") {
			spliced += n
		}
	}
	failed := hl.count("http: response stays proxied")
	if err := testnet.Poll(10*time.Second, func() error {
		if got := hl.count("flow spliced"); got != spliced-failed {
			return fmt.Errorf("%d flows spliced, %d splice decisions, %d given up", got, spliced, failed)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}

	// The counters say the same as the log, and the estimates are there.
	m := hl.metrics(t)
	re := regexp.MustCompile(`(?m)^spliced_http_splice_decisions_total\{decision="(\w+)",reason="(\w+)",service="web"\} (\d+)$`)
	got := map[string]int{}
	for _, s := range re.FindAllStringSubmatch(m, -1) {
		n, _ := strconv.Atoi(s[3])
		got[s[1]+"/"+s[2]] = n
	}
	if fmt.Sprint(got) != fmt.Sprint(counts) {
		t.Errorf("metrics: %v\nlog:     %v", got, counts)
	}
	for _, want := range []string{
		`spliced_http_splice_transition_seconds{service="web"} `,
		`spliced_http_body_rate_bytes_per_second{mode="relayed",service="web"} `,
		`spliced_http_body_rate_bytes_per_second{mode="spliced",service="web"} `,
		`spliced_http_body_fixed_seconds{mode="spliced",service="web"} `,
		`spliced_http_body_samples_total{mode="relayed",service="web"} `,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if regexp.MustCompile(`(?m)^spliced_http_splice_transition_seconds\{service="web"\} 0$`).MatchString(m) {
		t.Errorf("no transition cost measured")
	}
}
