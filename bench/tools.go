package bench

import "slices"

// Tools returns the commands, besides its own binaries, that the parts
// of a run selected by opt.Only run; Run checks them before it builds
// anything. scripts/deps.sh installs them (its bench group).
func Tools(opt Options) []string {
	want := func(part string) bool { return len(opt.Only) == 0 || slices.Contains(opt.Only, part) }
	tools := []string{"ip"} // every part builds labs
	add := func(t ...string) {
		for _, x := range t {
			if !slices.Contains(tools, x) {
				tools = append(tools, x)
			}
		}
	}
	for _, g := range Gateways {
		if !want(g.name) {
			continue
		}
		add("iperf3", "ss") // bulk measures; ss sees iperf3's listener
		switch g.name {
		case "routing-nft", "routing-bpf-attached", "routing-past-spliced":
			add("nft")
		case "haproxy":
			add("haproxy", "pgrep")
		}
	}
	for _, s := range SOCKSServers {
		if !want(s.name) && !want("socks") {
			continue
		}
		add("ss") // the server's listener
		if s.name == "dante" {
			add("danted")
		}
	}
	if want("memory") {
		add("ss", "cat")
	}
	if want("http") {
		add("nginx", "wrk", "ss")
	}
	for _, p := range selectedHTTPPeers(opt) {
		add("nginx", "wrk", "ss") // the backend; ss sees the peers' listeners
		if p.name == "http-haproxy" {
			add("haproxy")
		}
	}
	return tools
}
