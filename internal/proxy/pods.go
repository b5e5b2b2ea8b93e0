package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/sockopt"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"
)

// pod is a workload enrolled in in-pod capture: the proxy listens inside
// its namespace and opens its connections from there.
type pod struct {
	uid             string // as the node agent names it: istio-cni gives the Kubernetes pod UID
	name, namespace string // the pod's name and namespace, from the agent's WorkloadInfo ("" without)
	ip              netip.Addr
	ns              netns.NsHandle
	listeners       []net.Listener
}

// AddPod enrolls a local workload whose network namespace has capture
// installed: 15001, 15006 and 15008 open inside it. The proxy keeps its own
// copy of ns; the caller may close its handle.
//
// A pod xDS does not know yet is taken too, as ztunnel takes it: on
// Kubernetes the node agent enrolls a pod during its CNI ADD, before the
// pod has an IP in the API server, so before the control plane can send
// it. Its address is read from its namespace; its connections are refused
// (no source workload, no certificate) until xDS brings it. A pod xDS
// places on another node is refused.
func (p *Proxy) AddPod(uid string, info *zdsapi.WorkloadInfo, ns netns.NsHandle) error {
	ix := p.index.Load()
	w := p.podWorkload(ix, uid, info.GetName(), info.GetNamespace())
	if w != nil && !p.isLocal(w) {
		return fmt.Errorf("proxy: add pod %s: a workload of node %q, not of this node", uid, w.Node)
	}
	var ip netip.Addr
	if w != nil {
		ip = w.IPs[0]
	} else {
		var err error
		if ip, err = addressIn(ns); err != nil {
			return fmt.Errorf("proxy: add pod %s (not in xDS yet): %w", uid, err)
		}
		p.log.Info("pod added before xDS has it; its traffic waits for xDS", "uid", uid, "ip", ip.String())
	}
	dup, err := unix.Dup(int(ns))
	if err != nil {
		return fmt.Errorf("proxy: add pod %s: %w", uid, err)
	}
	pd := &pod{uid: uid, name: info.GetName(), namespace: info.GetNamespace(), ip: ip, ns: netns.NsHandle(dup)}
	// Added again (the agent resends its snapshot when the proxy
	// reconnects): the old listeners go first, or the new ones could not bind.
	p.mu.Lock()
	if old := p.pods[pd.ip]; old != nil {
		delete(p.pods, pd.ip)
		old.close()
	}
	p.mu.Unlock()
	type spec struct {
		name  string
		port  uint16
		serve func(net.Listener)
	}
	specs := []spec{
		{"outbound", p.ports.Outbound, p.serveCaptured},
		{"inbound", p.ports.Inbound, p.servePlaintextInbound},
		{"hbone", p.ports.HBONE, func(l net.Listener) { _ = p.server.Serve(l) }},
	}
	err = nsutil.Do(pd.ns, func() error {
		lc := net.ListenConfig{Control: markAndTransparent}
		if p.opts.PortReuse {
			lc.Control = markTransparentReusePort
		}
		for _, s := range specs {
			l, err := lc.Listen(context.Background(), "tcp", fmt.Sprintf("0.0.0.0:%d", s.port))
			if err != nil {
				return fmt.Errorf("listen on %d in the pod: %w", s.port, err)
			}
			pd.listeners = append(pd.listeners, p.guard(l, fmt.Sprintf("%s of pod %s", s.name, uid)))
		}
		return nil
	})
	if err != nil {
		pd.close()
		return fmt.Errorf("proxy: add pod %s: %w", uid, err)
	}
	p.mu.Lock()
	if old := p.pods[pd.ip]; old != nil {
		old.close()
	}
	p.pods[pd.ip] = pd
	p.mu.Unlock()
	p.opts.Metrics.PodStarted()
	for i, s := range specs {
		l := pd.listeners[i]
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			s.serve(l)
		}()
	}
	p.log.Info("pod enrolled", "uid", uid, "ip", pd.ip.String())
	return nil
}

// addressIn is the pod's address: the first global unicast address on an
// interface of its namespace, IPv4 first.
func addressIn(ns netns.NsHandle) (netip.Addr, error) {
	var found []netip.Addr
	err := nsutil.Do(ns, func() error {
		addrs, err := net.InterfaceAddrs() // a netlink socket in this thread's namespace
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().IsGlobalUnicast() {
					found = append(found, ip.Unmap())
				}
			}
		}
		return nil
	})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("the pod's addresses: %w", err)
	}
	for _, ip := range found {
		if ip.Is4() {
			return ip, nil
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return netip.Addr{}, errors.New("the pod's namespace has no address yet")
}

// RemovePod closes a pod's listeners; its connections in flight finish.
func (p *Proxy) RemovePod(uid string) error {
	p.mu.Lock()
	var found *pod
	for ip, pd := range p.pods {
		if pd.uid == uid {
			found = pd
			delete(p.pods, ip)
		}
	}
	p.mu.Unlock()
	if found == nil {
		return fmt.Errorf("proxy: remove pod %s: not enrolled", uid)
	}
	found.close()
	p.opts.Metrics.PodStopped()
	p.log.Info("pod removed", "uid", uid)
	return nil
}

// podWorkload is the workload xDS has for an enrolled pod: by the
// agent's uid when it is xDS's (Ambit's agent sends that), else by the
// pod's namespace and name among this node's workloads. istio-cni sends
// the Kubernetes pod UID, which istiod's workload uids
// ("cluster//Pod/namespace/name") do not carry; ztunnel too finds the
// pod's workload by its WorkloadInfo.
func (p *Proxy) podWorkload(ix *workload.Index, uid, name, namespace string) *workload.Workload {
	if w := ix.WorkloadByUID(uid); w != nil {
		return w
	}
	if name == "" {
		return nil
	}
	for _, w := range ix.WorkloadsOnNode(p.opts.Node) {
		if w.Name == name && w.Namespace == namespace && !w.HostNetwork {
			return w
		}
	}
	return nil
}

// podCounts is what workload_manager_active_proxy_count and
// workload_manager_pending_proxy_count show: the pods enrolled, and of
// them those xDS has not sent yet.
func (p *Proxy) podCounts() (active, pending int) {
	ix := p.index.Load()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pd := range p.pods {
		if p.podWorkload(ix, pd.uid, pd.name, pd.namespace) == nil {
			pending++
		}
	}
	return len(p.pods), pending
}

func (pd *pod) close() {
	for _, l := range pd.listeners {
		l.Close()
	}
	pd.ns.Close()
}

func (p *Proxy) removeAllPods() {
	p.mu.Lock()
	pods := p.pods
	p.pods = map[netip.Addr]*pod{}
	p.mu.Unlock()
	for _, pd := range pods {
		pd.close()
	}
}

func (p *Proxy) podAt(ip netip.Addr) *pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[ip]
}

// dialFrom opens a TCP connection from src: inside src's pod namespace,
// marked, when src is an enrolled pod; otherwise a plain dial bound to src
// (if set).
func (p *Proxy) dialFrom(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	pd := p.podAt(src)
	if pd == nil {
		d := net.Dialer{}
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
		return d.DialContext(ctx, "tcp", dst.String())
	}
	c, err := pd.dial(ctx, netip.AddrPortFrom(src, 0), dst)
	if err != nil {
		return nil, err // not a nil *net.TCPConn in a non-nil net.Conn
	}
	return c, nil
}

// dial connects from the pod's namespace, marked and transparent, so from
// may be an address that is not the pod's own (the client's, on the way in).
func (pd *pod) dial(ctx context.Context, from, to netip.AddrPort) (*net.TCPConn, error) {
	return nsutil.DialTCP(ctx, pd.ns, from, to, dialSetup(from, to))
}

// dialSetup is what a pod-side socket from from to to needs before its
// bind: the proxy's mark, transparency, and SO_REUSEADDR when it binds a
// port of its own choosing (the client's).
func dialSetup(from, to netip.AddrPort) func(fd int) error {
	return func(fd int) error {
		if from.Port() != 0 {
			// Binds the client's address and port while another of the
			// proxy's sockets has them bound to a different destination (a
			// client may use one port for several); connect still refuses
			// a four-tuple in use. Best effort: without it such a bind
			// fails and withClientPort falls back to any port.
			_ = sockopt.ReuseAddr(fd)
		}
		return markTransparent(fd, !to.Addr().Unmap().Is4())
	}
}

// dialSocket is dial for the relay: the socket goes from nsutil straight
// into the poller's set and waits there for the handshake (no net.TCPConn
// made and dropped on the way, no duplicate of the descriptor).
func (pd *pod) dialSocket(ctx context.Context, pl *relay.Poller, from, to netip.AddrPort) (*relay.Socket, error) {
	fd, sa, err := nsutil.BoundTCP(pd.ns, from, to, dialSetup(from, to))
	if err != nil {
		return nil, err
	}
	s, err := pl.Connect(ctx, fd, sa)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Source: net.TCPAddrFromAddrPort(from), Addr: net.TCPAddrFromAddrPort(to), Err: err}
	}
	return s, nil
}

// markAndTransparent is markTransparent as a dialer's or listener's Control.
func markAndTransparent(network, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = markTransparent(int(fd), len(network) > 0 && network[len(network)-1] == '6')
	})
	return errors.Join(err, serr)
}

// markTransparentReusePort is markAndTransparent with SO_REUSEPORT, for
// the pod listeners of a proxy that hands over to its successor.
func markTransparentReusePort(network, address string, c syscall.RawConn) error {
	if err := markAndTransparent(network, address, c); err != nil {
		return err
	}
	var serr error
	if err := c.Control(func(fd uintptr) { serr = sockopt.ReusePort(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// markTransparent marks a socket as the proxy's and lets it use a
// non-local source address (the client's IP, on the way in). Both need
// CAP_NET_ADMIN; without it the socket is refused.
func markTransparent(fd int, v6 bool) error {
	if err := sockopt.Mark(fd, ambient.InpodMark); err != nil {
		return fmt.Errorf("SO_MARK: %w", err)
	}
	if err := sockopt.Transparent(fd, v6); err != nil {
		return fmt.Errorf("IP_TRANSPARENT: %w", err)
	}
	return nil
}

// ZDS is the proxy as a node agent's client sees it: adds and deletes of
// pods, and the end of the agent's snapshot.
func (p *Proxy) ZDS() zds.Handler { return zdsHandler{p} }

type zdsHandler struct{ p *Proxy }

func (h zdsHandler) Add(uid string, info *zdsapi.WorkloadInfo, ns netns.NsHandle) error {
	return h.p.AddPod(uid, info, ns)
}

// Keep: the agent lost the pod's namespace but the pod lives; if we serve
// it, we go on.
func (h zdsHandler) Keep(string) error { return nil }

func (h zdsHandler) Del(uid string) error { return h.p.RemovePod(uid) }

// SnapshotDone removes pods the agent no longer has; the first makes the
// proxy ready (Options.ZDS).
func (h zdsHandler) SnapshotDone(sent map[string]bool) error {
	defer h.p.zdsSynced.Store(true)
	h.p.mu.Lock()
	var gone []string
	for _, pd := range h.p.pods {
		if !sent[pd.uid] {
			gone = append(gone, pd.uid)
		}
	}
	h.p.mu.Unlock()
	var errs []error
	for _, uid := range gone {
		errs = append(errs, h.p.RemovePod(uid))
	}
	return errors.Join(errs...)
}
