// Package startup assembles a node proxy from Options and runs it: where its
// mesh config comes from (a workload.Source: a watched file or a control
// plane's xDS, the Kubernetes API server next), where its certificates come
// from (an identity.Issuer: a local CA or a remote one), the proxy itself,
// and its helpers (the ZDS client, the memory trimmer) under one errgroup
// with one owner and one end. cmd/ambit only turns flags into Options.
package startup

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/memtrim"
	"github.com/ambitmesh/ambit/internal/proxy"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/xds"
	"github.com/ambitmesh/ambit/internal/zds"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// DefaultSyncTimeout bounds the wait for the source's first complete view.
const DefaultSyncTimeout = 30 * time.Second

// Options say what proxy to run and where its mesh comes from: its config
// from exactly one of Local.ConfigFile, ControlPlane.XDSAddress or Source,
// its certificates from exactly one of Local.CADir, ControlPlane.CAAddress
// or Issuer (ztunnel's LOCAL_XDS_PATH is a local file with the remote CA).
type Options struct {
	// Workload ("namespace/name") dedicates the proxy to one workload; Node
	// serves the workloads of a node. Exactly one is set.
	Workload string
	Node     string
	// ListenIP and ProbeIP: see proxy.Options.
	ListenIP, ProbeIP netip.Addr
	// Self is who the proxy is to the control plane (its xDS node, the
	// clusterid header, its own identity).
	Self Self

	Local        *Local
	ControlPlane *ControlPlane
	// Source and Issuer, set together, are used as they are: a source of
	// another kind (tests; the Kubernetes API server next).
	Source workload.Source
	Issuer identity.Issuer

	CertTTL   time.Duration // workload certificates' lifetime; 0: the issuer's default
	ZDSSocket string        // shared mode: take pods from the node agent here
	// PortReuse opens pod listeners with SO_REUSEPORT, so a new proxy can
	// open them beside the old one during an upgrade (INPOD_PORT_REUSE).
	PortReuse bool
	Network   string // the proxy's network, in shared mode (NETWORK)
	HBONE     hbone.Config
	// PoolMaxStreams bounds the streams per outbound HBONE connection
	// (POOL_MAX_STREAMS_PER_CONNECTION); 0: hbone's default, 100.
	PoolMaxStreams uint32
	// DrainTimeout is how long live connections get to finish once the
	// proxy is told to stop; 0: 5 s (ztunnel's default).
	DrainTimeout time.Duration
	// SyncTimeout bounds the wait for a first complete config; 0: 30 s.
	SyncTimeout time.Duration

	Log      *slog.Logger   // nil: discard
	LogLevel *slog.LevelVar // changed by the admin endpoint; may be nil
	Version  string
}

// Local is a mesh from files: ztunnel's local config (watched) and a CA in
// Istio's plug-in layout. CADir may be empty when a ControlPlane's CA
// signs instead.
type Local struct {
	ConfigFile string
	CADir      string
}

// ControlPlane is a mesh from a control plane (istiod, or `ambit control`):
// delta xDS and the CA, both over TLS, authenticated by the bearer token in
// TokenFile (read on every call: rotation works; none if empty). XDSAddress
// may be empty when Local gives the config.
type ControlPlane struct {
	XDSAddress string
	CAAddress  string
	TokenFile  string
	// RootCert is what xDS (and the CA, unless CARootCert says otherwise)
	// is trusted with: a file, SYSTEM (the system's roots) or the PEM
	// itself, as ztunnel reads XDS_ROOT_CA and CA_ROOT_CA.
	RootCert   string
	CARootCert string
	// The names expected in the servers' certificates; default
	// istiod.istio-system.svc (ALT_XDS_HOSTNAME, ALT_CA_HOSTNAME).
	XDSServerName, CAServerName string
	// More headers on each call (XDS_HEADER_<NAME>, CA_HEADER_<NAME>).
	XDSHeaders, CAHeaders map[string]string
}

// Validate reports the first thing that makes o unusable, by its flag's
// name where it has one.
func (o *Options) Validate() error {
	if (o.Workload == "") == (o.Node == "") {
		return errors.New("set exactly one of --workload NS/NAME or --node NAME")
	}
	config, certs := 0, 0
	if o.Local != nil {
		if o.Local.ConfigFile == "" {
			return errors.New("a local mesh needs --config")
		}
		config++
		if o.Local.CADir != "" {
			certs++
		}
	}
	if c := o.ControlPlane; c != nil {
		if c.XDSAddress != "" {
			config++
		}
		if c.CAAddress != "" {
			certs++
		}
		if c.RootCert == "" {
			return errors.New("a control plane needs --root-cert: what to trust it with")
		}
	}
	if o.Source != nil || o.Issuer != nil {
		if o.Source == nil || o.Issuer == nil {
			return errors.New("startup: Source and Issuer go together")
		}
		config++
		certs++
	}
	switch {
	case config == 0 && certs == 0:
		return errors.New("set one mesh: --config and --ca-dir, or a control plane (--xds-address, --ca-address, --token-file, --root-cert)")
	case config > 1 || certs > 1:
		return errors.New("set one mesh, not two: --config and --ca-dir, or a control plane (--xds-address, --ca-address, --token-file, --root-cert)")
	case config == 0:
		return errors.New("no config: set --config (a local file) or --xds-address (a control plane)")
	case certs == 0:
		return errors.New("no certificates: set --ca-dir (a local CA) or --ca-address (a remote CA)")
	}
	if o.ZDSSocket != "" && o.Node == "" {
		return errors.New("--zds-socket needs --node: in-pod capture serves a node's pods")
	}
	return nil
}

// Run starts the proxy once its source has given a first complete config,
// and runs it until ctx ends or it fails. Nothing is left running after.
func Run(ctx context.Context, o Options) error {
	if err := o.Validate(); err != nil {
		return err
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
		o.Log = log
	}
	metrics := telemetry.NewMetrics(o.Version)
	m, err := o.open(metrics)
	if err != nil {
		return err
	}
	defer m.close()
	certs := identity.NewManager(m.issuer, log)
	defer certs.Close()

	g, gctx := errgroup.WithContext(ctx)
	var views workload.Handoff
	g.Go(func() error { return m.source.Run(gctx, views.Apply) })
	p, err := o.build(gctx, m, &views, certs, metrics)
	if err != nil || p == nil { // nil, nil: the source failed or ctx ended; g has why
		g.Go(func() error { return err })
		return ignoreStopped(g.Wait())
	}
	if o.ZDSSocket != "" {
		zc := &zds.Client{Socket: o.ZDSSocket, Handler: p.ZDS(), Log: log}
		g.Go(func() error { return zc.Run(gctx) })
	}
	g.Go(func() error { (&memtrim.Trimmer{Log: log}).Run(gctx); return nil })
	g.Go(func() error {
		if err := p.Run(gctx); err != nil {
			return err
		}
		return errStopped // a proxy that stopped ends its helpers too
	})
	return ignoreStopped(g.Wait())
}

// build waits for the first complete view and makes the proxy from it; later
// views go to the proxy from then on.
func (o *Options) build(ctx context.Context, m *mesh, views *workload.Handoff, certs *identity.Manager, metrics *telemetry.Metrics) (*proxy.Proxy, error) {
	wait := o.SyncTimeout
	if wait <= 0 {
		wait = DefaultSyncTimeout
	}
	if m.remote {
		o.Log.Info("waiting for the first complete configuration", "from", m.name)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-m.source.Synced():
	case <-ctx.Done():
		return nil, nil
	case <-timer.C:
		return nil, fmt.Errorf("no complete configuration from %s within %v", m.name, wait)
	}
	initial := views.Latest()
	p, err := proxy.New(proxy.Options{
		Workload: o.Workload, Node: o.Node, ListenIP: o.ListenIP, ProbeIP: o.ProbeIP, ZDS: o.ZDSSocket != "",
		PortReuse: o.PortReuse, Network: o.Network, PoolMaxStreams: o.PoolMaxStreams, DrainTimeout: o.DrainTimeout,
		Certs: certs, HBONE: o.HBONE, Log: o.Log, LogLevel: o.LogLevel,
		Metrics: metrics, Version: o.Version,
	}, initial)
	if err != nil {
		return nil, err
	}
	// A view that came after the first (a change, the second xDS type) goes
	// to the proxy now; one it refuses is the source's to report.
	if err := views.Attach(initial, p.SetIndex); err != nil {
		o.Log.Error("config change not applied", "err", err)
	}
	o.Log.Info("ambit proxy starting", "version", o.Version, "source", m.name, "workload", o.Workload, "node", o.Node)
	return p, nil
}

// mesh is an opened source of config and of certificates.
type mesh struct {
	source workload.Source
	issuer identity.Issuer
	name   string // for errors: "the control plane at ...", the file
	remote bool   // the first view may take a while: say that it is awaited
	close  func()
}

// open makes the source and the issuer o names: the certificate-source seam.
// An xDS source counts its messages in metrics.
func (o *Options) open(metrics *telemetry.Metrics) (_ *mesh, err error) {
	if o.Source != nil {
		return &mesh{source: o.Source, issuer: o.Issuer, name: "its source", close: func() {}}, nil
	}
	m := &mesh{close: func() {}}
	var conns []*grpc.ClientConn
	defer func() {
		m.close = func() {
			for _, c := range conns {
				c.Close()
			}
		}
		if err != nil {
			m.close()
		}
	}()
	self := o.Self.withDefaults(o)
	c := o.ControlPlane
	var token func() (string, error)
	if c != nil && c.TokenFile != "" {
		token = caclient.TokenFile(c.TokenFile)
	}
	if o.Local != nil && o.Local.CADir != "" {
		ca, err := identity.LoadCA(o.Local.CADir)
		if err != nil {
			return nil, err
		}
		m.issuer = &identity.LocalIssuer{CA: ca, TTL: o.CertTTL}
	} else {
		roots, err := loadRoots("CA", cmp.Or(c.CARootCert, c.RootCert))
		if err != nil {
			return nil, err
		}
		conn, err := caclient.DialRoots(c.CAAddress, roots, c.CAServerName)
		if err != nil {
			return nil, fmt.Errorf("CA at %s: %w", c.CAAddress, err)
		}
		conns = append(conns, conn)
		m.issuer = &caclient.Issuer{Conn: conn, Token: token, ClusterID: self.ClusterID, Extra: c.CAHeaders, TTL: o.CertTTL, Self: self.Identity()}
	}
	if o.Local != nil {
		m.source, m.name = &config.Watcher{Path: o.Local.ConfigFile, Log: o.Log}, o.Local.ConfigFile
		return m, nil
	}
	roots, err := loadRoots("xDS", c.RootCert)
	if err != nil {
		return nil, err
	}
	node := self.XDSNode()
	hdrs := caclient.Headers{Token: token, ClusterID: self.ClusterID, Extra: c.XDSHeaders}
	conn, err := caclient.DialRoots(c.XDSAddress, roots, c.XDSServerName, grpc.WithPerRPCCredentials(hdrs))
	if err != nil {
		return nil, fmt.Errorf("xDS at %s: %w", c.XDSAddress, err)
	}
	conns = append(conns, conn)
	o.Log.Info("xds node", "id", node.ID, "cluster", self.ClusterID)
	m.source = &xds.Client{Conn: conn, Node: node, Log: o.Log, Observer: metrics}
	m.name, m.remote = "the control plane at "+c.XDSAddress, true
	return m, nil
}

// loadRoots reads what a server is trusted with: a file, SYSTEM (nil: the
// system's roots), or PEM given inline (ztunnel's XDS_ROOT_CA, CA_ROOT_CA).
func loadRoots(what, spec string) (*x509.CertPool, error) {
	if spec == SystemRoots {
		return nil, nil
	}
	data := []byte(spec)
	if !strings.Contains(spec, "-----BEGIN") {
		b, err := os.ReadFile(spec)
		if err != nil {
			return nil, fmt.Errorf("%s root certificate: %w", what, err)
		}
		data = b
	}
	pool, err := caclient.RootPool(data)
	if err != nil {
		return nil, fmt.Errorf("%s root certificate %s: %w", what, rootName(spec), err)
	}
	return pool, nil
}

func rootName(spec string) string {
	if strings.Contains(spec, "-----BEGIN") {
		return "(inline PEM)"
	}
	return spec
}

// errStopped is how the proxy's end reaches the helpers' goroutines.
var errStopped = errors.New("proxy stopped")

func ignoreStopped(err error) error {
	if errors.Is(err, errStopped) {
		return nil
	}
	return err
}
