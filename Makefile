# spliced: see README.md. Lab targets (test, demo, bench) need root.
SHELL := /bin/bash

GO       ?= go
# sudo resets PATH to its secure_path, which lacks the Go of the official
# tarball: add /usr/local/go/bin when go is not found (the tests run go too).
ifeq ($(shell command -v $(GO)),)
export PATH := $(PATH):/usr/local/go/bin
endif
# Checks the tools a target runs and, as root on Debian or Ubuntu,
# installs the missing packages (see the script).
DEPS     := $(SHELL) scripts/deps.sh
PREFIX   ?= /usr/local
DESTDIR  ?=
SYSCONFDIR ?= /etc
BIN      := bin
CMDS     := spliced splicectl spliced-demo spliced-bench
TESTFLAGS ?=

.PHONY: all build test test-race check fuzz demo bench bench-quick install clean deps-demo deps-test deps-bench deb-prebuild \
	generate generate-check deps-generate

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

# Every package's tests, lab tests included (as root), after installing
# the tools they use. The summary fails the run when a test fails, or when
# one skipped although we are root.
test: deps-test deb-prebuild
	set -o pipefail; $(GO) test -count=1 -timeout 14m -json $(TESTFLAGS) ./... | $(GO) run ./internal/testsummary

# What TestDebianPackage's `make deb` compiles: nfpm, and the binaries
# built with -trimpath. On a fresh machine that is two minutes of
# compiling (measured: 70 s and 49 s), done here so that it does not
# count against the test timeout of cmd/spliced, whose lab tests need
# the time (cmd/spliced took 821 s of its 840 on a fresh machine).
deb-prebuild:
	$(GO) tool -n nfpm >/dev/null
	env CGO_ENABLED=0 GOOS=linux $(GOARCH_$(ARCH)) $(GO) build -trimpath -o /dev/null ./cmd/spliced ./cmd/splicectl

# The same under the race detector; the daemons the lab tests start are
# built with -race too (testnet.Binary, SPLICED_RACE) and a race they
# report fails the test. PKGS narrows it: make test-race PKGS=./gateway
PKGS ?= ./...
test-race: deps-test
	set -o pipefail; SPLICED_RACE=1 $(GO) test -race -count=1 -timeout 40m -json $(TESTFLAGS) $(PKGS) | $(GO) run ./internal/testsummary

check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt: not formatted:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Every fuzz target for FUZZTIME each, one package and target at a time
# (several packages have a FuzzParse, and go test fuzzes one target per
# run). A failure leaves its input under the package's testdata/fuzz:
# commit it with the fix, so that plain `go test` replays it.
# A count, not a duration: with a duration Go's fuzzing coordinator
# sometimes fails at the deadline with "context deadline exceeded" and no
# input (seen twice in CI on 2026-12-02); 20000 inputs take 1-10 s a target.
FUZZTIME ?= 20000x
fuzz:
	@set -e; for f in $$(git ls-files '*_test.go' | xargs grep -l '^func Fuzz'); do \
		pkg=./$$(dirname $$f); \
		for name in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$f); do \
			echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

deps-demo deps-test deps-bench deps-generate:
	@$(DEPS) $(patsubst deps-%,%,$@)

# The BPF program of splice/bpf, compiled by bpf2go with Debian's clang
# and libbpf-dev into rewrite_bpfel.{o,go}. Both are committed, so that
# go build needs no clang; after changing the C source, run make generate
# and commit the result. Debian keeps the uapi asm headers in the
# multiarch include directory, which clang -target bpf does not search.
BPF_PKG       := splice/bpf
BPF_MULTIARCH := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || clang -print-multiarch 2>/dev/null)
BPF_GEN        = BPF2GO_CFLAGS="-I/usr/include/$(BPF_MULTIARCH)" $(GO) generate .

generate: deps-generate
	cd $(BPF_PKG) && $(BPF_GEN)

# The committed objects are what the source compiles to: regenerate in a
# scratch copy of the package (a dot directory, which ./... skips) and
# compare byte for byte. bpf2go builds reproducibly: no clang version in
# the object, the source directory mapped away from the debug info.
generate-check: deps-generate
	@set -e; tmp=$$(mktemp -d $(BPF_PKG)/.gencheck.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	cp $(BPF_PKG)/rewrite.bpf.c $(BPF_PKG)/doc.go "$$tmp"/; \
	(cd "$$tmp" && $(BPF_GEN)); \
	for f in rewrite_bpfel.o rewrite_bpfel.go; do \
		if ! cmp -s "$$tmp/$$f" $(BPF_PKG)/$$f; then \
			echo "generate-check: $(BPF_PKG)/$$f does not match its source: run make generate and commit it"; exit 1; \
		fi; \
	done; \
	echo "generate-check: $(BPF_PKG) objects match rewrite.bpf.c"

demo: deps-demo build
	$(BIN)/spliced-demo -spliced $(BIN)/spliced

# The benchmark (as root): every configuration side by side, written to
# bench/results/latest.{json,md} and pictures. bench-quick is shorter.
bench: deps-bench build
	$(BIN)/spliced-bench -spliced $(BIN)/spliced

bench-quick: deps-bench build
	$(BIN)/spliced-bench -spliced $(BIN)/spliced -quick

# Binaries, the default configuration (an existing one is kept), the
# systemd unit and bash completion. PREFIX and DESTDIR as usual.
UNITDIR  ?= $(PREFIX)/lib/systemd/system
COMPDIR  ?= $(PREFIX)/share/bash-completion/completions

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSCONFDIR)/spliced $(DESTDIR)$(UNITDIR) $(DESTDIR)$(COMPDIR)
	install -m 0755 $(BIN)/spliced $(BIN)/splicectl $(DESTDIR)$(PREFIX)/bin/
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/spliced/spliced.yaml ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/spliced/spliced.yaml"; \
	else install -m 0640 config/default.yaml $(DESTDIR)$(SYSCONFDIR)/spliced/spliced.yaml; fi
	sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' contrib/spliced.service.in > $(DESTDIR)$(UNITDIR)/spliced.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/spliced.service
	$(BIN)/splicectl completion bash > $(DESTDIR)$(COMPDIR)/splicectl

clean:
	rm -rf $(BIN) test.json $(DIST)

# The version (package internal/version): git describe and the commit,
# passed with -X because Go stamps no VCS information in a git worktree or
# with -buildvcs=false. The Debian package gets the same version.
GIT_DESCRIBE := $(shell git describe --tags --match 'v[0-9]*' --dirty 2>/dev/null)
GIT_REVISION := $(shell git rev-parse HEAD 2>/dev/null)
GIT_TIME     := $(shell git log -1 --format=%ct 2>/dev/null)
GIT_MODIFIED := $(shell [ -n "$$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo true)
LDFLAGS ?= -X spliced/internal/version.tag=$(GIT_DESCRIBE) -X spliced/internal/version.revision=$(GIT_REVISION) \
	-X spliced/internal/version.commitTS=$(GIT_TIME) -X spliced/internal/version.modified=$(GIT_MODIFIED)

# The Debian package, built with nfpm (a Go tool dependency; see the
# README's Installation section): make deb [ARCH=amd64|arm64|armhf|mipsel|riscv64|i386]
# writes $(DIST)/spliced_VERSION_ARCH.deb: static binaries (CGO_ENABLED=0,
# stripped), every file dated at the commit's time.
DIST       ?= dist
ARCH       ?= $(shell dpkg --print-architecture 2>/dev/null || $(GO) env GOARCH)
MAINTAINER ?= $(shell git log -1 --format='%an <%ae>' 2>/dev/null)
GOARCH_amd64   := GOARCH=amd64
GOARCH_arm64   := GOARCH=arm64
GOARCH_armhf   := GOARCH=arm GOARM=7
GOARCH_mipsel  := GOARCH=mipsle GOMIPS=softfloat
GOARCH_riscv64 := GOARCH=riscv64
GOARCH_i386    := GOARCH=386
STAGE = $(DIST)/stage-$(ARCH)

.PHONY: deb cross
deb:
	@[ -n "$(GOARCH_$(ARCH))" ] || { echo "make deb: unknown ARCH=$(ARCH); use amd64, arm64, armhf, mipsel, riscv64 or i386"; exit 2; }
	rm -rf $(STAGE) && mkdir -p $(STAGE)
	env CGO_ENABLED=0 GOOS=linux $(GOARCH_$(ARCH)) $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $(STAGE)/ ./cmd/spliced ./cmd/splicectl
	$(GO) run ./packaging/stage -bin $(STAGE)/spliced -out $(STAGE) \
		-tag '$(GIT_DESCRIBE)' -revision '$(GIT_REVISION)' -time '$(GIT_TIME)' -modified '$(GIT_MODIFIED)'
	sed -e 's|@BINDIR@|/usr/bin|g' -e 's|@SYSCONFDIR@|/etc|g' contrib/spliced.service.in > $(STAGE)/spliced.service
	VERSION="$$(cat $(STAGE)/VERSION)" ARCH=$(ARCH) STAGE=$(STAGE) SOURCE_DATE_EPOCH=$(GIT_TIME) MAINTAINER='$(or $(MAINTAINER),spliced maintainers <root@localhost>)' \
		$(GO) tool nfpm package --config packaging/nfpm.yaml --packager deb --target $(DIST)/
	rm -rf $(STAGE)

# Builds (no tests) for routers' CPUs: linux/arm64, linux/arm (GOARM=7),
# linux/mipsle (GOMIPS=softfloat: many MIPS routers have no FPU) and
# linux/riscv64. Every package compiles (go build ./...,
# which catches 32-bit and per-architecture syscall differences in the
# test tools too); spliced and splicectl land in $(DIST)/cross/OS_ARCH/.
CROSS ?= linux/arm64 linux/arm/7 linux/mipsle linux/riscv64
cross:
	@set -e; for t in $(CROSS); do \
		IFS=/ read -r os arch arm <<< "$$t"; out=$(DIST)/cross/$${os}_$${arch}$${arm:+v$$arm}; \
		echo "cross: $$t -> $$out"; \
		export CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch GOARM=$$arm GOMIPS=softfloat; \
		$(GO) build ./...; \
		$(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $$out/ ./cmd/spliced ./cmd/splicectl; \
	done
