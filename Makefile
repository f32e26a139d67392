# spliced: see README.md. Lab targets (test, demo, bench) need root.
SHELL := /bin/bash

GO       ?= go
PREFIX   ?= /usr/local
DESTDIR  ?=
SYSCONFDIR ?= /etc
BIN      := bin
CMDS     := spliced splicectl spliced-demo spliced-bench
TESTFLAGS ?=

.PHONY: all build test test-race check demo bench bench-quick install clean

all: build

build:
	$(GO) build -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

# Every package's tests, lab tests included (as root). The summary fails
# the run when a test fails, or when one skipped although we are root.
test:
	set -o pipefail; $(GO) test -count=1 -timeout 14m -json $(TESTFLAGS) ./... | $(GO) run ./internal/testsummary

# The same under the race detector; the daemons the lab tests start are
# built with -race too (testnet.Binary, SPLICED_RACE) and a race they
# report fails the test. PKGS narrows it: make test-race PKGS=./gateway
PKGS ?= ./...
test-race:
	set -o pipefail; SPLICED_RACE=1 $(GO) test -race -count=1 -timeout 40m -json $(TESTFLAGS) $(PKGS) | $(GO) run ./internal/testsummary

check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt: not formatted:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

demo: build
	$(BIN)/spliced-demo -spliced $(BIN)/spliced

# The benchmark (as root): every configuration side by side, written to
# bench/results/latest.{json,md} and pictures. bench-quick is shorter.
bench: build
	$(BIN)/spliced-bench -spliced $(BIN)/spliced

bench-quick: build
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
