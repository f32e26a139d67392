package rules

import (
	"encoding/binary"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The router's own firewall. Once spliced, a flow's packets are untracked
// (the divert chain's notrack) and, rewritten, they are forwarded: on the
// nfqueue datapath, and on the bpf one with bpf_forward: stack (the
// redirect skips the forward hook). A forward chain of another table that
// drops by default and accepts by conntrack state ("ct state
// established,related accept", the most common router ruleset) drops
// them: the flow stalls right after its splice (TestLabStatefulForwardFirewall).
// No rule of spliced's table can help (a packet must pass every base
// chain of its hook), so the daemon finds such chains and says what to
// add to them.

// UntrackedDrop is a forward chain of another table that drops untracked
// packets.
type UntrackedDrop struct {
	Family, Table, Chain string
}

func (u UntrackedDrop) String() string {
	return fmt.Sprintf("table %s %s chain %s", u.Family, u.Table, u.Chain)
}

// Fix is the rule that lets spliced flows through the chain.
func (u UntrackedDrop) Fix() string {
	return fmt.Sprintf("nft insert rule %s %s %s ct state untracked accept", u.Family, u.Table, u.Chain)
}

// ctStateUntracked is the untracked bit of "ct state" (NF_CT_STATE_UNTRACKED_BIT).
const ctStateUntracked = 1 << 6

// UntrackedDrops lists the base chains at the forward hook of the tables
// other than ours (families inet, ip and ip6) whose policy is drop and
// that accept no untracked packet: no rule, in them or in a chain they
// jump to, accepts on a "ct state" that includes untracked (a plain
// match or a verdict map). A rule that accepts untracked packets under
// further conditions counts as accepting them.
func (m *Manager) UntrackedDrops() ([]UntrackedDrop, error) {
	c, err := m.nft()
	if err != nil {
		return nil, err
	}
	chains, err := c.ListChains()
	if err != nil {
		return nil, fmt.Errorf("list nftables chains: %w", err)
	}
	var out []UntrackedDrop
	for _, ch := range chains {
		t := ch.Table
		if t == nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookForward || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyDrop {
			continue
		}
		fam, ok := familyNames[t.Family]
		if !ok || (t.Family == nftables.TableFamilyINet && t.Name == m.spec.Table) {
			continue
		}
		accepts, err := acceptsUntracked(c, t, ch.Name, map[string]bool{})
		if err != nil {
			return nil, err
		}
		if !accepts {
			out = append(out, UntrackedDrop{Family: fam, Table: t.Name, Chain: ch.Name})
		}
	}
	return out, nil
}

// familyNames are the families whose forward hook IPv4 or IPv6 packets
// pass, as nft names them.
var familyNames = map[nftables.TableFamily]string{
	nftables.TableFamilyINet: "inet",
	nftables.TableFamilyIPv4: "ip",
	nftables.TableFamilyIPv6: "ip6",
}

// acceptsUntracked reports whether chain of t, or a chain it jumps or
// goes to, has a rule that accepts untracked packets.
func acceptsUntracked(c *nftables.Conn, t *nftables.Table, chain string, seen map[string]bool) (bool, error) {
	if seen[chain] {
		return false, nil
	}
	seen[chain] = true
	rules, err := c.GetRules(t, &nftables.Chain{Name: chain, Table: t})
	if err != nil {
		return false, fmt.Errorf("list the rules of chain %s: %w", chain, err)
	}
	for _, r := range rules {
		ok, err := ruleAcceptsUntracked(c, t, r.Exprs)
		if err != nil || ok {
			return ok, err
		}
		for _, e := range r.Exprs {
			if v, isVerdict := e.(*expr.Verdict); isVerdict && (v.Kind == expr.VerdictJump || v.Kind == expr.VerdictGoto) {
				if ok, err := acceptsUntracked(c, t, v.Chain, seen); err != nil || ok {
					return ok, err
				}
			}
		}
	}
	return false, nil
}

// ruleAcceptsUntracked reports whether a rule's expressions load the ct
// state and then accept with the untracked bit in the state's mask
// ("ct state untracked accept", "ct state established,untracked
// accept"), or look it up in a verdict map that maps a state with the bit
// to accept ("ct state vmap { untracked : accept, ... }").
func ruleAcceptsUntracked(c *nftables.Conn, t *nftables.Table, exprs []expr.Any) (bool, error) {
	loaded, masked := false, false
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Ct:
			loaded = e.Key == expr.CtKeySTATE && !e.SourceRegister
		case *expr.Bitwise:
			masked = loaded && len(e.Mask) >= 1 && stateBits(e.Mask)&ctStateUntracked != 0
		case *expr.Lookup:
			if !loaded || !e.IsDestRegSet {
				continue
			}
			set, err := c.GetSetByName(t, e.SetName)
			if err != nil {
				return false, fmt.Errorf("get verdict map %s: %w", e.SetName, err)
			}
			els, err := c.GetSetElements(set)
			if err != nil {
				return false, fmt.Errorf("list verdict map %s: %w", e.SetName, err)
			}
			for _, el := range els {
				if len(el.Key) >= 1 && stateBits(el.Key)&ctStateUntracked != 0 && acceptVerdict(el) {
					return true, nil
				}
			}
		case *expr.Verdict:
			if masked && e.Kind == expr.VerdictAccept {
				return true, nil
			}
		}
	}
	return false, nil
}

// acceptVerdict reports whether a verdict map's element maps to accept.
// The library decodes the verdict only for some maps; otherwise it is in
// Val, as the kernel sends it: a nested NFTA_VERDICT_CODE (big endian).
func acceptVerdict(el nftables.SetElement) bool {
	if el.VerdictData != nil {
		return el.VerdictData.Kind == expr.VerdictAccept
	}
	ad, err := netlink.NewAttributeDecoder(el.Val)
	if err != nil {
		return false
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_VERDICT_CODE {
			return int32(ad.Uint32()) == int32(expr.VerdictAccept)
		}
	}
	return false
}

// stateBits reads a ct state bitmask as the kernel stores it (host order,
// 32 bits).
func stateBits(b []byte) uint32 {
	var v [4]byte
	copy(v[:], b)
	return binary.NativeEndian.Uint32(v[:])
}
