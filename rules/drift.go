package rules

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"time"
)

// KernelListing returns `nft list table inet NAME` as the kernel has it
// now, with the elements of the divert sets left out (they come and go
// with spliced flows; Render never has them). It needs the nft command.
// exists is false when the table is gone.
//
// nft fetches the elements of every set of a table it lists, even when
// told to print none (-t): with 9,900 spliced flows (40,000 divert
// elements) `nft list table` took 1.7-1.8 s and printed 2.6 MB, every
// 10 s (the drift check), and the daemon spent about a tenth of a CPU
// reading it; `nft -t list table` took 0.4 s. So the table comes from
// `nft -t list ruleset inet` (0.02 s), which fetches no elements, and the
// elements of the sets other than the divert sets (the services' ports
// and addresses) from `nft list set` of each (0.02 s).
func (m *Manager) KernelListing(ctx context.Context) (listing string, exists bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := runNFT(ctx, "-t", "list", "ruleset", "inet")
	if err != nil {
		return "", false, err
	}
	table, ok := blockOf(out, "", "table inet "+m.spec.Table)
	if !ok {
		return "", false, nil
	}
	for _, name := range setNames(table) {
		if strings.HasPrefix(name, "divert4_") || strings.HasPrefix(name, "divert6_") {
			continue
		}
		out, err := runNFT(ctx, "list", "set", "inet", m.spec.Table, name)
		if err != nil {
			if strings.Contains(err.Error(), "No such file or directory") {
				return "", false, nil // the table went meanwhile
			}
			return "", false, err
		}
		set, ok := blockOf(out, "\t", "set "+name)
		if !ok {
			return "", false, fmt.Errorf("nft list set inet %s %s: no such set in %q", m.spec.Table, name, out)
		}
		terse, _ := blockOf(table, "\t", "set "+name)
		table = strings.Replace(table, terse, set, 1)
	}
	return canonicalQueues(canonicalElements(unwrapElements(StripRuntime(table)))), true, nil
}

// canonicalElements rewrites the IPv6 addresses of every (unwrapped)
// "elements = { ... }" line of an nft listing in Render's form (nftAddr).
// nft writes them with the C library's inet_ntop, whose forms differ:
// glibc's writes an IPv4-compatible address as ::10.1.0.0, musl's (the
// C library of OpenWrt and Alpine) as ::a01:0, and musl shortens a run
// of zeros at the start of an address less eagerly (0:0:0:1::1 where
// glibc writes ::1:0:0:0:1). Render can match only one of them; without
// this, on the other a service with such a prefix differed from its
// expected listing for good, and every drift check reinstalled the table.
func canonicalElements(listing string) string {
	lines := strings.Split(listing, "\n")
	for i, line := range lines {
		head, rest, ok := strings.Cut(line, "elements = { ")
		if !ok || strings.TrimSpace(head) != "" || !strings.HasSuffix(rest, " }") {
			continue
		}
		elems := strings.Split(strings.TrimSuffix(rest, " }"), ", ")
		for j, e := range elems {
			elems[j] = canonicalElement(e)
		}
		lines[i] = head + "elements = { " + strings.Join(elems, ", ") + " }"
	}
	return strings.Join(lines, "\n")
}

// canonicalElement is a set element (an address, a prefix, a range of
// either, a port or a range of ports) with its IPv6 addresses in
// Render's form; anything else is left as it is.
func canonicalElement(e string) string {
	if from, to, ok := strings.Cut(e, "-"); ok {
		a, b := canonicalElement(from), canonicalElement(to)
		return a + "-" + b
	}
	addr, bits, prefix := strings.Cut(e, "/")
	a, err := netip.ParseAddr(addr)
	if err != nil || !a.Is6() || a.Zone() != "" {
		return e
	}
	if prefix {
		return nftAddr(a) + "/" + bits
	}
	return nftAddr(a)
}

// unwrapElements joins the lines of every "elements = { ... }" block of
// an nft listing into one, as Render writes it. nft wraps a long set's
// elements (",\n\t\t\t     " between them): without this a service
// with a few more prefixes or ports than fit on a line differed from
// its expected listing for good, and every drift check reinstalled the
// table.
func unwrapElements(listing string) string {
	lines := strings.Split(listing, "\n")
	out := lines[:0]
	open := false // inside an elements block that did not end on its line
	for _, line := range lines {
		t := strings.TrimSpace(line)
		if open {
			out[len(out)-1] += " " + t
			open = !strings.HasSuffix(t, "}")
			continue
		}
		open = strings.HasPrefix(t, "elements = {") && !strings.HasSuffix(t, "}")
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// runNFT runs the nft command with args and returns what it printed.
func runNFT(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "nft", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if _, lerr := exec.LookPath("nft"); lerr != nil {
			return "", fmt.Errorf("list the table: the nft command is not installed (apt-get install nftables)")
		}
		return "", fmt.Errorf("nft %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// blockOf cuts a block out of an nft listing: from the line indent+head+
// " {" (nft may add "# progname ..." after the brace of a table) to the
// line indent+"}" that closes it, both included, each line ended by a
// newline.
func blockOf(listing, indent, head string) (string, bool) {
	lines := strings.Split(listing, "\n")
	open := indent + head + " {"
	for i, l := range lines {
		if l != open && !strings.HasPrefix(l, open+" #") {
			continue
		}
		for j := i + 1; j < len(lines); j++ {
			if lines[j] == indent+"}" {
				return strings.Join(lines[i:j+1], "\n") + "\n", true
			}
		}
		return "", false
	}
	return "", false
}

// setNames lists the sets of a table's listing.
func setNames(table string) []string {
	var names []string
	for _, l := range strings.Split(table, "\n") {
		if name, ok := strings.CutPrefix(l, "\tset "); ok {
			if name, ok := strings.CutSuffix(name, " {"); ok {
				names = append(names, name)
			}
		}
	}
	return names
}

// nftQueueTo is the queue statement as nft 1.0.1 and later list it
// ("queue to 100", "queue flags bypass to 100"); Render writes the form
// older versions list and every version reads ("queue num 100 bypass").
var nftQueueTo = regexp.MustCompile(`queue (?:flags bypass )?to ([0-9]+)`)

// canonicalQueues rewrites the queue statements of an nft listing in
// Render's form. Without it, on a kernel with the nft queue expression
// (Debian's has it; the lab machines use the xtables target) every
// comparison would find the divert rules changed, and the drift repair
// would reinstall the table for good.
func canonicalQueues(listing string) string {
	return nftQueueTo.ReplaceAllStringFunc(listing, func(m string) string {
		num := nftQueueTo.FindStringSubmatch(m)[1]
		if strings.Contains(m, "bypass") {
			return "queue num " + num + " bypass"
		}
		return "queue num " + num
	})
}

// StripRuntime removes from an nft listing of our table what comes and
// goes with the daemon rather than with its configuration: the
// "elements = { ... }" block of every divert set (spliced flows), and the
// marks of a table its daemon owns (see owner): the owner's program name
// after the table's brace, and its flags line ("flags owner" or "flags
// owner,persist", as the nft version knows them) with the empty line
// after it.
func StripRuntime(listing string) string {
	var out []string
	inDivert, inElements, afterFlags := false, false, false
	for i, line := range strings.Split(listing, "\n") {
		t := strings.TrimSpace(line)
		if afterFlags {
			afterFlags = false
			if t == "" {
				continue
			}
		}
		switch {
		case i == 0 && strings.HasPrefix(line, "table ") && strings.Contains(line, "{ # progname "):
			line = line[:strings.Index(line, " # progname ")]
		case i == 1 && ownerFlags.MatchString(line):
			afterFlags = true
			continue
		case inElements:
			if strings.HasSuffix(t, "}") {
				inElements = false
			}
			continue
		case strings.HasPrefix(t, "set divert4_") || strings.HasPrefix(t, "set divert6_"):
			inDivert = true
		case inDivert && t == "}":
			inDivert = false
		case inDivert && strings.HasPrefix(t, "elements = {"):
			inElements = !strings.HasSuffix(t, "}")
			continue
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// ownerFlags is the flags line of a table owned by its daemon. An
// orphaned table's ("flags persist", or a bare "flags " from an nft that
// does not know the flag) stays: that is drift, which the repair ends by
// adopting the table.
var ownerFlags = regexp.MustCompile(`^\tflags owner(?:,persist)?$`)

// Drift compares the kernel's table with the expected one and returns a
// unified diff (empty when they agree).
//
// Without the nft command it compares summaries read through netlink
// instead (see Summary): kernel is then the kernel's summary.
func (m *Manager) Drift(ctx context.Context) (kernel, diff string, err error) {
	if !haveNFT() {
		kernel, exists, err := m.kernelSummary()
		if err != nil {
			return "", "", err
		}
		if !exists {
			return "", fmt.Sprintf("table inet %s is gone\n", m.spec.Table), nil
		}
		return kernel, UnifiedDiff("expected (summary: nft is not installed)", "kernel", Summary(m.Spec()), kernel), nil
	}
	kernel, exists, err := m.KernelListing(ctx)
	if err != nil {
		return "", "", err
	}
	want := Listing(m.Spec())
	if !exists {
		return "", fmt.Sprintf("table inet %s is gone\n", m.spec.Table), nil
	}
	return kernel, UnifiedDiff("expected", "kernel", want, kernel), nil
}

// UnifiedDiff returns a line diff of a and b in unified form (whole-file
// context), or "" when they are equal.
func UnifiedDiff(nameA, nameB, a, b string) string {
	if a == b {
		return ""
	}
	x, y := strings.Split(a, "\n"), strings.Split(b, "\n")
	// Longest common subsequence, by dynamic programming: tables are
	// small.
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var b2 strings.Builder
	fmt.Fprintf(&b2, "--- %s\n+++ %s\n", nameA, nameB)
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			fmt.Fprintf(&b2, " %s\n", x[i])
			i, j = i+1, j+1
		case j < len(y) && (i == len(x) || lcs[i][j+1] >= lcs[i+1][j]):
			fmt.Fprintf(&b2, "+%s\n", y[j])
			j++
		default:
			fmt.Fprintf(&b2, "-%s\n", x[i])
			i++
		}
	}
	return b2.String()
}
