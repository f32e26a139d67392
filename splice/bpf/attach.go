//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"encoding/binary"
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

// RunResult is what the program did with a packet given to Run.
type RunResult int

const (
	RunForward RunResult = iota // rewritten (the output is the new packet)
	RunDrop                     // dropped: a check failed
	RunPass                     // not handled: the Go engine's
)

// MaxRunLen is the longest IP packet Run takes: BPF_PROG_TEST_RUN copies
// a packet into one page with the skb's headroom and tailroom.
const MaxRunLen = 3072

// Run runs the attached program's logic on one IP packet outside the
// datapath, against the live maps (BPF_PROG_TEST_RUN): for a packet of an
// offloaded flow that reached the queue anyway (it passed ingress before
// the flow's entry was written). The state changes as if the packet had
// arrived at ingress. The output's TCP checksum is updated incrementally
// from the input's: a caller whose input held only the pseudo-header sum
// must compute it in full.
func (dp *Datapath) Run(ip []byte) ([]byte, RunResult, error) {
	if len(ip) > MaxRunLen || len(ip) == 0 {
		return nil, RunPass, fmt.Errorf("run: packet of %d bytes (at most %d)", len(ip), MaxRunLen)
	}
	typ := uint16(0x0800)
	if ip[0]>>4 == 6 {
		typ = 0x86dd
	}
	in := make([]byte, 14, 14+len(ip))
	in[0], in[6] = 0x02, 0x02 // locally administered, unicast
	binary.BigEndian.PutUint16(in[12:], typ)
	in = append(in, ip...)
	out := make([]byte, len(in)+256)
	ctxIn := make([]byte, 12) // __sk_buff up to mark: len, pkt_type, mark
	ctxOut := make([]byte, 512)
	ret, err := dp.objs.SpliceRewrite.Run(&ebpf.RunOptions{Data: in, DataOut: out, Context: ctxIn, ContextOut: ctxOut})
	if err != nil {
		return nil, RunPass, fmt.Errorf("run: %w", err)
	}
	mark := binary.NativeEndian.Uint32(ctxOut[8:])
	switch {
	case ret == RetDrop:
		return nil, RunDrop, nil
	case ret == RetNext && mark&dp.mark != 0:
		return out[14:len(in)], RunForward, nil
	}
	return nil, RunPass, nil
}

// Mark is the mark bit the program sets on what it rewrote.
func (dp *Datapath) Mark() uint32 { return dp.mark }
