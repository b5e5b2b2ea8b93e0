// Package proxy is the node proxy: it takes workloads' outbound TCP (captured
// on 15001, or asked for on SOCKS5 15080), carries it to the destination's
// node over HBONE (or plain TCP where the destination is not in the mesh),
// and on the way in (15008 HBONE, 15006 plaintext) checks policy and hands
// the bytes to the application. It reads the mesh from a workload.Index that
// its owner swaps in with SetIndex.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/listener"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
)

// Ports the proxy listens on; zero fields take Istio's numbers.
type Ports struct {
	Outbound uint16 // 15001: captured outbound, original destination from SO_ORIGINAL_DST
	Inbound  uint16 // 15006: plaintext inbound from outside the mesh
	HBONE    uint16 // 15008: HBONE inbound
	SOCKS    uint16 // 15080: SOCKS5, the explicit way out without capture
	Admin    uint16 // 15000: config dump, log level, pprof
	Metrics  uint16 // 15020: Prometheus
	Ready    uint16 // 15021: readiness
}

func (p Ports) withDefaults() Ports {
	def := func(v *uint16, d uint16) {
		if *v == 0 {
			*v = d
		}
	}
	def(&p.Outbound, ambient.ZtunnelOutboundPort)
	def(&p.Inbound, ambient.ZtunnelInboundPlaintextPort)
	def(&p.HBONE, ambient.ZtunnelInboundPort)
	def(&p.SOCKS, ambient.SOCKS5Port)
	def(&p.Admin, ambient.AdminPort)
	def(&p.Metrics, ambient.StatsPort)
	def(&p.Ready, ambient.ReadinessPort)
	return p
}

// DefaultDrainTimeout is how long live connections get to finish when the
// proxy stops, unless Options say otherwise (ztunnel's default, 5 s).
const DefaultDrainTimeout = 5 * time.Second

// Options configure a Proxy. Exactly one of Workload and Node is set.
type Options struct {
	// Workload ("namespace/name") runs the proxy dedicated to one workload:
	// every listener binds to that workload's IP. This is how several
	// "nodes" share one machine without root.
	Workload string
	// Node runs the proxy for all workloads of a node (shared mode).
	Node string
	// ListenIP is where a shared proxy listens until capture gives it
	// per-pod listeners; default 127.0.0.1. Ignored in dedicated mode.
	ListenIP netip.Addr
	// AdminIP is where admin, metrics and readiness listen: default
	// 127.0.0.1, or the workload's IP in dedicated mode.
	AdminIP netip.Addr
	// ZDS says pods come from a node agent over ZDS: the proxy is not
	// ready before the agent's first snapshot (ztunnel's rule: a pod
	// enrolled before then would find no one serving it).
	ZDS bool
	// ProbeIP, if set, is where readiness and metrics listen instead (the
	// kubelet's probes and Prometheus reach the pod's IP; the admin port,
	// with its config dump, stays local, as ztunnel keeps it).
	ProbeIP netip.Addr
	Ports   Ports
	// PortReuse opens pod listeners with SO_REUSEPORT: during an upgrade
	// the new proxy opens them beside the old one's, which stops
	// accepting and drains (ztunnel's INPOD_PORT_REUSE).
	PortReuse bool
	// Network is the shared proxy's network (a dedicated proxy's is its
	// workload's): the one its pods' addresses are looked up on.
	Network string
	// PoolMaxStreams bounds the streams per outbound HBONE connection;
	// 0: HBONE.MaxStreams (the server's advertised limit is not changed).
	PoolMaxStreams uint32
	// DrainTimeout is how long live connections get to finish once Run's
	// context ends (after GOAWAY); 0: 5 s.
	DrainTimeout time.Duration

	Certs *identity.Manager
	HBONE hbone.Config
	// MaxDials bounds the connections to applications being set up at
	// once, for the whole proxy and for one peer (its identity, or its
	// address in plaintext); a connection beyond either is answered 503
	// at once. Defaults 1,024 and 256: a peer that opens and resets
	// streams, or calls an app that never answers, cannot hold all of them.
	MaxDials     int
	MaxPeerDials int
	Log          *slog.Logger       // nil: discard
	AccessLog    *slog.Logger       // nil: Log
	LogLevel     *slog.LevelVar     // changed by the admin /logging endpoint; may be nil
	Metrics      *telemetry.Metrics // may be nil
	Version      string
}

// Proxy is one running node proxy.
type Proxy struct {
	opts  Options
	ports Ports
	log   *slog.Logger
	alog  *slog.Logger

	index  atomic.Pointer[workload.Index]
	self   atomic.Pointer[workload.Workload] // dedicated mode: the workload served
	dialer *hbone.Dialer
	server *hbone.Server
	poller *relay.Poller // idle sockets wait here, not in goroutines; nil: goroutines (set by Run)
	dials  dialLimits
	health listener.Health // the listeners that cannot accept now, for readiness
	// zdsSynced: the node agent's first snapshot is in (see Options.ZDS).
	zdsSynced atomic.Bool

	rndMu sync.Mutex
	rnd   *rand.Rand

	mu      sync.Mutex
	pods    map[netip.Addr]*pod // enrolled pods by IP (in-pod capture)
	live    map[*liveConn]struct{}
	out     map[*outConn]struct{} // outbound connections being relayed (/config_dump, the drain)
	tracked map[identity.ID]bool
	warned  sync.Once // the dedicated-mode source-IP fallback, said once

	quit     chan struct{} // closed by /quitquitquit: Run ends as when its context does
	quitOnce sync.Once

	wg sync.WaitGroup
}

// liveConn is an inbound connection policy may close later: one object
// holds what its early close and its end need, its telemetry record
// included, and is the relay's Finisher (10,000 idle connections hold
// 10,000 of them; the record apart, the closures and separately captured
// variables were six more allocations each, and the small ones shared size
// classes with the set-up's garbage, which kept its spans from being freed).
type liveConn struct {
	relayed
	tc   telemetry.Conn // also what policy judges it by (authzConn)
	down upstream
	up   upstream

	mu   sync.Mutex
	late string // why it was closed early, if it was
}

var _ relayedRecord = (*liveConn)(nil)

// New checks the options and builds a proxy over an initial index.
func New(opts Options, ix *workload.Index) (*Proxy, error) {
	if (opts.Workload == "") == (opts.Node == "") {
		return nil, errors.New("proxy: set exactly one of a workload (dedicated mode) or a node (shared mode)")
	}
	if opts.Certs == nil {
		return nil, errors.New("proxy: no certificate manager")
	}
	if ix == nil {
		return nil, errors.New("proxy: no index")
	}
	p := &Proxy{
		dials:   newDialLimits(opts.MaxDials, opts.MaxPeerDials),
		opts:    opts,
		ports:   opts.Ports.withDefaults(),
		log:     opts.Log,
		alog:    opts.AccessLog,
		rnd:     rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		live:    map[*liveConn]struct{}{},
		out:     map[*outConn]struct{}{},
		pods:    map[netip.Addr]*pod{},
		tracked: map[identity.ID]bool{},
		quit:    make(chan struct{}),
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.alog == nil {
		p.alog = p.log
	}
	if err := p.SetIndex(ix); err != nil {
		return nil, err
	}
	dialCfg := opts.HBONE
	if opts.PoolMaxStreams > 0 {
		dialCfg.MaxStreams = opts.PoolMaxStreams
	}
	p.dialer = &hbone.Dialer{Certs: opts.Certs, Config: dialCfg, Log: p.log, DialTCP: p.dialFrom}
	p.server = &hbone.Server{
		GetCertificate: p.certificateFor,
		Handler:        hbone.HandlerFunc(p.serveHBONE),
		Config:         opts.HBONE,
		Log:            p.log,
	}
	opts.Metrics.CountPods(p.podCounts)
	return p, nil
}

// Index is the mesh as the proxy sees it now.
func (p *Proxy) Index() *workload.Index { return p.index.Load() }

// SetIndex swaps in a new view of the mesh: local workloads' certificates
// are fetched ahead, and live inbound connections that the new policies
// deny are closed. In dedicated mode the workload must still exist.
func (p *Proxy) SetIndex(ix *workload.Index) error {
	if p.opts.Workload != "" {
		w := findByName(ix, p.opts.Workload)
		if w == nil {
			return fmt.Errorf("proxy: workload %s is not in the config", p.opts.Workload)
		}
		if cur := p.self.Load(); cur != nil && cur.IPs[0] != w.IPs[0] {
			return fmt.Errorf("proxy: workload %s moved from %s to %s; restart the proxy to follow it", p.opts.Workload, cur.IPs[0], w.IPs[0])
		}
		p.self.Store(w)
	}
	p.index.Store(ix)
	p.trackCertificates(ix)
	p.recheckInbound(ix)
	return nil
}

func findByName(ix *workload.Index, nsName string) *workload.Workload {
	for _, w := range ix.Workloads() {
		if w.Namespace+"/"+w.Name == nsName {
			return w
		}
	}
	return nil
}

// local lists the workloads this proxy serves.
func (p *Proxy) local(ix *workload.Index) []*workload.Workload {
	if w := p.self.Load(); p.opts.Workload != "" && w != nil {
		return []*workload.Workload{w}
	}
	return ix.WorkloadsOnNode(p.opts.Node)
}

func (p *Proxy) isLocal(w *workload.Workload) bool {
	if self := p.self.Load(); p.opts.Workload != "" {
		return self != nil && w.UID == self.UID
	}
	return w.Node == p.opts.Node
}

// trackCertificates keeps a certificate for every local HBONE workload and
// drops those no longer local.
func (p *Proxy) trackCertificates(ix *workload.Index) {
	want := map[identity.ID]bool{}
	for _, w := range p.local(ix) {
		if w.Protocol == workload.ProtocolHBONE {
			want[w.Identity()] = true
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for id := range want {
		if !p.tracked[id] {
			p.opts.Certs.Track(id)
		}
	}
	for id := range p.tracked {
		if !want[id] {
			p.opts.Certs.Forget(id)
		}
	}
	p.tracked = want
}

// Ready reports whether config is loaded, every local HBONE workload has
// its certificate and every listener can accept; if not, why.
func (p *Proxy) Ready() (bool, string) {
	if failing, why := p.health.Failing(); failing {
		return false, why
	}
	if p.opts.ZDS && !p.zdsSynced.Load() {
		return false, "waiting for the node agent's snapshot (ZDS)"
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for id := range p.tracked {
		if p.opts.Certs.Current(id) == nil {
			return false, "waiting for the certificate of " + id.String()
		}
	}
	return true, "ready"
}

// certificateFor picks the certificate the HBONE server presents: that of
// the local workload the connection was addressed to.
func (p *Proxy) certificateFor(ctx context.Context, local netip.Addr) (*identity.Certificate, error) {
	ix := p.index.Load()
	w := p.workloadAt(ix, local)
	if w == nil || !p.isLocal(w) {
		return nil, fmt.Errorf("no local workload at %s", local)
	}
	return p.opts.Certs.Get(ctx, w.Identity())
}

// workloadAt finds the workload at ip on the local network.
func (p *Proxy) workloadAt(ix *workload.Index, ip netip.Addr) *workload.Workload {
	return ix.WorkloadByAddr(p.network(), ip)
}

func (p *Proxy) network() string {
	if w := p.self.Load(); w != nil {
		return w.Network
	}
	return p.opts.Network
}

// listenIP is where the data-path listeners bind.
func (p *Proxy) listenIP() netip.Addr {
	if w := p.self.Load(); w != nil {
		return w.IPs[0]
	}
	if p.opts.ListenIP.IsValid() {
		return p.opts.ListenIP
	}
	return netip.MustParseAddr("127.0.0.1")
}

func (p *Proxy) adminIP() netip.Addr {
	if p.opts.AdminIP.IsValid() {
		return p.opts.AdminIP
	}
	if w := p.self.Load(); w != nil {
		return w.IPs[0]
	}
	return netip.MustParseAddr("127.0.0.1")
}

func (p *Proxy) probeIP() netip.Addr {
	if p.opts.ProbeIP.IsValid() {
		return p.opts.ProbeIP
	}
	return p.adminIP()
}

// Run opens every listener and serves until ctx ends, then drains: HBONE
// connections get GOAWAY, live connections are given a moment to finish.
func (p *Proxy) Run(ctx context.Context) error {
	if pl, err := relay.NewPoller(); err != nil {
		p.log.Warn("idle connections will each hold a goroutine", "err", err)
	} else {
		p.poller = pl
	}
	ip := p.listenIP()
	type spec struct {
		name  string
		port  uint16
		ip    netip.Addr
		serve func(net.Listener)
	}
	specs := []spec{
		{"hbone", p.ports.HBONE, ip, func(l net.Listener) { _ = p.server.Serve(l) }},
		{"socks5", p.ports.SOCKS, ip, p.serveSOCKS},
		{"outbound", p.ports.Outbound, ip, p.serveCaptured},
		{"inbound", p.ports.Inbound, ip, p.servePlaintextInbound},
		{"admin", p.ports.Admin, p.adminIP(), p.serveAdmin},
		{"metrics", p.ports.Metrics, p.probeIP(), p.serveMetrics},
		{"readiness", p.ports.Ready, p.probeIP(), p.serveReady},
	}
	var ls []net.Listener
	closeAll := func() {
		for _, l := range ls {
			l.Close()
		}
	}
	for _, s := range specs {
		l, err := net.Listen("tcp", netip.AddrPortFrom(s.ip, s.port).String())
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: %s listener: %w", s.name, err)
		}
		ls = append(ls, p.guard(l, s.name))
		p.log.Info("listening", "listener", s.name, "addr", l.Addr().String())
	}
	for i, s := range specs {
		l := ls[i]
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			s.serve(l)
		}()
	}
	select {
	case <-ctx.Done():
	case <-p.quit:
	}
	p.log.Info("stopping: listeners closed, HBONE connections told GOAWAY, live connections drained", "drain", p.drainTimeout().String())
	closeAll()
	p.removeAllPods()
	shutCtx, cancel := context.WithTimeout(context.Background(), p.drainTimeout())
	defer cancel()
	_ = p.server.Shutdown(shutCtx)
	// The relays HBONE's streams do not count (captured outbound, plain
	// TCP inbound) get the rest of the deadline too: an upgrade resets no
	// connection that finishes within it.
	p.waitRelays(shutCtx)
	p.closeInbound("proxy shutting down")
	p.dialer.Close()
	if p.poller != nil {
		p.poller.Close() // ends the relays whose sockets wait in it
	}
	p.wg.Wait()
	return nil
}

func (p *Proxy) drainTimeout() time.Duration {
	if p.opts.DrainTimeout > 0 {
		return p.opts.DrainTimeout
	}
	return DefaultDrainTimeout
}

// guard wraps a listener of the proxy's so that its accept loop survives
// running out of descriptors (see listener.Guard) and readiness says when
// it cannot accept. The readiness listener's shed connections are told
// 503 with the reason rather than reset: a probe then reads "not ready".
func (p *Proxy) guard(l net.Listener, name string) *listener.Guarded {
	o := listener.Options{Name: name, Log: p.log, Health: &p.health}
	if name == "readiness" {
		o.Shed = p.shedReadiness
	}
	return listener.Guard(l, o)
}

// shedReadiness answers a readiness probe accepted with the reserve
// descriptor: 503 and why. The request is read first (briefly), so that
// closing does not reset the answer away.
func (p *Proxy) shedReadiness(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
	var buf [2048]byte
	_, _ = c.Read(buf[:])
	_, why := p.Ready()
	if why == "ready" {
		why = "out of descriptors"
	}
	why += "\n"
	fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(why), why)
}

// acceptLoop accepts until the listener closes and serves each connection
// in a goroutine owned by the proxy. serve returns true when it handed the
// connection on (to a relay, which closes it); otherwise it is closed here.
// The listener is guarded: Accept fails only once it is closed.
func (p *Proxy) acceptLoop(l net.Listener, serve func(*net.TCPConn) bool) {
	for {
		c, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Error("accept loop ended", "addr", l.Addr().String(), "err", err)
			}
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if !serve(c.(*net.TCPConn)) {
				c.Close()
			}
		}()
	}
}

// relayAsync copies between down and up, owned by the proxy, and calls
// rec's Finish when both directions have ended. The goroutine that set the
// connection up returns: its stack, grown by the dial and the handshake,
// does not live as long as the connection, and a direction with nothing to
// copy holds no goroutine at all (a relay.Socket's). Closing down or up
// ends the relay.
func (p *Proxy) relayAsync(down, up relay.Conn, rec relayedRecord) {
	p.wg.Add(1)
	relay.GoFinisher(down, up, rec)
}

// relayedRecord is the record of a connection the proxy relays: the
// relay's Finisher, which is relayed.finish of its own end.
type relayedRecord interface {
	relay.Finisher
	end(relay.Result)
}

// relayed is embedded by every relayed connection's record, in place of
// the proxy pointer the record needs anyway (no byte more per connection).
// Its finish is the one place that runs a record's end and then, last,
// releases the proxy's WaitGroup (Run waits for it): a record's Finish is
// one call to it, where a closure wrapping the two would be one more
// allocation kept per connection.
type relayed struct {
	p *Proxy
}

func (r relayed) finish(rec relayedRecord, res relay.Result) {
	defer r.p.wg.Done()
	rec.end(res)
}

// relaying counts the connections being relayed: every one is in live
// (inbound) or out (outbound) from before its relay starts until its end.
func (p *Proxy) relaying() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.live) + len(p.out)
}

// waitRelays waits until no connection is relayed, or ctx ends. It polls
// (as hbone.Server.Shutdown does): a drain happens once per process, and a
// per-connection signal would cost every connection.
func (p *Proxy) waitRelays(ctx context.Context) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for p.relaying() > 0 {
		select {
		case <-ctx.Done():
			p.log.Warn("drain deadline passed; closing the connections still open", "open", p.relaying())
			return
		case <-tick.C:
		}
	}
}

// adopt hands an application socket to the proxy's poller for relaying
// (relay.Socket: ~900 bytes less per connection than a *net.TCPConn, and
// no goroutine while idle). Without a poller, or if the poller cannot take
// it (out of descriptors for the duplicate), the TCPConn is relayed as it
// is. Use only the result afterwards.
func (p *Proxy) adopt(c *net.TCPConn) upstream {
	if p.poller == nil {
		return c
	}
	s, err := p.poller.Adopt(c)
	if err != nil {
		p.log.Debug("socket relayed by a goroutine per direction", "err", err)
		return c
	}
	return s
}

func (p *Proxy) pick(svc *workload.Service, port uint16, src *workload.Workload) (*workload.Workload, uint16, error) {
	p.rndMu.Lock()
	defer p.rndMu.Unlock()
	return p.index.Load().Pick(svc, port, src, p.rnd)
}
