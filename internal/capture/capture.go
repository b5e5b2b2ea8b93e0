// Package capture programs a pod's network namespace so its TCP goes
// through the node proxy without the application knowing: outbound TCP is
// redirected to the proxy's 15001, inbound TCP (except HBONE on 15008) to
// 15006, and the proxy's own sockets, marked 0x539, pass untouched. It is
// the nftables form of istio-cni's in-pod iptables rules, programmed through
// netlink (no iptables or nft binary), plus the policy route that lets the
// proxy answer from the client's IP.
package capture

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Config holds the numbers of the redirection; zero fields take Istio's.
type Config struct {
	OutboundPort uint16 // 15001
	InboundPort  uint16 // 15006
	HBONEPort    uint16 // 15008: never redirected
	ProxyMark    uint32 // 0x539: packets of the proxy's own sockets (SO_MARK)
	ConnMark     uint32 // 0x111: connections the proxy opened from a client's IP
	MarkMask     uint32 // 0xfff
	RouteTable   int    // 100: "everything is local" for ConnMark packets
	ProbeSource  string // 169.254.7.127: kubelet probes, accepted as they are
}

func (c Config) withDefaults() Config {
	if c.OutboundPort == 0 {
		c.OutboundPort = ambient.ZtunnelOutboundPort
	}
	if c.InboundPort == 0 {
		c.InboundPort = ambient.ZtunnelInboundPlaintextPort
	}
	if c.HBONEPort == 0 {
		c.HBONEPort = ambient.ZtunnelInboundPort
	}
	if c.ProxyMark == 0 {
		c.ProxyMark = ambient.InpodMark
	}
	if c.ConnMark == 0 {
		c.ConnMark = 0x111
	}
	if c.MarkMask == 0 {
		c.MarkMask = 0xfff
	}
	if c.RouteTable == 0 {
		c.RouteTable = 100
	}
	if c.ProbeSource == "" {
		c.ProbeSource = "169.254.7.127"
	}
	return c
}

// TableName is the nftables table Ambit owns in each pod namespace.
const TableName = "ambit"

// Install programs the redirection into the namespace ns, replacing any
// earlier Ambit rules there. It touches nothing outside ns.
func Install(ns netns.NsHandle, cfg Config) error {
	cfg = cfg.withDefaults()
	probe := net.ParseIP(cfg.ProbeSource).To4()
	if probe == nil {
		return fmt.Errorf("capture: probe source %q is not an IPv4 address", cfg.ProbeSource)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("capture: nftables: %w", err)
	}
	// Start from a clean table: add (a no-op if present) then delete, in one batch.
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	c.AddTable(t)
	c.DelTable(t)
	t = c.AddTable(&nftables.Table{Name: TableName, Family: nftables.TableFamilyINet})

	mangleIn := c.AddChain(&nftables.Chain{Name: "prerouting-mangle", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	natIn := c.AddChain(&nftables.Chain{Name: "prerouting-nat", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	mangleOut := c.AddChain(&nftables.Chain{Name: "output-mangle", Table: t, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle})
	natOut := c.AddChain(&nftables.Chain{Name: "output-nat", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})

	rule := func(ch *nftables.Chain, e ...[]expr.Any) {
		var all []expr.Any
		for _, x := range e {
			all = append(all, x...)
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: all})
	}

	// Packets of the proxy's own sockets mark their connection, so the
	// answers find their way back to the proxy (see output-mangle).
	rule(mangleIn, markIs(cfg.ProxyMark, cfg.MarkMask, true), setConnMark(cfg.ConnMark))

	// Inbound TCP to the pod, except HBONE, loopback, kubelet probes and
	// the proxy's own packets, goes to 15006.
	rule(natIn, tcp(), daddrNot(net.IPv4(127, 0, 0, 1).To4()), dportNot(cfg.HBONEPort),
		markIs(cfg.ProxyMark, cfg.MarkMask, false), saddrNot(probe), redirect(cfg.InboundPort))

	// Answers on a connection the proxy opened from a client's IP carry the
	// connection's mark, which routes them (table RouteTable) to the proxy.
	rule(mangleOut, connMarkIs(cfg.ConnMark, cfg.MarkMask), restoreMark())

	// Outbound: connections the proxy made, and loopback, pass; every other
	// TCP connection of the pod goes to 15001.
	rule(natOut, connMarkIs(cfg.ConnMark, cfg.MarkMask), accept())
	rule(natOut, oifIsLoopback(), accept())
	rule(natOut, tcp(), markIs(cfg.ProxyMark, cfg.MarkMask, false), redirect(cfg.OutboundPort))

	if err := c.Flush(); err != nil {
		return fmt.Errorf("capture: program nftables: %w", err)
	}
	if err := installRoutes(ns, cfg); err != nil {
		return err
	}
	return nil
}

// Remove takes Ambit's rules and routes out of ns; the pod's next
// connections go direct. Removing what is not there is not an error.
func Remove(ns netns.NsHandle, cfg Config) error {
	cfg = cfg.withDefaults()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("capture: nftables: %w", err)
	}
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("capture: remove nftables table: %w", err)
	}
	return removeRoutes(ns, cfg)
}

// Installed reports whether Ambit's table is present in ns.
func Installed(ns netns.NsHandle) (bool, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return false, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	for _, t := range tables {
		if t.Name == TableName {
			return true, nil
		}
	}
	return false, nil
}

func installRoutes(ns netns.NsHandle, cfg Config) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("capture: netlink: %w", err)
	}
	defer h.Close()
	_ = removeRoutesWith(h, cfg) // idempotent install
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("capture: lo: %w", err)
	}
	// The proxy's answers are delivered through lo: it must be up (it is
	// in every pod; a bare namespace starts with it down).
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("capture: bring lo up: %w", err)
		}
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		r := netlink.NewRule()
		r.Family = fam
		r.Mark = cfg.ConnMark
		m := cfg.MarkMask
		r.Mask = &m
		r.Table = cfg.RouteTable
		r.Priority = 32764
		if err := h.RuleAdd(r); err != nil {
			return fmt.Errorf("capture: ip rule fwmark %#x lookup %d: %w", cfg.ConnMark, cfg.RouteTable, err)
		}
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if fam == unix.AF_INET6 {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		route := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: dst, Table: cfg.RouteTable, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := h.RouteReplace(route); err != nil && !(fam == unix.AF_INET6 && errors.Is(err, unix.EACCES)) {
			return fmt.Errorf("capture: local route %s table %d: %w", dst, cfg.RouteTable, err)
		}
	}
	return nil
}

func removeRoutes(ns netns.NsHandle, cfg Config) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("capture: netlink: %w", err)
	}
	defer h.Close()
	return removeRoutesWith(h, cfg)
}

func removeRoutesWith(h *netlink.Handle, cfg Config) error {
	var errs []error
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := h.RuleList(fam)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, r := range rules {
			if r.Table == cfg.RouteTable && r.Mark == cfg.ConnMark {
				if err := h.RuleDel(&r); err != nil {
					errs = append(errs, err)
				}
			}
		}
		routes, err := h.RouteListFiltered(fam, &netlink.Route{Table: cfg.RouteTable}, netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, r := range routes {
			if err := h.RouteDel(&r); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// --- nftables expressions ---

func tcp() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

// markIs matches (meta mark & mask) == mark, or != when equal is false.
func markIs(mark, mask uint32, equal bool) []expr.Any {
	op := expr.CmpOpEq
	if !equal {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: op, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
}

func connMarkIs(mark, mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
}

func setConnMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
	}
}

// restoreMark copies the connection's mark to the packet (meta mark set ct mark).
func restoreMark() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
	}
}

func ipv4Only() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func daddrNot(ip net.IP) []expr.Any {
	return append(ipv4Only(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ip},
	)
}

func saddrNot(ip net.IP) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ip},
	}
}

func dportNot(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func oifIsLoopback() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("lo")},
	}
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

func redirect(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.Redir{RegisterProtoMin: 1},
	}
}

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }

// Check programs and removes the redirection in a throwaway namespace, so a
// kernel without what capture needs says so before anything is built.
func Check() error {
	name := fmt.Sprintf("ambit-probe-%d", os.Getpid())
	ns, err := nsutil.NewNamed(name)
	if err != nil {
		return fmt.Errorf("cannot create a network namespace: %w", err)
	}
	defer netns.DeleteNamed(name)
	defer ns.Close()
	if err := Install(ns, Config{}); err != nil {
		return fmt.Errorf("this kernel cannot do in-pod capture (nftables with NAT redirect, conntrack and policy routing are needed): %w", err)
	}
	return Remove(ns, Config{})
}
