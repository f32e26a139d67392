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

.PHONY: all build test check fuzz demo bench bench-quick install clean deps-demo deps-test deps-bench

all: build

build:
	$(GO) build -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

# Every package's tests, lab tests included (as root), after installing
# the tools they use. The summary fails the run when a test fails, or when
# one skipped although we are root.
test: deps-test
	set -o pipefail; $(GO) test -count=1 -timeout 14m -json $(TESTFLAGS) ./... | $(GO) run ./internal/testsummary

check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt: not formatted:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Every fuzz target for FUZZTIME each, one package and target at a time
# (several packages have a FuzzParse, and go test fuzzes one target per
# run). A failure leaves its input under the package's testdata/fuzz:
# commit it with the fix, so that plain `go test` replays it.
FUZZTIME ?= 5s
fuzz:
	@set -e; for f in $$(git ls-files '*_test.go' | xargs grep -l '^func Fuzz'); do \
		pkg=./$$(dirname $$f); \
		for name in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$f); do \
			echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

deps-demo deps-test deps-bench:
	@$(DEPS) $(patsubst deps-%,%,$@)

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
	rm -rf $(BIN) test.json
