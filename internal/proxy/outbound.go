package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/socks5"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
)

// route is where an outbound connection goes.
type route struct {
	kind      routeKind
	dial      netip.AddrPort // the address to connect to (ip:15008 for HBONE)
	authority netip.AddrPort // HBONE :authority, the target pod ip:port
	dstW      *workload.Workload
	svc       *workload.Service
	expected  []identity.ID
}

type routeKind int

const (
	routeHBONE       routeKind = iota // mesh workload: tunnel
	routeTCP                          // workload not in the mesh: plain TCP
	routePassthrough                  // unknown address: plain TCP to it
)

func (k routeKind) String() string {
	return [...]string{"hbone", "tcp", "passthrough"}[k]
}

// refusal is an outbound connection the proxy will not make, with its
// telemetry flag.
type refusal struct {
	flag string
	msg  string
}

func (r *refusal) Error() string { return r.msg }

// selfPorts are the proxy's own ports: a connection to one of them is a
// loop and is refused.
func (p *Proxy) isSelfPort(port uint16) bool {
	switch port {
	case p.ports.Outbound, p.ports.Inbound, p.ports.HBONE, p.ports.SOCKS,
		ambient.ZtunnelOutboundPort, ambient.ZtunnelInboundPlaintextPort, ambient.ZtunnelInboundPort, ambient.SOCKS5Port:
		return true
	}
	return false
}

// resolve decides where a connection from src to dst goes: a service VIP
// picks an endpoint; a mesh workload is tunnelled; anything else passes
// through as plain TCP.
func (p *Proxy) resolve(ix *workload.Index, src *workload.Workload, dst netip.AddrPort) (route, error) {
	if p.isSelfPort(dst.Port()) {
		return route{}, &refusal{telemetry.FlagConnect, fmt.Sprintf("destination port %d is one of the proxy's own (a loop)", dst.Port())}
	}
	if svc := ix.ServiceByVIP(p.network(), dst.Addr()); svc != nil {
		return p.resolveService(svc, dst.Port(), src)
	}
	if w := ix.WorkloadByAddr(p.network(), dst.Addr()); w != nil {
		if w.Unsupported != "" {
			return route{}, unsupported("workload "+w.Namespace+"/"+w.Name, w.Unsupported)
		}
		return workloadRoute(w, nil, dst.Addr(), dst.Port()), nil
	}
	if svc := ix.ServiceCovering(p.network(), dst.Addr()); svc != nil {
		return route{}, unsupported("service "+svc.Key().String(), svc.Unsupported)
	}
	return route{kind: routePassthrough, dial: dst}, nil
}

// unsupported refuses traffic to a destination that needs what Ambit does
// not implement yet, rather than sending it around (a waypoint would apply
// L7 policy): fail closed, with the reason in the access log and the
// connection counted failed with flag UNSUPPORTED.
func unsupported(what, needs string) *refusal {
	return &refusal{telemetry.FlagUnsupported, what + " needs " + needs + ", which Ambit does not implement yet: refused (fail closed)"}
}

func (p *Proxy) resolveService(svc *workload.Service, port uint16, src *workload.Workload) (route, error) {
	if svc.Unsupported != "" {
		return route{}, unsupported("service "+svc.Key().String(), svc.Unsupported)
	}
	w, target, err := p.pick(svc, port, src)
	if err != nil {
		return route{}, &refusal{telemetry.FlagNoEndpoint, err.Error()}
	}
	if w.Unsupported != "" {
		return route{}, unsupported("workload "+w.Namespace+"/"+w.Name+" (an endpoint of "+svc.Key().String()+")", w.Unsupported)
	}
	ip := w.IPs[0]
	for _, a := range w.IPs { // same family as the VIPs, if it has one
		if len(svc.VIPs) > 0 && a.Is4() == svc.VIPs[0].IP.Is4() {
			ip = a
			break
		}
	}
	return workloadRoute(w, svc, ip, target), nil
}

func workloadRoute(w *workload.Workload, svc *workload.Service, ip netip.Addr, port uint16) route {
	r := route{dstW: w, svc: svc}
	target := netip.AddrPortFrom(ip, port)
	if w.Protocol != workload.ProtocolHBONE {
		r.kind, r.dial = routeTCP, target
		return r
	}
	r.kind = routeHBONE
	r.dial = netip.AddrPortFrom(ip, ambient.ZtunnelInboundPort)
	r.authority = target
	r.expected = []identity.ID{w.Identity()}
	if svc != nil {
		for _, san := range svc.SubjectAltNames {
			if id, err := identity.Parse(san); err == nil {
				r.expected = append(r.expected, id)
			}
		}
	}
	return r
}

// sourceWorkload finds the workload an outbound connection comes from:
// the dedicated one, or the local workload at the source IP.
func (p *Proxy) sourceWorkload(ix *workload.Index, src netip.Addr) (*workload.Workload, error) {
	if w := p.self.Load(); p.opts.Workload != "" {
		return w, nil
	}
	w := p.workloadAt(ix, src)
	if w == nil || !p.isLocal(w) {
		return nil, fmt.Errorf("source %s is not a workload of node %s: refusing a connection with no identity", src, p.opts.Node)
	}
	return w, nil
}

// serveSOCKS handles the explicit way out: SOCKS5 CONNECT to an address or
// a mesh service's name.
func (p *Proxy) serveSOCKS(l net.Listener) {
	p.acceptLoop(l, func(down *net.TCPConn) bool {
		_ = down.SetDeadline(time.Now().Add(10 * time.Second))
		req, err := socks5.Handshake(bufio.NewReader(down), down)
		_ = down.SetDeadline(time.Time{})
		if err != nil {
			p.log.Debug("socks5 handshake failed", "peer", down.RemoteAddr().String(), "err", err)
			return false
		}
		reply := func(code byte, bind netip.AddrPort) { _ = socks5.WriteReply(down, code, bind) }
		ix := p.index.Load()
		dst := req.Addr
		if req.Host != "" {
			svc := p.serviceByName(ix, req.Host)
			if svc == nil || len(svc.VIPs) == 0 {
				reply(socks5.HostUnreachable, netip.AddrPort{})
				p.log.Warn("socks5: not a mesh service", "host", req.Host)
				return false
			}
			dst = netip.AddrPortFrom(svc.VIPs[0].IP, req.Port)
		}
		return p.outbound(down, dst, reply)
	})
}

// serviceByName finds a mesh service by hostname, preferring the source's
// namespace when several namespaces define it.
func (p *Proxy) serviceByName(ix *workload.Index, host string) *workload.Service {
	svcs := ix.ServicesByHost(host)
	if len(svcs) == 0 {
		return nil
	}
	if w := p.self.Load(); w != nil {
		for _, s := range svcs {
			if s.Namespace == w.Namespace {
				return s
			}
		}
	}
	return svcs[0]
}

// serveCaptured handles connections redirected to 15001.
func (p *Proxy) serveCaptured(l net.Listener) {
	p.acceptLoop(l, func(down *net.TCPConn) bool {
		dst, err := originalDst(down)
		if err != nil {
			p.log.Warn("outbound: no original destination", "peer", down.RemoteAddr().String(), "err", err)
			return false
		}
		return p.outbound(down, dst, nil)
	})
}

// outbound carries one application connection to dst. reply, for SOCKS,
// tells the client the outcome before any byte flows. It returns true once
// the connection is handed to the relay, which closes it.
func (p *Proxy) outbound(down *net.TCPConn, dst netip.AddrPort, reply func(byte, netip.AddrPort)) bool {
	ix := p.index.Load()
	from := netip.MustParseAddrPort(down.RemoteAddr().String())
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	oc := &outConn{relayed: relayed{p}, tc: telemetry.Conn{Direction: telemetry.Outbound, Src: from, Dst: dst, Start: time.Now()}}
	tc := &oc.tc
	fail := func(code byte, flag string, err error) {
		if reply != nil {
			reply(code, netip.AddrPort{})
		}
		p.opts.Metrics.Failed(tc, flag)
		telemetry.LogConn(p.alog, tc, 0, 0, flag, err)
	}
	src, err := p.sourceWorkload(ix, from.Addr())
	if err != nil {
		fail(socks5.NotAllowed, telemetry.FlagConnect, err)
		return false
	}
	tc.SrcWorkload, tc.SrcIdentity = src, src.Identity()
	r, err := p.resolve(ix, src, dst)
	if err != nil {
		var rf *refusal
		flag := telemetry.FlagConnect
		if errors.As(err, &rf) {
			flag = rf.flag
		}
		fail(socks5.HostUnreachable, flag, err)
		return false
	}
	tc.DstWorkload, tc.DstService = r.dstW, r.svc
	if r.kind == routeHBONE {
		tc.DstIdentity, tc.DstHBONE, tc.MTLS = r.dstW.Identity(), r.dial, true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := p.dialRoute(ctx, src, from, r)
	cancel()
	if err != nil {
		code, flag := socks5.ConnectionRefused, telemetry.FlagConnect
		switch hbone.StatusCode(err) {
		case http.StatusUnauthorized:
			code, flag = socks5.NotAllowed, telemetry.FlagDeny
		case 0:
			var ne net.Error
			if r.kind == routeHBONE && !errors.As(err, &ne) {
				flag = telemetry.FlagTLSFailure
			}
		}
		fail(code, flag, err)
		return false
	}
	if reply != nil {
		local, _ := netip.ParseAddrPort(down.LocalAddr().String())
		reply(socks5.Succeeded, local)
	}
	p.logOutbound(tc, r, up)
	p.opts.Metrics.Opened(tc)
	app := p.adopt(down)
	if c, ok := up.(*net.TCPConn); ok {
		up = p.adopt(c)
	}
	oc.app, oc.up = app, up
	p.mu.Lock()
	p.out[oc] = struct{}{} // for /config_dump's workloadState
	p.mu.Unlock()
	p.relayAsync(app, up, oc)
	return true
}

// outConn is an outbound connection while it is relayed: one object with
// its telemetry record, the relay's Finisher (see liveConn).
type outConn struct {
	relayed
	tc      telemetry.Conn
	app, up upstream
}

var _ relayedRecord = (*outConn)(nil)

// Finish is the relay's end (relay.Finisher).
func (c *outConn) Finish(res relay.Result) { c.finish(c, res) }

// end closes both sides and reports the connection.
func (c *outConn) end(res relay.Result) {
	c.p.mu.Lock()
	delete(c.p.out, c)
	c.p.mu.Unlock()
	c.up.Close()
	c.app.Close()
	c.p.opts.Metrics.Closed(&c.tc, res.AToB, res.BToA, telemetry.FlagNone)
	telemetry.LogConn(c.p.alog, &c.tc, res.AToB, res.BToA, telemetry.FlagNone, relayErr(res))
}

// relayErr keeps what is worth logging of a relay's end: resets and
// failures, not the ordinary EOFs.
func relayErr(r relay.Result) error {
	err := r.Err()
	if err == nil || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// upstream is the proxy's side of a connection: a TCP socket or an HBONE stream.
type upstream interface {
	relay.Conn
	Close() error
}

// dialRoute connects to the route's destination: an HBONE stream or a TCP
// connection.
func (p *Proxy) dialRoute(ctx context.Context, src *workload.Workload, from netip.AddrPort, r route) (upstream, error) {
	switch r.kind {
	case routeHBONE:
		req := hbone.Request{
			Source:     src.Identity(),
			Expected:   r.expected,
			Address:    r.dial,
			SourceAddr: p.sourceIP(src),
			Authority:  r.authority,
			Header:     http.Header{"Forwarded": {forwarded(from, r.svc)}, "Baggage": {baggage(src)}},
		}
		st, err := p.dialer.Dial(ctx, req)
		if err != nil {
			return nil, err
		}
		return st, nil
	default:
		c, err := p.dialFrom(ctx, p.sourceIP(src), r.dial)
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
}

// sourceIP is the address the proxy dials from: the workload's own, in
// dedicated mode (the listeners' IP) or for an enrolled pod (from inside its
// namespace); otherwise the OS's choice.
func (p *Proxy) sourceIP(src *workload.Workload) netip.Addr {
	if w := p.self.Load(); w != nil {
		return w.IPs[0]
	}
	if p.podAt(src.IPs[0]) != nil {
		return src.IPs[0]
	}
	return netip.Addr{}
}

func forwarded(from netip.AddrPort, svc *workload.Service) string {
	f := hbone.Forwarded{For: from.String()}
	if svc != nil {
		f.Host = svc.Hostname
	}
	return f.String()
}

func baggage(w *workload.Workload) string {
	kind := w.WorkloadType
	if kind == "" {
		kind = "pod"
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	b := hbone.Baggage{
		{Key: "k8s.cluster.name", Value: w.ClusterID},
		{Key: "k8s.namespace.name", Value: w.Namespace},
		{Key: "k8s." + kind + ".name", Value: name},
		{Key: "service.name", Value: w.CanonicalName},
		{Key: "service.version", Value: w.CanonicalRevision},
		{Key: "cloud.region", Value: w.Locality.Region},
		{Key: "cloud.availability_zone", Value: w.Locality.Zone},
	}
	return b.String()
}

// logOutbound tells, at debug level, how a connection left: the events a
// person follows in the lab's hop-by-hop view.
func (p *Proxy) logOutbound(tc *telemetry.Conn, r route, up upstream) {
	if !p.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	p.log.Debug("outbound captured", "src", tc.Src.String(), "src.identity", tc.SrcIdentity.String(), "dst", tc.Dst.String(), "route", r.kind.String())
	st, ok := up.(*hbone.Stream)
	if !ok {
		p.log.Debug("outbound connected over plain TCP", "dst", r.dial.String())
		return
	}
	i := st.Info()
	how := "dialed a new HBONE connection"
	if i.Reused {
		how = "reused a pooled HBONE connection"
	}
	p.log.Debug("outbound "+how, "local", i.LocalAddr.String(), "remote", i.RemoteAddr.String(),
		"tls", i.TLSVersionName()+" "+i.CipherSuiteName(), "peer.identity", i.Peer.String(),
		"connect", r.authority.String(), "status", i.Status, "stream", i.StreamID)
}
