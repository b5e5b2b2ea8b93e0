package testutil

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var nsSeq atomic.Int32

// NeedRoot skips a test that needs root, saying so. CI runs as root, so
// there it never skips.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root to create network namespaces (CI runs as root)")
	}
}

// Netns creates a named network namespace with lo up, deleted when the test
// ends, pass or fail. The calling thread does not stay in it.
func Netns(t testing.TB) (netns.NsHandle, string) {
	t.Helper()
	NeedRoot(t)
	name := fmt.Sprintf("ambit-t%d-%d", os.Getpid()%100000, nsSeq.Add(1))
	h, err := nsutil.NewNamed(name)
	if err != nil {
		t.Fatalf("netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		h.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("lo up in %s: %v", name, err)
	}
	return h, name
}

// Veth joins two namespaces with a veth pair and gives each end an address
// (CIDR form, e.g. "10.250.0.2/24"). The pair goes with the namespaces.
func Veth(t testing.TB, a, b netns.NsHandle, aCIDR, bCIDR string) {
	t.Helper()
	host, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	n := nsSeq.Add(1)
	an, bn := fmt.Sprintf("amb%da", n), fmt.Sprintf("amb%db", n)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: an, Namespace: netlink.NsFd(a)}, PeerName: bn, PeerNamespace: netlink.NsFd(b)}
	if err := host.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	for _, end := range []struct {
		ns   netns.NsHandle
		name string
		cidr string
	}{{a, an, aCIDR}, {b, bn, bCIDR}} {
		h, err := netlink.NewHandleAt(end.ns)
		if err != nil {
			t.Fatal(err)
		}
		l, err := h.LinkByName(end.name)
		if err != nil {
			h.Close()
			t.Fatal(err)
		}
		addr, err := netlink.ParseAddr(end.cidr)
		if err == nil {
			err = h.AddrAdd(l, addr)
		}
		if err == nil {
			err = h.LinkSetUp(l)
		}
		h.Close()
		if err != nil {
			t.Fatalf("veth %s %s: %v", end.name, end.cidr, err)
		}
	}
}

// HostState lists what a lab must not touch in the host's namespace: its
// links, policy-routing rules and nftables tables. Compare two snapshots.
func HostState(t testing.TB) map[string]bool {
	t.Helper()
	m := map[string]bool{}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		m["link "+l.Attrs().Name] = true
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			m[fmt.Sprintf("rule %d prio %d mark %#x table %d", fam, r.Priority, r.Mark, r.Table)] = true
		}
	}
	nft, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := nft.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		m[fmt.Sprintf("nft table %d %s", tb.Family, tb.Name)] = true
	}
	return m
}

// SameHostState reports, as test errors, what differs between two HostState snapshots.
func SameHostState(t testing.TB, before, after map[string]bool) {
	t.Helper()
	for k := range after {
		if !before[k] {
			t.Errorf("%q appeared in the host's namespace", k)
		}
	}
	for k := range before {
		if !after[k] {
			t.Errorf("%q of the host's namespace disappeared", k)
		}
	}
}
