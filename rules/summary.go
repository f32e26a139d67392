package rules

import (
	"fmt"
	"os/exec"
	"sort"
	"strconv"
	"strings"

	"github.com/google/nftables"
)

// A table summary is what drift detection compares when the nft command
// is not installed (a router may have nf_tables without its CLI): the
// table's sets by name, and its chains with their hook, priority and
// number of rules, read through netlink. It sees a table, chain or set
// deleted, a chain's rules flushed or one added or removed; a rule
// edited in place it does not see (the nft listing does).

// haveNFT reports whether the nft command is installed.
func haveNFT() bool {
	_, err := exec.LookPath("nft")
	return err == nil
}

// Summary returns the summary of the table Render(spec) describes.
func Summary(spec Spec) string {
	var lines []string
	chain, rules, head := "", 0, ""
	for _, l := range strings.Split(Render(spec), "\n") {
		t := strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(t, "set ") && strings.HasSuffix(t, " {"):
			lines = append(lines, "set "+strings.TrimSuffix(strings.TrimPrefix(t, "set "), " {"))
		case strings.HasPrefix(t, "chain ") && strings.HasSuffix(t, " {"):
			chain, rules, head = strings.TrimSuffix(strings.TrimPrefix(t, "chain "), " {"), 0, ""
		case chain != "" && strings.HasPrefix(t, "type "):
			// type filter hook prerouting priority raw; policy accept;
			f := strings.Fields(strings.NewReplacer(";", "").Replace(t))
			if len(f) >= 6 {
				head = fmt.Sprintf(" hook %s priority %d", f[3], namedPriority(f[5]))
			}
		case chain != "" && t == "}":
			lines = append(lines, fmt.Sprintf("chain %s%s rules %d", chain, head, rules))
			chain = ""
		case chain != "" && t != "":
			rules++
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

// namedPriority turns nft's priority names into numbers.
func namedPriority(s string) int {
	switch s {
	case "raw":
		return -300
	case "mangle":
		return -150
	case "dstnat":
		return -100
	case "filter":
		return 0
	}
	n, _ := strconv.Atoi(s)
	return n
}

// kernelSummary reads the summary of the installed table through
// netlink; exists is false when the table is gone.
func (m *Manager) kernelSummary() (summary string, exists bool, err error) {
	c, err := m.nft()
	if err != nil {
		return "", false, err
	}
	if ok, err := tableExists(c, m.spec.Table); err != nil || !ok {
		return "", false, err
	}
	t := m.spec.table()
	var lines []string
	sets, err := c.GetSets(t)
	if err != nil {
		return "", false, fmt.Errorf("list the sets of table inet %s: %w", t.Name, err)
	}
	for _, s := range sets {
		lines = append(lines, "set "+s.Name)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return "", false, fmt.Errorf("list the chains of table inet %s: %w", t.Name, err)
	}
	for _, ch := range chains {
		if ch.Table.Name != t.Name {
			continue
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return "", false, fmt.Errorf("list the rules of chain %s: %w", ch.Name, err)
		}
		head := ""
		if ch.Hooknum != nil && ch.Priority != nil {
			hook := map[nftables.ChainHook]string{*nftables.ChainHookPrerouting: "prerouting", *nftables.ChainHookInput: "input",
				*nftables.ChainHookForward: "forward", *nftables.ChainHookOutput: "output", *nftables.ChainHookPostrouting: "postrouting"}[*ch.Hooknum]
			head = fmt.Sprintf(" hook %s priority %d", hook, int32(*ch.Priority))
		}
		lines = append(lines, fmt.Sprintf("chain %s%s rules %d", ch.Name, head, len(rules)))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n", true, nil
}
