//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"errors"
	"fmt"
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Attachment is the program attached at tcx ingress of some interfaces.
// The links are not pinned: they belong to the process and go away with
// it, however it ends (the kernel drops a tcx link when its last file
// descriptor closes).
type Attachment struct {
	links []link.Link
	names []string
}

// Attach attaches the program at tcx ingress of every named interface,
// after the programs already there (it returns TCX_NEXT, so those after
// it run too). On error nothing stays attached.
func (dp *Datapath) Attach(ifaces []string) (*Attachment, error) {
	a := &Attachment{}
	for _, name := range ifaces {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("interface %s: %w", name, err)
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifi.Index, Program: dp.objs.SpliceRewrite,
			Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
		if err != nil {
			a.Close()
			return nil, fmt.Errorf("tcx attach at ingress of %s: %w", name, err)
		}
		a.links = append(a.links, l)
		a.names = append(a.names, name)
	}
	return a, nil
}

// Interfaces are the interfaces the program is attached to.
func (a *Attachment) Interfaces() []string { return a.names }

// Close detaches the program everywhere.
func (a *Attachment) Close() error {
	var errs []error
	for _, l := range a.links {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	a.links, a.names = nil, nil
	return errors.Join(errs...)
}

// Mark is the mark bit the program sets on what it rewrote.
func (dp *Datapath) Mark() uint32 { return dp.mark }
