package bpf

// The objects are committed: `go build` needs no clang. `make generate`
// rebuilds them (it adds the multiarch include directory that Debian's
// uapi headers need through BPF2GO_CFLAGS); `make generate-check` proves
// that the committed ones match the source.
//
//go:generate go tool bpf2go -target bpfel -tags linux rewrite rewrite.bpf.c -- -mcpu=v3 -Wall -Werror
