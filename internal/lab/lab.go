package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// netnsDir is where named namespaces live (as `ip netns` keeps them).
const netnsDir = "/run/netns"

// Up builds the topology's network: it first removes whatever an earlier
// lab of the same name left, then creates the wire, the nodes and the pods.
// On error it removes what it made.
func Up(t *Topology) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("lab: building network namespaces needs root (run as root, e.g. sudo)")
	}
	if err := Down(t.Name); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = Down(t.Name)
		}
	}()
	wire, err := newNS(t.wireNS())
	if err != nil {
		return err
	}
	defer wire.Close()
	if err := inNS(wire, func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "wire0"}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("bridge: %w", err)
		}
		if err := loUp(h); err != nil {
			return err
		}
		// The control plane's address on the wire (see ControlAddr).
		return upWithAddr(h, "wire0", wireAddr)
	}); err != nil {
		return fmt.Errorf("lab: wire: %w", err)
	}
	nodeNS := map[string]netns.NsHandle{}
	defer func() {
		for _, h := range nodeNS {
			h.Close()
		}
	}()
	for i := range t.Nodes {
		n := &t.Nodes[i]
		h, err := newNS(t.nodeNS(n.Name))
		if err != nil {
			return err
		}
		nodeNS[n.Name] = h
		if err := setupNode(t, i, h, wire); err != nil {
			return fmt.Errorf("lab: node %s: %w", n.Name, err)
		}
	}
	for i := range t.Pods {
		p := &t.Pods[i]
		h, err := newNS(t.podNS(p.Name))
		if err != nil {
			return err
		}
		err = setupPod(t, i, h, nodeNS[p.Node])
		h.Close()
		if err != nil {
			return fmt.Errorf("lab: pod %s: %w", p.Name, err)
		}
	}
	return nil
}

// setupNode gives node i its underlay port on the wire, a bridge for its
// pods (with the pod CIDR's gateway address), routes to the other nodes'
// pods, and forwarding.
func setupNode(t *Topology, i int, node, wire netns.NsHandle) error {
	n := &t.Nodes[i]
	if err := plug(node, wire, fmt.Sprintf("n%d", i), "wire0"); err != nil {
		return fmt.Errorf("underlay: %w", err)
	}
	return inNS(node, func(h *netlink.Handle) error {
		if err := loUp(h); err != nil {
			return err
		}
		if err := upWithAddr(h, "eth0", underlay(i)); err != nil {
			return err
		}
		// A fixed address for the bridge: one left to the kernel follows the
		// lowest of its ports' and changes when that port goes, and every
		// pod's ARP entry for its gateway is then wrong for half a minute
		// (seen on the Kubernetes cluster: a node pod replaced cut the
		// node's pods off for 30 s).
		gw := n.Gateway().As4()
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cni0", HardwareAddr: net.HardwareAddr{0x02, 0xa0, gw[0], gw[1], gw[2], gw[3]}}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("pod bridge: %w", err)
		}
		if err := upWithAddr(h, "cni0", netip.PrefixFrom(n.Gateway(), n.cidr.Bits())); err != nil {
			return err
		}
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return err
		}
		for j := range t.Nodes {
			if j == i {
				continue
			}
			o := &t.Nodes[j]
			gw := underlay(j).Addr()
			if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipnet(o.cidr), Gw: net.IP(gw.AsSlice())}); err != nil {
				return fmt.Errorf("route to node %s's pods: %w", o.Name, err)
			}
		}
		return writeSysctl("net/ipv4/ip_forward", "1")
	})
}

// setupPod plugs a pod into its node's bridge with its IP and a default
// route through the node.
func setupPod(t *Topology, podIndex int, pod, node netns.NsHandle) error {
	p := &t.Pods[podIndex]
	n := t.Node(p.Node)
	port := fmt.Sprintf("v%d-%s", podIndex, p.Name)
	if len(port) > 15 { // interface names are at most 15 bytes; the index keeps them unique
		port = port[:15]
	}
	if err := plug(pod, node, port, "cni0"); err != nil {
		return err
	}
	return inNS(pod, func(h *netlink.Handle) error {
		if err := loUp(h); err != nil {
			return err
		}
		if err := upWithAddr(h, "eth0", netip.PrefixFrom(p.ip, n.cidr.Bits())); err != nil {
			return err
		}
		eth0, _ := h.LinkByName("eth0")
		return h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.IP(n.Gateway().AsSlice())})
	})
}

// plug joins a namespace to a bridge: a veth whose "eth0" end is in inner
// and whose other end, named port, is in outer, enslaved to bridge and up.
func plug(inner, outer netns.NsHandle, port, bridge string) error {
	host, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer host.Close()
	if err := host.LinkAdd(&netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: "eth0", Namespace: netlink.NsFd(inner)},
		PeerName:  port, PeerNamespace: netlink.NsFd(outer),
	}); err != nil {
		return fmt.Errorf("veth %s: %w", port, err)
	}
	return inNS(outer, func(h *netlink.Handle) error {
		l, err := h.LinkByName(port)
		if err != nil {
			return err
		}
		br, err := h.LinkByName(bridge)
		if err != nil {
			return err
		}
		if err := h.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("%s into %s: %w", port, bridge, err)
		}
		return h.LinkSetUp(l)
	})
}

// Down removes every namespace of the lab named name (and with them every
// link and rule inside). It is safe to call when nothing is there.
func Down(name string) error {
	stopErr := stopAll(name)
	prefix := "ambit-" + name + "-"
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return stopErr
	}
	if err != nil {
		return fmt.Errorf("lab down: %w", err)
	}
	errs := []error{stopErr}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", e.Name(), err))
			}
		}
	}
	os.RemoveAll(StateDir(name))
	return errors.Join(errs...)
}

// Status lists the lab's namespaces with their addresses, for a person.
func Status(name string) ([]string, error) {
	prefix := "ambit-" + name + "-"
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		h, err := netns.GetFromPath(filepath.Join(netnsDir, e.Name()))
		if err != nil {
			out = append(out, e.Name()+": "+err.Error())
			continue
		}
		var addrs []string
		_ = inNS(h, func(nl *netlink.Handle) error {
			list, err := nl.AddrList(nil, netlink.FAMILY_V4)
			for _, a := range list {
				if !a.IP.IsLoopback() {
					addrs = append(addrs, a.IPNet.String())
				}
			}
			return err
		})
		captured, _ := capture.Installed(h)
		h.Close()
		line := e.Name() + "  " + strings.Join(addrs, " ")
		if captured {
			line += "  (captured)"
		}
		out = append(out, line)
	}
	sort.Strings(out)
	return out, nil
}

func newNS(name string) (netns.NsHandle, error) {
	h, err := nsutil.NewNamed(name)
	if err != nil {
		return netns.None(), fmt.Errorf("lab: %w", err)
	}
	return h, nil
}

// inNS runs f with a netlink handle into ns (and the thread inside ns, for
// the sysctls).
func inNS(ns netns.NsHandle, f func(*netlink.Handle) error) error {
	return nsutil.Do(ns, func() error {
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			return err
		}
		defer h.Close()
		return f(h)
	})
}

// loUp brings a namespace's loopback up (a new namespace starts with it down).
func loUp(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	return h.LinkSetUp(lo)
}

func upWithAddr(h *netlink.Handle, name string, p netip.Prefix) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipnet(p)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", p, name, err)
	}
	return h.LinkSetUp(l)
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// writeSysctl sets a sysctl of the calling thread's network namespace.
func writeSysctl(key, value string) error {
	return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
}
