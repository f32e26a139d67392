#!/usr/bin/env bash
# deps.sh: the commands that the demo, the tests, the benchmark and
# `make check` run, and the Debian packages that provide them. `make demo`,
# `make test`, `make bench` and .ci/run call it first.
#
#   scripts/deps.sh [--check] GROUP...    GROUP: demo, test, bench, check, generate, all
#   scripts/deps.sh --list                every entry: tool package groups
#
# Nothing missing: it says so in one line and exits 0. Something missing:
# - as root on Debian or Ubuntu (apt-get and /etc/debian_version), it
#   prints the packages, runs apt-get update and installs them (servers
#   they bring are kept from starting on the host by a policy-rc.d), then
#   checks again;
# - otherwise (not root, no apt-get, or --check) it names each missing
#   tool with its Debian package and exits 1 without changing anything.
#
# Checking uses bash builtins only (and python3 to import scapy, nc -h
# to tell OpenBSD's netcat from other variants), so it works with any
# PATH; tools are looked up in PATH as the tests and the benchmark look
# them up.
set -uo pipefail

# tool       Debian package    groups          what uses it
deps=(
  "ip        iproute2          demo test bench" # namespaces, veths, ip netns exec
  "ss        iproute2          test bench"      # listening sockets, no socket after a splice
  "nft       nftables          test bench"      # ruleset listings, impairment rules
  "conntrack conntrack         test"            # conntrack flushes under load
  "ethtool   ethtool           test"            # offload settings on the veths
  "pgrep     procps            test bench"      # processes of a configuration
  "killall   psmisc            test"
  "iperf3    iperf3            test bench"      # bulk transfers
  "curl      curl              test"            # HTTP and FTP clients
  "wrk       wrk               test bench"      # HTTP load
  "haproxy   haproxy           test bench"      # the benchmark's reference proxy
  "danted    dante-server      bench"           # the benchmark's reference SOCKS5 server
  "nginx     nginx-light       test bench"      # HTTP backends
  "vsftpd    vsftpd            test"            # FTP server
  "lftp      lftp              test"            # FTP client
  "tshark    tshark            test"            # packet captures
  "hping3    hping3            test"            # crafted and flooding TCP
  "scapy     python3-scapy     test"            # forged segments (a python3 module)
  "sshd      openssh-server    test"            # TestLabSOCKSSSH's server
  "ssh       openssh-client    test"            # TestLabSOCKSSSH: ssh and scp through SOCKS5
  "scp       openssh-client    test"
  "ssh-keygen openssh-client   test"            # the test's throwaway keys
  "nc        netcat-openbsd    test"            # ssh's ProxyCommand (nc -X 5 -x); must be OpenBSD's
  "make      make              test check generate"
  "dpkg      dpkg              test"            # TestDebianPackage: dpkg --root, dpkg-deb
  "git       git               check"           # git ls-files in make check
  "ca-certs  ca-certificates   demo test bench check generate" # Go module downloads over HTTPS
  "clang     clang             generate"        # make generate: the BPF program of splice/bpf
  "llvm-strip llvm             generate"        # bpf2go strips DWARF from the object
  "libbpf    libbpf-dev        generate"        # bpf/bpf_helpers.h
)
groups=(demo test bench check generate all)
ca_file=/etc/ssl/certs/ca-certificates.crt

usage() {
  local IFS='|'
  echo "usage: scripts/deps.sh [--check] {${groups[*]}}... | --list" >&2
  exit 2
}

# have TOOL: whether TOOL is usable.
have() {
  case $1 in
  scapy)
    local py
    for py in python3 /usr/bin/python3; do
      if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import scapy' >/dev/null 2>&1; then
        return 0
      fi
    done
    return 1
    ;;
  ca-certs) [[ -s $ca_file ]] ;;
  libbpf) [[ -r /usr/include/bpf/bpf_helpers.h ]] ;;
  nc)
    # Only OpenBSD's netcat has -X 5 -x (SOCKS5); netcat-traditional,
    # ncat or busybox may own the name nc instead.
    command -v nc >/dev/null 2>&1 || return 1
    local help
    help=$(nc -h 2>&1 </dev/null)
    [[ $help == *OpenBSD* ]]
    ;;
  *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

check_only=false
want=()
for arg in "$@"; do
  case $arg in
  --check) check_only=true ;;
  --list)
    for entry in "${deps[@]}"; do
      read -r tool pkg needed <<<"${entry%%#*}"
      echo "$tool $pkg $needed"
    done
    exit 0
    ;;
  -*) usage ;;
  *)
    [[ " ${groups[*]} " == *" $arg "* ]] || { echo "deps: unknown group $arg" >&2; usage; }
    want+=("$arg")
    ;;
  esac
done
[[ ${#want[@]} -gt 0 ]] || usage

# missing: the entries of the wanted groups that are not there, and
# their packages (each once).
missing=() pkgs=()
find_missing() {
  missing=() pkgs=()
  local entry tool pkg needed g
  for entry in "${deps[@]}"; do
    read -r tool pkg needed <<<"${entry%%#*}"
    for g in "${want[@]}"; do
      if [[ $g == all || " $needed " == *" $g "* ]]; then
        if ! have "$tool"; then
          if [[ $tool == nc ]] && command -v nc >/dev/null 2>&1; then
            missing+=("$tool ($pkg; the nc in PATH, $(command -v nc), is not OpenBSD's: with netcat-openbsd installed, update-alternatives --set nc /bin/nc.openbsd)")
          else
            missing+=("$tool ($pkg)")
          fi
          [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
        fi
        break
      fi
    done
  done
}

find_missing
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "deps: ${want[*]}: every tool is installed"
  exit 0
fi

report() {
  local m
  echo "deps: ${want[*]}: not installed (tool, Debian package):" >&2
  for m in "${missing[@]}"; do echo "  $m" >&2; done
}

debian=false
if command -v apt-get >/dev/null 2>&1 && [[ -r /etc/debian_version ]]; then
  debian=true
fi

if $check_only || ! $debian || [[ $EUID -ne 0 ]]; then
  report
  if $check_only; then
    echo "deps: check only; as root on Debian or Ubuntu, scripts/deps.sh ${want[*]} installs them" >&2
  elif ! $debian; then
    echo "deps: this is not a Debian or Ubuntu system (no apt-get or /etc/debian_version): install them with your package manager; nothing was run" >&2
  else
    echo "deps: installing needs root: run the make command with sudo, or: sudo apt-get install ${pkgs[*]}" >&2
  fi
  exit 1
fi

echo "deps: installing Debian packages: ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
# Installed servers (nginx, haproxy, vsftpd, danted) must not start on the host:
# tests start their own inside lab namespaces. A policy-rc.d that exits
# 101 forbids it; one already there is put back afterwards.
rcd=/usr/sbin/policy-rc.d
if [[ -e $rcd ]]; then
  mv "$rcd" "$rcd.spliced-deps" || exit 1
  trap 'mv -f "$rcd.spliced-deps" "$rcd"' EXIT
else
  trap 'rm -f "$rcd"' EXIT
fi
printf '#!/bin/sh\nexit 101\n' >"$rcd" && chmod +x "$rcd" || exit 1
log=$(mktemp) || exit 1
if ! apt-get update -qq >"$log" 2>&1 ||
  ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  echo "deps: apt-get failed (above)" >&2
  exit 1
fi
rm -f "$log"
installed=("${pkgs[@]}")
hash -r
installed=("${pkgs[@]}")
find_missing
if [[ ${#missing[@]} -gt 0 ]]; then
  report
  echo "deps: still missing after apt-get install; is /usr/sbin in PATH ($PATH)?" >&2
  exit 1
fi
echo "deps: ${want[*]}: installed ${installed[*]}; every tool is installed"
