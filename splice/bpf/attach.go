//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Attachment is the program attached at tcx ingress of some interfaces.
// Without a pin directory the links belong to the process and go away
// with it, however it ends (the kernel drops a tcx link when its last
// file descriptor closes). With one (Options.PinDir) they are pinned
// there and stay attached after the process ends, until Detach or
// RemovePins.
type Attachment struct {
	dp     *Datapath
	mu     sync.Mutex // links and names: Sync runs beside the readers
	links  []link.Link
	names  []string
	pinDir string
	// Updated are the interfaces whose pinned link an earlier daemon
	// left and Attach moved to this program; Dropped the pinned links of
	// interfaces no longer attached to (their interface is gone, or not
	// in the list), which Attach detached.
	Updated, Dropped []string
}

// Attach attaches the program at tcx ingress of every named interface,
// after the programs already there (it returns TCX_NEXT, so those after
// it run too). With a pin directory, a link pinned there for the
// interface is moved to this program (link update: the program is
// replaced in place, no packet sees neither), new links are pinned, and
// pinned links of other interfaces are detached. On error nothing this
// call attached stays attached (links it updated keep this program:
// both programs share the maps).
func (dp *Datapath) Attach(ifaces []string) (*Attachment, error) {
	a := &Attachment{dp: dp, pinDir: dp.pinDir}
	fail := func(err error) (*Attachment, error) {
		for i, l := range a.links {
			if !slices.Contains(a.Updated, a.names[i]) {
				l.Unpin()
			}
			l.Close()
		}
		a.links, a.names = nil, nil
		return nil, err
	}
	for _, name := range ifaces {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return fail(fmt.Errorf("interface %s: %w", name, err))
		}
		if l := dp.updatePinned(ifi); l != nil {
			a.links = append(a.links, l)
			a.names = append(a.names, name)
			a.Updated = append(a.Updated, name)
			continue
		}
		l, err := dp.attachNew(ifi)
		if err != nil {
			return fail(err)
		}
		a.links = append(a.links, l)
		a.names = append(a.names, name)
	}
	if dp.pinDir != "" {
		ents, _ := os.ReadDir(dp.pinDir)
		for _, e := range ents {
			name, ok := strings.CutPrefix(e.Name(), pinLinkPrefix)
			if !ok || slices.Contains(a.names, name) {
				continue
			}
			os.Remove(filepath.Join(dp.pinDir, e.Name())) // detaches it: nothing else holds it
			a.Dropped = append(a.Dropped, name)
		}
	}
	return a, nil
}

// attachNew attaches the program at tcx ingress of ifi, after the
// programs there, and pins the link when the datapath pins.
func (dp *Datapath) attachNew(ifi *net.Interface) (link.Link, error) {
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifi.Index, Program: dp.objs.SpliceRewrite,
		Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
	if err != nil {
		return nil, fmt.Errorf("tcx attach at ingress of %s: %w", ifi.Name, err)
	}
	if dp.pinDir != "" {
		if err := l.Pin(linkPin(dp.pinDir, ifi.Name)); err != nil {
			l.Close()
			return nil, fmt.Errorf("pin the tcx link of %s: %w", ifi.Name, err)
		}
	}
	return l, nil
}

// Sync makes the attachment follow the interfaces present: it attaches
// the program at ingress of each interface of want it is not attached
// to, and lets go of the links of interfaces no longer in want (gone,
// renamed, moved to another namespace: their links are defunct). It
// returns what it attached and let go of; an interface it could not
// attach to is in the error and stays unattached (its spliced packets
// go through the queue), the others are attached.
func (a *Attachment) Sync(want []string) (added, removed []string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	interfaceByName := interfacesByName()
	var errs []error
	keep := a.links[:0]
	names := a.names[:0]
	for i, l := range a.links {
		name := a.names[i]
		ifi, ierr := interfaceByName(name)
		if slices.Contains(want, name) && ierr == nil && a.attachedTo(l, ifi) {
			keep, names = append(keep, l), append(names, name)
			continue
		}
		if a.pinDir != "" {
			l.Unpin()
		}
		l.Close()
		removed = append(removed, name)
	}
	a.links, a.names = keep, names
	for _, name := range want {
		if slices.Contains(a.names, name) {
			continue
		}
		ifi, ierr := interfaceByName(name)
		if ierr != nil {
			continue // gone again meanwhile
		}
		l, aerr := a.dp.attachNew(ifi)
		if aerr != nil {
			errs = append(errs, aerr)
			continue
		}
		a.links = append(a.links, l)
		a.names = append(a.names, name)
		added = append(added, name)
	}
	return added, removed, errors.Join(errs...)
}

// interfacesByName lists the interfaces once and returns their lookup
// by name. net.InterfaceByName lists every link for each name: with
// hundreds of interfaces (a container host's veths) a Sync, which runs
// on every link notification, made hundreds of full listings. If the
// listing fails, each name is looked up on its own.
func interfacesByName() func(string) (*net.Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return net.InterfaceByName
	}
	byName := make(map[string]*net.Interface, len(ifs))
	for i := range ifs {
		byName[ifs[i].Name] = &ifs[i]
	}
	return func(name string) (*net.Interface, error) {
		if ifi, ok := byName[name]; ok {
			return ifi, nil
		}
		return nil, fmt.Errorf("interface %s: no such interface", name)
	}
}

// attachedTo reports whether l is still attached at ingress of ifi (an
// interface of that name may be a new one, with another index).
func (a *Attachment) attachedTo(l link.Link, ifi *net.Interface) bool {
	info, err := l.Info()
	return err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifi.Index
}

func linkPin(dir, iface string) string { return filepath.Join(dir, pinLinkPrefix+iface) }

// updatePinned moves the link pinned for ifi to this program, and returns
// it; nil when there is none, or it cannot be reused (attached elsewhere:
// the interface was recreated; defunct), which is then removed.
func (dp *Datapath) updatePinned(ifi *net.Interface) link.Link {
	if dp.pinDir == "" {
		return nil
	}
	path := linkPin(dp.pinDir, ifi.Name)
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		os.Remove(path)
		return nil
	}
	info, err := l.Info()
	if err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifi.Index && ebpf.AttachType(info.TCX().AttachType) == ebpf.AttachTCXIngress {
		err = l.Update(dp.objs.SpliceRewrite)
	} else if err == nil {
		err = errors.New("attached elsewhere")
	}
	if err != nil {
		l.Unpin()
		l.Close()
		return nil
	}
	return l
}

// Interfaces are the interfaces the program is attached to.
func (a *Attachment) Interfaces() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.names)
}

// Close releases the links: unpinned ones are detached, pinned ones stay
// attached (Detach detaches them too).
func (a *Attachment) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closeLocked()
}

func (a *Attachment) closeLocked() error {
	var errs []error
	for _, l := range a.links {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	a.links, a.names = nil, nil
	return errors.Join(errs...)
}

// Detach unpins the links and detaches the program everywhere.
func (a *Attachment) Detach() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for _, l := range a.links {
		if a.pinDir != "" {
			if err := l.Unpin(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(append(errs, a.closeLocked())...)
}

// Mark is the mark bit the program sets on what it rewrote.
func (dp *Datapath) Mark() uint32 { return dp.mark }

// SetStackInterfaces makes the program leave what it rewrites on the
// interfaces of ifindexes to the stack, even when it redirects
// (Options.Redirect), and redirect on every other interface: tcx runs
// before an interface's classic tc ingress filters, which a redirect
// would skip (splice_stack_ifaces). It returns whether the set changed.
func (dp *Datapath) SetStackInterfaces(ifindexes []int) (bool, error) {
	m := dp.objs.SpliceStackIfaces
	want := map[uint32]bool{}
	for _, i := range ifindexes {
		want[uint32(i)] = true
	}
	var stale []uint32
	var k uint32
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
		delete(want, k)
	}
	if err := it.Err(); err != nil {
		return false, fmt.Errorf("stack interfaces: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return true, fmt.Errorf("stack interfaces: %w", err)
		}
	}
	for k := range want {
		if err := m.Put(k, uint8(1)); err != nil {
			return true, fmt.Errorf("stack interfaces: %w", err)
		}
	}
	return len(stale) > 0 || len(want) > 0, nil
}
