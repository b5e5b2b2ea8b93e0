package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/sockopt"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
)

// inboundReq is one connection arriving for a local workload, over HBONE
// or in plaintext.
type inboundReq struct {
	src       netip.AddrPort // the client (its pod IP)
	ownPort   bool           // src's port is the client's own, not a tunnel's
	peer      identity.ID    // zero in plaintext
	target    netip.AddrPort // the local workload's ip:port
	hboneAddr netip.AddrPort // where the tunnel arrived, if any
	accept    func() (upstream, error)
	reject    func(status int, reason string)
}

// serveHBONE is the 15008 handler.
func (p *Proxy) serveHBONE(ctx context.Context, r *hbone.ServerRequest) {
	src := netip.AddrPortFrom(r.RemoteAddr.Addr(), r.RemoteAddr.Port())
	ownPort := false
	if f, err := hbone.ForwardedFor(r.Header.Get("forwarded")); err == nil && f.Addr() == src.Addr() {
		src, ownPort = f, true // the client's own port, when the tunnel came from its IP
	}
	ix := p.index.Load()
	if r.LocalAddr.Addr() != r.Authority.Addr() && p.workloadAt(ix, r.LocalAddr.Addr()) != nil {
		_ = r.Reject(http.StatusBadRequest, fmt.Sprintf("authority %s is not the address the tunnel was opened to (%s)", r.Authority, r.LocalAddr.Addr()))
		return
	}
	p.inbound(ctx, inboundReq{
		src: src, ownPort: ownPort, peer: r.Peer, target: r.Authority, hboneAddr: r.LocalAddr,
		accept: func() (upstream, error) {
			st, err := r.Accept(nil)
			if err == nil {
				r.Detach() // the relay owns the stream from here
			}
			return st, err
		},
		reject: func(status int, reason string) { _ = r.Reject(status, reason) },
	})
}

// servePlaintextInbound is the 15006 listener: clients outside the mesh,
// redirected; policy runs with no identity.
func (p *Proxy) servePlaintextInbound(l net.Listener) {
	p.acceptLoop(l, func(down *net.TCPConn) bool {
		dst, err := originalDst(down)
		if err != nil {
			p.log.Warn("inbound: no original destination", "peer", down.RemoteAddr().String(), "err", err)
			return false
		}
		if p.isSelfPort(dst.Port()) {
			p.log.Warn("inbound: connection to the proxy's own port refused", "peer", down.RemoteAddr().String(), "dst", dst.String())
			return false
		}
		src := netip.MustParseAddrPort(down.RemoteAddr().String())
		return p.inbound(context.Background(), inboundReq{
			// Not ownPort: the captured connection itself holds the client's
			// address and port here, in the namespace the app is in; a
			// socket of ours from them would take the app's answers meant for it.
			src: netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), target: dst,
			accept: func() (upstream, error) { return p.adopt(down), nil },
			reject: func(int, string) { _ = down.SetLinger(0) }, // close with RST
		})
	})
}

// inbound checks the destination and policy, connects to the application
// and relays until both sides end (or a policy change closes it). It
// returns true once the connection is handed to the relay, which closes it.
func (p *Proxy) inbound(ctx context.Context, in inboundReq) bool {
	ix := p.index.Load()
	lc := &liveConn{relayed: relayed{p}, tc: telemetry.Conn{Direction: telemetry.Inbound, Src: in.src, SrcIdentity: in.peer, Dst: in.target,
		DstHBONE: in.hboneAddr, MTLS: !in.peer.IsZero(), Start: time.Now()}}
	tc := &lc.tc
	tc.SrcWorkload = ix.WorkloadByAddr(p.network(), in.src.Addr())
	fail := func(status int, flag string, err error) {
		in.reject(status, err.Error())
		p.opts.Metrics.Failed(tc, flag)
		telemetry.LogConn(p.alog, tc, 0, 0, flag, err)
	}
	dst := p.workloadAt(ix, in.target.Addr())
	if dst == nil || !p.isLocal(dst) {
		fail(http.StatusServiceUnavailable, telemetry.FlagConnect, fmt.Errorf("no local workload at %s", in.target.Addr()))
		return false
	}
	tc.DstWorkload, tc.DstIdentity = dst, dst.Identity()
	if dst.Unsupported != "" {
		// Its waypoint (say) would apply policy Ambit cannot: not around it.
		fail(http.StatusServiceUnavailable, telemetry.FlagUnsupported, unsupported("workload "+dst.Namespace+"/"+dst.Name, dst.Unsupported))
		return false
	}
	ac := authz.Conn{Source: in.src, Destination: in.target, SourceID: in.peer}
	d := authz.Evaluate(ix.PoliciesFor(dst), ac)
	if len(d.DryRun) > 0 {
		p.log.Info("dry-run policy matched", "policies", d.DryRun, "src", in.src.String(), "src.identity", in.peer.String(), "dst", in.target.String())
	}
	if !d.Allow {
		fail(http.StatusUnauthorized, telemetry.FlagDeny, fmt.Errorf("denied: %s", d.Reason))
		return false
	}
	debug := p.log.Enabled(ctx, slog.LevelDebug) // the arguments below are strings made per connection
	if debug {
		p.log.Debug("inbound policy allows", "src", in.src.String(), "src.identity", in.peer.String(), "dst", in.target.String(), "reason", d.Reason)
	}
	// ctx ends when an HBONE stream is reset: its dial ends with it.
	if err := ctx.Err(); err != nil {
		fail(http.StatusServiceUnavailable, telemetry.FlagConnect, fmt.Errorf("gone before the connect to %s: %w", in.target, err))
		return false
	}
	key := dialKeyOf(&in)
	if err := p.dials.acquire(key); err != nil {
		fail(http.StatusServiceUnavailable, telemetry.FlagConnect, fmt.Errorf("connect to %s refused: %w", in.target, err))
		return false
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	from := in.src
	if !in.ownPort {
		from = netip.AddrPortFrom(in.src.Addr(), 0)
	}
	up, err := p.dialApp(dctx, from, in.target)
	cancel()
	p.dials.release(key)
	if err != nil {
		fail(http.StatusServiceUnavailable, telemetry.FlagConnect, fmt.Errorf("connect to %s: %w", in.target, err))
		return false
	}
	if debug {
		p.log.Debug("inbound upstream connected", "from", localAddr(up), "to", in.target.String())
	}
	down, err := in.accept()
	if err != nil {
		up.Close()
		p.opts.Metrics.Failed(tc, telemetry.FlagConnect)
		telemetry.LogConn(p.alog, tc, 0, 0, telemetry.FlagConnect, err)
		return false
	}
	lc.down, lc.up = down, up
	p.track(lc)
	p.opts.Metrics.Opened(tc)
	p.relayAsync(down, up, lc)
	return true
}

// dialApp connects to the application from the client's own IP, so the
// app sees who called (the seed's last hop), and from the client's own port
// when it is known (see withClientPort). That needs the address to be
// bindable: any 127.x on loopback, or any address with IP_TRANSPARENT
// (CAP_NET_ADMIN) and capture's routing. Where it is not, the proxy
// connects from its own address and says so once.
func (p *Proxy) dialApp(ctx context.Context, client, target netip.AddrPort) (upstream, error) {
	if pd := p.podAt(target.Addr()); pd != nil {
		// In the pod's namespace, marked and transparent: the app sees the
		// client's IP, and capture routes its answers back to us.
		return withClientPort(client, func(from netip.AddrPort) (upstream, error) {
			// Returned apart on an error: not a nil pointer in a non-nil upstream.
			if p.poller != nil {
				s, err := pd.dialSocket(ctx, p.poller, from, target)
				if err != nil {
					return nil, err
				}
				return s, nil
			}
			c, err := pd.dial(ctx, from, target)
			if err != nil {
				return nil, err
			}
			return c, nil
		})
	}
	if client.IsValid() && client.Addr() != target.Addr() && client.Addr().Is4() == target.Addr().Is4() {
		c, err := withClientPort(client, func(from netip.AddrPort) (*net.TCPConn, error) {
			d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(from), Control: transparent}
			c, err := d.DialContext(ctx, "tcp", target.String())
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		})
		if err == nil {
			return p.adopt(c), nil
		}
		if !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.EADDRINUSE) {
			return nil, err // the app itself is unreachable
		}
		p.warned.Do(func() {
			p.log.Info("cannot connect to applications from the client's IP here; using the proxy's own address", "client", client.Addr().String(), "err", err)
		})
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", target.String())
	if err != nil {
		return nil, err
	}
	return p.adopt(c.(*net.TCPConn)), nil
}

// localAddr is where a connection to an app comes from, for a debug log.
func localAddr(up upstream) string {
	switch c := up.(type) {
	case *relay.Socket:
		return c.LocalAddr().String()
	case net.Conn:
		return c.LocalAddr().String()
	}
	return "?"
}

// withClientPort dials from the client's own port when it is known, and
// from any port of the client's address when that fails because the port
// is taken where the app is (the client used it for another destination
// behind this proxy, a connection in TIME_WAIT holds the four-tuple, or the
// app listens on it). The app then sees the connection as the client made
// it; and the kernel need not search for a port: with a port left to
// connect (IP_BIND_ADDRESS_NO_PORT), it walks the ports already used from
// that address to that destination, which with 10,000 connections from
// one client pod to one server took up to 49 ms per connect, each holding
// a thread (28–33 threads after the burst, against 10 on the client side).
func withClientPort[C any](client netip.AddrPort, dial func(from netip.AddrPort) (C, error)) (C, error) {
	if client.Port() != 0 {
		c, err := dial(client)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			return c, err
		}
	}
	return dial(netip.AddrPortFrom(client.Addr(), 0))
}

// transparent asks for IP_TRANSPARENT, which lets a socket bind an address
// that is not local; without the privilege it is skipped, and a bind to a
// local address (loopback) still works.
func transparent(network, address string, c syscall.RawConn) error {
	return c.Control(func(fd uintptr) {
		_ = sockopt.Transparent(int(fd), strings.HasSuffix(network, "6"))
		_ = sockopt.ReuseAddr(int(fd))    // the client's port, as in dialSetup
		_ = sockopt.NoPortAtBind(int(fd)) // when it binds the client's address with port 0
	})
}

// authzConn is what policy judges the connection by: the same fields its
// telemetry record holds, so they are not kept twice.
func (c *liveConn) authzConn() authz.Conn {
	return authz.Conn{Source: c.tc.Src, Destination: c.tc.Dst, SourceID: c.tc.SrcIdentity}
}

// close ends the connection early (a policy change, shutdown); reason
// goes into its access log and metrics.
func (c *liveConn) close(reason string) {
	c.mu.Lock()
	c.late = reason
	c.mu.Unlock()
	c.down.Close()
	c.up.Close()
}

// Finish is the relay's end (relay.Finisher).
func (c *liveConn) Finish(res relay.Result) { c.finish(c, res) }

// end ends the connection once the relay has: account and log it.
func (c *liveConn) end(res relay.Result) {
	c.p.untrack(c)
	c.up.Close()
	c.down.Close()
	// Bytes "sent" are those toward the destination application.
	flag, rerr := telemetry.FlagNone, relayErr(res)
	c.mu.Lock()
	if c.late != "" {
		flag, rerr = telemetry.FlagPolicyClose, errors.New(c.late)
	}
	c.mu.Unlock()
	c.p.opts.Metrics.Closed(&c.tc, res.AToB, res.BToA, flag)
	telemetry.LogConn(c.p.alog, &c.tc, res.AToB, res.BToA, flag, rerr)
}

func (p *Proxy) track(c *liveConn) {
	p.mu.Lock()
	p.live[c] = struct{}{}
	p.mu.Unlock()
}

func (p *Proxy) untrack(c *liveConn) {
	p.mu.Lock()
	delete(p.live, c)
	p.mu.Unlock()
}

// recheckInbound closes live inbound connections the new index's policies
// deny (or whose workload is gone).
func (p *Proxy) recheckInbound(ix *workload.Index) {
	p.mu.Lock()
	var doomed []*liveConn
	var reasons []string
	for c := range p.live {
		w := ix.WorkloadByUID(c.tc.DstWorkload.UID)
		if w == nil {
			doomed, reasons = append(doomed, c), append(reasons, "destination workload removed from the config")
			continue
		}
		if d := authz.Evaluate(ix.PoliciesFor(w), c.authzConn()); !d.Allow {
			doomed, reasons = append(doomed, c), append(reasons, "closed by a policy change: "+d.Reason)
		}
	}
	p.mu.Unlock()
	for i, c := range doomed {
		p.log.Info("closing a live connection", "src", c.tc.Src.String(), "dst", c.tc.Dst.String(), "reason", reasons[i])
		c.close(reasons[i])
	}
}

// closeInbound closes every live inbound connection (shutdown).
func (p *Proxy) closeInbound(reason string) {
	p.mu.Lock()
	all := slices.Collect(maps.Keys(p.live))
	p.mu.Unlock()
	for _, c := range all {
		c.close(reason)
	}
}
