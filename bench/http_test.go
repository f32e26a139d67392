package bench

import (
	"strings"
	"testing"
	"time"
)

// wrkOutput is what wrk 4.1 prints with --latency.
const wrkOutput = `Running 3s test @ http://10.1.0.1:8081/small.bin
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.33us  200.12us   5.00ms   80.00%
    Req/Sec     8.30k   500.00     9.00k    70.00%
  Latency Distribution
     50%  480.00us
     75%  600.00us
     90%  700.00us
     99%    1.20ms
  49551 requests in 3.00s, 207.36MB read
Requests/sec:  16517.00
Transfer/sec:     69.12MB
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(wrkOutput)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 49551 || r.Elapsed != 3*time.Second || r.Rate != 16517 || r.P99 != 1200*time.Microsecond {
		t.Errorf("%+v", r)
	}
	// Slow runs print seconds and minutes.
	slow := strings.Replace(strings.Replace(wrkOutput, "1.20ms", "2.50s", 1), "in 3.00s", "in 1.05m", 1)
	if r, err := parseWrk(slow); err != nil || r.P99 != 2500*time.Millisecond || r.Elapsed != 63*time.Second {
		t.Errorf("%+v %v", r, err)
	}
	// Without --latency there is no p99, and that is no error.
	noLatency := strings.Replace(wrkOutput, "     99%    1.20ms\n", "", 1)
	if r, err := parseWrk(noLatency); err != nil || r.P99 != 0 || r.Rate != 16517 {
		t.Errorf("%+v %v", r, err)
	}
	for name, out := range map[string]string{
		"socket errors": strings.Replace(wrkOutput, "Requests/sec", "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec", 1),
		"non-2xx":       strings.Replace(wrkOutput, "Requests/sec", "  Non-2xx or 3xx responses: 7\nRequests/sec", 1),
		"no rate":       "unable to connect to 10.1.0.1:8081 Connection refused\n",
		"bad unit":      strings.Replace(wrkOutput, "1.20ms", "1.20xs", 1),
	} {
		if _, err := parseWrk(out); err == nil {
			t.Errorf("%s: parsed without an error", name)
		}
	}
}

func TestWrkDuration(t *testing.T) {
	for s, want := range map[string]time.Duration{"812.00us": 812 * time.Microsecond, "1.20ms": 1200 * time.Microsecond, "2.00s": 2 * time.Second, "1.50m": 90 * time.Second, "1.00h": time.Hour} {
		if got, err := wrkDuration(s); err != nil || got != want {
			t.Errorf("wrkDuration(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, s := range []string{"", "ms", "12", "1.2.3ms", "5d"} {
		if _, err := wrkDuration(s); err == nil {
			t.Errorf("wrkDuration(%q) accepted", s)
		}
	}
}
