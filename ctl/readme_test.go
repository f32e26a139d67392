package ctl

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"spliced/api"
)

// readmeSample returns the lines the README shows after the command
// line `$ cmd`, up to the next command line or the block's end.
func readmeSample(t *testing.T, cmd string) string {
	t.Helper()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(readme), "\n$ "+cmd+"\n")
	if !ok {
		t.Fatalf("the README has no sample of %q", cmd)
	}
	var out strings.Builder
	for _, line := range strings.SplitAfter(after, "\n") {
		if strings.HasPrefix(line, "$ ") || strings.HasPrefix(line, "```") {
			break
		}
		out.WriteString(line)
	}
	return out.String()
}

// TestStatusAsREADMEShows: the README's sample of `splicectl status` is
// what splicectl prints for a daemon with those counters. It had lost
// the line of reloads and repairs, the empty line before the table and
// the queue table's columns, and showed bytes and latencies in forms
// splicectl does not print.
func TestStatusAsREADMEShows(t *testing.T) {
	const gib = 1 << 30
	st := api.Status{
		Version:    "0.0~git20261126.81694e9",
		Started:    time.Date(2026, 11, 26, 8, 40, 1, 0, time.UTC),
		UptimeSec:  (2*time.Hour + 14*time.Minute + 9*time.Second).Seconds(),
		ConfigFile: "/etc/spliced/spliced.yaml",
		Table:      "inet spliced",
		Services:   []string{"web", "ftp"},
		Flows:      map[string]int{api.StateProxied: 12, api.StateSplicing: 0, api.StateSpliced: 240, api.StateClosing: 3},
		Reloads:    1,
		Engines: []api.Engine{
			{Name: "proxy", BytesC2S: 12 * gib / 10, BytesS2C: 84 * gib / 10},
			{Name: "splice", BytesC2S: 31 * gib, BytesS2C: 2105 * gib / 10, PacketsC2S: 9876543, PacketsS2C: 23456789,
				Splices: 1834, SpliceAborts: 2, SpliceP50Us: 290, SpliceP99Us: 1210,
				QueueBackend: "lean", Datapath: "nfqueue",
				Verdicts: map[string]uint64{"forward": 33333330, "drop_seq": 2},
				Queues: []api.Queue{
					{Number: 100, Received: 16683021, Modified: 16683020, Accepted: 0, Dropped: 1},
					{Number: 101, Received: 16650311, Modified: 16650310, Dropped: 1},
				},
				DivertByCommand: 1834,
				Phases: []api.Phase{
					{Transition: "splice", Name: "divert", Count: 1834, P50Us: 21, P99Us: 64},
					{Transition: "splice", Name: "drain", Count: 1834, P50Us: 180, P99Us: 950},
					{Transition: "splice", Name: "barrier", Count: 1834, P50Us: 12, P99Us: 40},
					{Transition: "splice", Name: "capture", Count: 1834, P50Us: 35, P99Us: 90},
					{Transition: "splice", Name: "install", Count: 1834, P50Us: 8, P99Us: 25},
					{Transition: "splice", Name: "release", Count: 1834, P50Us: 20, P99Us: 70},
					{Transition: "splice", Name: "record", Count: 1834, P50Us: 3, P99Us: 11},
				},
			},
		},
	}
	sock := serveEvents(t, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(st)
	})
	var out, errs bytes.Buffer
	if code := Run([]string{"-s", sock, "status"}, &out, &errs); code != 0 {
		t.Fatalf("exit %d: %s", code, errs.String())
	}
	if want := readmeSample(t, "sudo splicectl status"); out.String() != want {
		t.Errorf("splicectl status prints\n%s\nthe README shows\n%s", out.String(), want)
	}
}

// TestCommandsDocumented: the README's splicectl section names every
// command and flag of splicectl's usage (from which splicectl(8) is
// made), so that a stranger reading the README finds them too.
func TestCommandsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n## splicectl\n")
	section, _, _ = strings.Cut(section, "\n## ")
	_, commands, _ := strings.Cut(Usage(), "\ncommands:\n")
	commands, flags, _ := strings.Cut(commands, "\nflags")
	var want []*regexp.Regexp // a command as `splicectl CMD` or `CMD`, a flag as -x
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z]+)|\(also: ([a-z]+)\)`).FindAllStringSubmatch(commands, -1) {
		want = append(want, regexp.MustCompile("splicectl "+m[1]+m[2]+"\\b|`"+m[1]+m[2]+"`"))
	}
	for _, m := range regexp.MustCompile(` (-[a-z]+)\b`).FindAllStringSubmatch(commands+flags, -1) {
		want = append(want, regexp.MustCompile("[ `]"+m[1]+"\\b"))
	}
	if len(want) < 16 {
		t.Fatalf("read only %v from the usage", want)
	}
	for _, re := range want {
		if !re.MatchString(section) {
			t.Errorf("the README's splicectl section has nothing like %s", re)
		}
	}
}
