package main

import (
	"bufio"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"spliced/testnet"
)

// debFiles are the files of the Debian package (directories left out).
var debFiles = []string{
	"etc/spliced/spliced.yaml",
	"lib/systemd/system/spliced.service",
	"usr/bin/splicectl",
	"usr/bin/spliced",
	"usr/share/bash-completion/completions/splicectl",
	"usr/share/doc/spliced/README.md",
	"usr/share/man/man5/spliced.yaml.5.gz",
	"usr/share/man/man8/splicectl.8.gz",
	"usr/share/man/man8/spliced.8.gz",
}

// TestDebianPackage builds the package with `make deb` and checks it as
// dpkg sees it (files, conffiles, maintainer scripts, a version equal to
// what the binaries print), then installs, removes and purges it with
// dpkg --root in fresh roots, inside a scratch network namespace so that
// the maintainer scripts' kernel cleanup cannot touch the host:
//
//   - without systemd (a chroot, a container): the installed spliced
//     validates the installed configuration, and runs with it intercepting
//     nothing (so starting it on install is safe); remove keeps the edited
//     conffile and removes the kernel state a killed daemon left (prerm:
//     spliced -cleanup); purge removes /etc/spliced and, with the binary
//     gone, the kernel state again with nft and ip; nothing is left.
//   - with systemd (fake systemctl and deb-systemd-* that log their calls):
//     install enables and starts the unit, an upgrade restarts it, remove
//     stops it and removes the kernel state a unit that failed for good
//     left, purge purges the unit's state.
func TestDebianPackage(t *testing.T) {
	testnet.Privileged(t, "make", "dpkg", "dpkg-deb", "dpkg-query", "chroot", "ldd", "nft", "ip")
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dist := t.TempDir()
	if out, err := exec.Command("make", "-C", repo, "deb", "DIST="+dist).CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb wrote %v, want one .deb", debs)
	}
	deb := debs[0]
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	// The package as dpkg sees it.
	ver := strings.TrimSpace(run("dpkg-deb", "--field", deb, "Version"))
	arch := strings.TrimSpace(run("dpkg", "--print-architecture"))
	if want := "spliced_" + ver + "_" + arch + ".deb"; filepath.Base(deb) != want {
		t.Errorf("package file %s, want %s", filepath.Base(deb), want)
	}
	if !regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*$`).MatchString(ver) {
		t.Errorf("version %q is not a Debian upstream version", ver)
	}
	info := run("dpkg-deb", "--info", deb)
	for _, want := range []string{"Package: spliced", "Architecture: " + arch, "Section: net", "conffiles", "postinst", "prerm", "postrm"} {
		if !strings.Contains(info, want) {
			t.Errorf("dpkg-deb --info lacks %q:\n%s", want, info)
		}
	}
	if cf := run("dpkg-deb", "--info", deb, "conffiles"); strings.TrimSpace(cf) != "/etc/spliced/spliced.yaml" {
		t.Errorf("conffiles: %q", cf)
	}
	var files []string
	for _, l := range strings.Split(strings.TrimSpace(run("dpkg-deb", "--contents", deb)), "\n") {
		if f := strings.Fields(l); len(f) == 6 && !strings.HasSuffix(f[5], "/") {
			files = append(files, strings.TrimPrefix(f[5], "./"))
		}
	}
	slices.Sort(files)
	if !slices.Equal(files, debFiles) {
		t.Errorf("package files:\n%s\nwant:\n%s", strings.Join(files, "\n"), strings.Join(debFiles, "\n"))
	}

	t.Run("without systemd", func(t *testing.T) {
		ns := testnet.Scratch(t)
		root, seeded := newRoot(t, "rm", "rmdir", "readlink", "nft", "ip")
		dpkg := func(args ...string) string {
			t.Helper()
			out, err := ns.Run("dpkg", append([]string{"--root", root}, args...)...)
			if err != nil {
				t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			return out
		}
		dpkg("--install", deb)
		for _, f := range debFiles {
			if _, err := os.Stat(filepath.Join(root, f)); err != nil {
				t.Errorf("not installed: %v", err)
			}
		}
		if st := strings.TrimSpace(query(t, root, "${Status} ${Version}")); st != "install ok installed "+ver {
			t.Errorf("dpkg-query: %q", st)
		}
		out, err := ns.Run("chroot", root, "/usr/bin/spliced", "-check", "-config", "/etc/spliced/spliced.yaml")
		if err != nil || !strings.Contains(out, "/etc/spliced/spliced.yaml: valid") || !strings.Contains(out, "table inet spliced") {
			t.Errorf("installed spliced -check: %v\n%s", err, out)
		}
		for _, cmd := range [][]string{{"/usr/bin/spliced", "-version"}, {"/usr/bin/splicectl", "version"}} {
			out, err := ns.Run("chroot", append([]string{root}, cmd...)...)
			name := filepath.Base(cmd[0])
			if first, _, _ := strings.Cut(out, "\n"); err != nil || first != name+" "+ver {
				t.Errorf("%s: %v: %q, want the package's version %q", strings.Join(cmd, " "), err, out, ver)
			}
		}
		startInstalled(t, ns, root)
		unit, _ := os.ReadFile(filepath.Join(root, "lib/systemd/system/spliced.service"))
		if !strings.Contains(string(unit), "ExecStart=/usr/bin/spliced -config /etc/spliced/spliced.yaml") || strings.Contains(string(unit), "@") {
			t.Errorf("unit:\n%s", unit)
		}

		// remove: the operator's configuration stays; the kernel state of
		// a daemon killed with kill -9 goes (prerm runs spliced -cleanup).
		conf := filepath.Join(root, "etc/spliced/spliced.yaml")
		edited := append(must(os.ReadFile(conf)), "# edited\n"...)
		os.WriteFile(conf, edited, 0o640)
		leaveKernelState(t, ns)
		dpkg("--remove", "spliced")
		if b, err := os.ReadFile(conf); err != nil || string(b) != string(edited) {
			t.Errorf("remove did not keep the edited configuration: %v", err)
		}
		if _, err := os.Stat(filepath.Join(root, "usr/bin/spliced")); err == nil {
			t.Error("remove left /usr/bin/spliced")
		}
		checkNoKernelState(t, ns, "after remove")

		// purge: the configuration goes, and kernel state again (the
		// binary is gone: postrm uses nft and ip), the pins of both
		// datapaths included (here plain files: the scripts run in the
		// root, which has no bpffs).
		leaveKernelState(t, ns)
		for _, dir := range []string{"sys/fs/bpf/spliced/spliced", "sys/fs/bpf/spliced-nfqueue/spliced"} {
			os.MkdirAll(filepath.Join(root, dir), 0o700)
			os.WriteFile(filepath.Join(root, dir, "splice_flows"), nil, 0o600)
		}
		dpkg("--purge", "spliced")
		checkNoKernelState(t, ns, "after purge")
		if st := query(t, root, "${Status}"); st != "" {
			t.Errorf("after purge, dpkg-query: %q", st)
		}
		var left []string
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			rel, _ := filepath.Rel(root, p)
			if err == nil && !d.IsDir() && !seeded[rel] && !strings.HasPrefix(rel, "var/lib/dpkg/") {
				left = append(left, rel)
			}
			if err == nil && d.IsDir() && (rel == "etc/spliced" || strings.Contains(rel, "spliced")) {
				left = append(left, rel+"/")
			}
			return nil
		})
		if len(left) > 0 {
			t.Errorf("purge left: %v", left)
		}
	})

	t.Run("with systemd", func(t *testing.T) {
		ns := testnet.Scratch(t)
		root, _ := newRoot(t, "rm", "rmdir", "readlink")
		os.MkdirAll(filepath.Join(root, "run/systemd/system"), 0o755)
		// The tools debhelper's snippets call, logging their arguments.
		fake := "#!/bin/sh\necho \"${0##*/} $*\" >> /calls\nexit 0\n"
		for _, tool := range []string{"systemctl", "deb-systemd-helper", "deb-systemd-invoke"} {
			os.WriteFile(filepath.Join(root, "usr/bin", tool), []byte(fake), 0o755)
		}
		dpkg := func(args ...string) []string {
			t.Helper()
			os.Remove(filepath.Join(root, "calls"))
			if out, err := ns.Run("dpkg", append([]string{"--root", root}, args...)...); err != nil {
				t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			b, _ := os.ReadFile(filepath.Join(root, "calls"))
			return strings.Split(strings.TrimSpace(string(b)), "\n")
		}
		for _, step := range []struct {
			args []string
			want []string
		}{
			{[]string{"--install", deb}, []string{"deb-systemd-helper unmask spliced.service", "deb-systemd-helper --quiet was-enabled spliced.service",
				"deb-systemd-helper enable spliced.service", "systemctl --system daemon-reload", "deb-systemd-invoke start spliced.service"}},
			{[]string{"--install", deb}, []string{"deb-systemd-invoke restart spliced.service"}}, // an upgrade (or reinstall)
			// The stop does nothing here, as for a unit that failed for
			// good (its restarts hit the start limit) after a crash left
			// kernel state: prerm removes it (spliced -cleanup).
			{[]string{"--remove", "spliced"}, []string{"deb-systemd-invoke stop spliced.service", "systemctl --system daemon-reload", "deb-systemd-helper mask spliced.service"}},
			{[]string{"--purge", "spliced"}, []string{"deb-systemd-helper purge spliced.service", "deb-systemd-helper unmask spliced.service"}},
		} {
			if step.args[0] == "--remove" {
				leaveKernelState(t, ns)
			}
			calls := dpkg(step.args...)
			if step.args[0] == "--remove" {
				checkNoKernelState(t, ns, "after remove with a failed unit")
			}
			for _, w := range step.want {
				if !slices.Contains(calls, w) {
					t.Errorf("dpkg %s: no call %q; calls:\n%s", step.args[0], w, strings.Join(calls, "\n"))
				}
			}
			if step.args[0] == "--install" && slices.Contains(calls, "deb-systemd-invoke stop spliced.service") {
				t.Errorf("dpkg %s stopped the service: %v", step.args[0], calls)
			}
		}
	})
}

// newRoot makes a root for dpkg --root: an empty dpkg database, /dev/null,
// and /bin/sh and the given tools (at their paths on this machine) with
// their libraries, for the maintainer scripts, which dpkg runs chrooted.
// It returns the root and the files put there.
func newRoot(t *testing.T, tools ...string) (string, map[string]bool) {
	t.Helper()
	root := t.TempDir()
	seeded := map[string]bool{}
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "dev", "etc", "usr/bin", "usr/sbin", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "var/lib/dpkg/status"), nil, 0o644)
	if err := unix.Mknod(filepath.Join(root, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	seeded["dev/null"] = true
	copyFile := func(src string) {
		dst := filepath.Join(root, src)
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Dir(dst), 0o755)
		if err := os.WriteFile(dst, b, 0o755); err != nil {
			t.Fatal(err)
		}
		seeded[strings.TrimPrefix(src, "/")] = true
	}
	paths := []string{"/bin/sh"}
	for _, tool := range tools {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("%s is not installed", tool)
		}
		paths = append(paths, p)
	}
	for _, p := range paths {
		copyFile(p)
		out, err := exec.Command("ldd", p).Output()
		if err != nil {
			continue // static
		}
		for _, lib := range regexp.MustCompile(`(?m)(/\S+) \(0x`).FindAllStringSubmatch(string(out), -1) {
			if !seeded[strings.TrimPrefix(lib[1], "/")] {
				copyFile(lib[1])
			}
		}
	}
	return root, seeded
}

// startInstalled shows that starting the service on install is safe: the
// installed spliced with the installed configuration starts, intercepts
// nothing (its table's services chain is empty), and SIGTERM removes
// its kernel state.
func startInstalled(t *testing.T, ns *testnet.NS, root string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := ns.Command(ctx, "chroot", root, "/usr/bin/spliced", "-config", "/etc/spliced/spliced.yaml", "-socket", "off", "-log-format", "json")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var log []string
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		log = append(log, sc.Text())
		if strings.Contains(sc.Text(), `"msg":"ready"`) {
			break
		}
	}
	table := ns.MustRun("nft", "list", "table", "inet", "spliced")
	if !regexp.MustCompile(`chain services \{\s*\}`).MatchString(table) || strings.Contains(table, "tproxy") {
		t.Errorf("the default configuration intercepts something:\n%s", table)
	}
	cmd.Process.Signal(unix.SIGTERM)
	for sc.Scan() {
		log = append(log, sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("installed spliced: %v\n%s", err, strings.Join(log, "\n"))
	}
	checkNoKernelState(t, ns, "after spliced stopped")
}

// query is dpkg-query -W for spliced in root; empty when unknown.
func query(t *testing.T, root, format string) string {
	out, _ := exec.Command("dpkg-query", "--admindir", filepath.Join(root, "var/lib/dpkg"), "-W", "-f", format, "spliced").Output()
	return string(out)
}

// leaveKernelState installs what a spliced with the default configuration
// leaves in the kernel when it is killed: its table, ip rules and routes.
func leaveKernelState(t *testing.T, ns *testnet.NS) {
	t.Helper()
	ns.MustRun("nft", "add", "table", "inet", "spliced")
	for _, family := range []string{"-4", "-6"} {
		ns.MustRun("ip", family, "rule", "add", "fwmark", "0x5c1/0x5c1", "lookup", "100", "priority", "100", "protocol", "92")
		ns.MustRun("ip", family, "route", "add", "local", "default", "dev", "lo", "table", "100", "proto", "92")
	}
	checkKernelState(t, ns, true, "before")
}

func checkNoKernelState(t *testing.T, ns *testnet.NS, when string) {
	t.Helper()
	checkKernelState(t, ns, false, when)
}

func checkKernelState(t *testing.T, ns *testnet.NS, want bool, when string) {
	t.Helper()
	tables := ns.MustRun("nft", "list", "tables")
	if strings.Contains(tables, "inet spliced") != want {
		t.Errorf("%s: nft list tables: %q", when, tables)
	}
	for _, family := range []string{"-4", "-6"} {
		rules := ns.MustRun("ip", family, "rule", "list")
		if strings.Contains(rules, "fwmark 0x5c1/0x5c1") != want {
			t.Errorf("%s: ip %s rule list:\n%s", when, family, rules)
		}
		routes, _ := ns.Run("ip", family, "route", "list", "table", "100")
		if strings.Contains(routes, "local default") != want {
			t.Errorf("%s: ip %s route list table 100:\n%s", when, family, routes)
		}
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
