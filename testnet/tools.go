package testnet

import (
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
)

// debianPackages names the Debian package of each external command that
// labs, lab tests, the demo and the benchmark run. scripts/deps.sh, which
// `make test`, `make bench` and CI run to install them, has the same
// pairs (TestToolPackagesMatchDepsScript).
var debianPackages = map[string]string{
	"ip":         "iproute2",
	"ss":         "iproute2",
	"nft":        "nftables",
	"conntrack":  "conntrack",
	"ethtool":    "ethtool",
	"pgrep":      "procps",
	"killall":    "psmisc",
	"iperf3":     "iperf3",
	"curl":       "curl",
	"wrk":        "wrk",
	"haproxy":    "haproxy",
	"nginx":      "nginx-light",
	"vsftpd":     "vsftpd",
	"lftp":       "lftp",
	"tshark":     "tshark",
	"hping3":     "hping3",
	"sshd":       "openssh-server",
	"ssh":        "openssh-client",
	"scp":        "openssh-client",
	"ssh-keygen": "openssh-client",
	"nc":         "netcat-openbsd",
	"make":       "make",
	"dpkg":       "dpkg",
	"git":        "git",
	"danted":     "dante-server",
	// make generate (the BPF program of splice/bpf)
	"clang":      "clang",
	"llvm-strip": "llvm",
}

// variants checks commands whose name other packages also provide: it
// returns "" when the command in PATH is the one the tests need, else
// what is wrong with it.
var variants = map[string]func(path string) string{
	// Only OpenBSD's netcat speaks SOCKS5 (-X 5 -x); netcat-traditional,
	// ncat or busybox may own the name nc instead.
	"nc": func(path string) string {
		out, _ := exec.Command(path, "-h").CombinedOutput()
		if strings.Contains(string(out), "OpenBSD") {
			return ""
		}
		return path + " is not OpenBSD's netcat (with netcat-openbsd installed: update-alternatives --set nc /bin/nc.openbsd)"
	},
}

// DebianPackage returns the Debian package that provides the command
// tool, or "" when this package does not know it.
func DebianPackage(tool string) string { return debianPackages[tool] }

// CheckTools returns an error naming every command of tools that is not
// in PATH and the Debian packages that provide them, or nil when all are
// there. A command that other packages also provide (nc) must be the
// variant the tests use. Call it before building anything that needs
// them.
func CheckTools(tools ...string) error {
	var missing, pkgs []string
	for _, tool := range tools {
		pkg := DebianPackage(tool)
		if path, err := exec.LookPath(tool); err == nil {
			check := variants[tool]
			if check == nil {
				continue
			}
			wrong := check(path)
			if wrong == "" {
				continue
			}
			missing = append(missing, fmt.Sprintf("%s (Debian package %s; %s)", tool, pkg, wrong))
			continue
		}
		if pkg == "" {
			missing = append(missing, tool)
			continue
		}
		missing = append(missing, fmt.Sprintf("%s (Debian package %s)", tool, pkg))
		if !slices.Contains(pkgs, pkg) {
			pkgs = append(pkgs, pkg)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	msg := "not installed: " + strings.Join(missing, ", ")
	if len(pkgs) > 0 {
		msg += "; install with `apt-get install " + strings.Join(pkgs, " ") +
			"` (or, as root, `scripts/deps.sh all` installs every tool the tests and the benchmark use)"
	}
	return errors.New(msg)
}
