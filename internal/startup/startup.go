// Package startup assembles a node proxy from Options and runs it: where its
// mesh config comes from (a workload.Source: a watched file or a control
// plane's xDS, the Kubernetes API server next), where its certificates come
// from (an identity.Issuer: a local CA or a remote one), the proxy itself,
// and its helpers (the ZDS client, the memory trimmer) under one errgroup
// with one owner and one end. cmd/ambit only turns flags into Options.
package startup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
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

// Options say what proxy to run and where its mesh comes from. The mesh is
// exactly one of Local, ControlPlane, or Source with Issuer.
type Options struct {
	// Workload ("namespace/name") dedicates the proxy to one workload; Node
	// serves the workloads of a node. Exactly one is set.
	Workload string
	Node     string
	// ListenIP and ProbeIP: see proxy.Options.
	ListenIP, ProbeIP netip.Addr

	Local        *Local
	ControlPlane *ControlPlane
	// Source and Issuer, set together, are used as they are: a source of
	// another kind (tests; the Kubernetes API server next).
	Source workload.Source
	Issuer identity.Issuer

	CertTTL   time.Duration // workload certificates' lifetime; 0: the issuer's default
	ZDSSocket string        // shared mode: take pods from the node agent here
	HBONE     hbone.Config
	// SyncTimeout bounds the wait for a first complete config; 0: 30 s.
	SyncTimeout time.Duration

	Log      *slog.Logger   // nil: discard
	LogLevel *slog.LevelVar // changed by the admin endpoint; may be nil
	Version  string
}

// Local is a mesh from files: ztunnel's local config (watched) and a CA in
// Istio's plug-in layout.
type Local struct {
	ConfigFile string
	CADir      string
}

// ControlPlane is a mesh from a control plane (istiod, or `ambit control`):
// delta xDS and the CA, both over TLS trusting RootCert, authenticated by
// the bearer token in TokenFile (read on every call: rotation works).
type ControlPlane struct {
	XDSAddress string
	CAAddress  string
	TokenFile  string
	RootCert   string
}

// Validate reports the first thing that makes o unusable, by its flag's
// name where it has one.
func (o *Options) Validate() error {
	if (o.Workload == "") == (o.Node == "") {
		return errors.New("set exactly one of --workload NS/NAME or --node NAME")
	}
	n := 0
	if o.Local != nil {
		n++
		if o.Local.ConfigFile == "" || o.Local.CADir == "" {
			return errors.New("a local mesh needs --config and --ca-dir together")
		}
	}
	if c := o.ControlPlane; c != nil {
		n++
		if c.XDSAddress == "" || c.CAAddress == "" || c.TokenFile == "" || c.RootCert == "" {
			return errors.New("a control plane needs --xds-address, --ca-address, --token-file and --root-cert together")
		}
	}
	if o.Source != nil || o.Issuer != nil {
		n++
		if o.Source == nil || o.Issuer == nil {
			return errors.New("startup: Source and Issuer go together")
		}
	}
	if n != 1 {
		return errors.New("set one mesh: --config and --ca-dir, or a control plane (--xds-address, --ca-address, --token-file, --root-cert)")
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
	m, err := o.open()
	if err != nil {
		return err
	}
	defer m.close()
	certs := identity.NewManager(m.issuer, log)
	defer certs.Close()

	g, gctx := errgroup.WithContext(ctx)
	var views workload.Handoff
	g.Go(func() error { return m.source.Run(gctx, views.Apply) })
	p, err := o.build(gctx, m, &views, certs)
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
func (o *Options) build(ctx context.Context, m *mesh, views *workload.Handoff, certs *identity.Manager) (*proxy.Proxy, error) {
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
		Certs: certs, HBONE: o.HBONE, Log: o.Log, LogLevel: o.LogLevel,
		Metrics: telemetry.NewMetrics(o.Version), Version: o.Version,
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
func (o *Options) open() (*mesh, error) {
	switch {
	case o.Local != nil:
		ca, err := identity.LoadCA(o.Local.CADir)
		if err != nil {
			return nil, err
		}
		return &mesh{
			source: &config.Watcher{Path: o.Local.ConfigFile, Log: o.Log},
			issuer: &identity.LocalIssuer{CA: ca, TTL: o.CertTTL},
			name:   o.Local.ConfigFile,
			close:  func() {},
		}, nil
	case o.ControlPlane != nil:
		c := o.ControlPlane
		token := caclient.TokenFile(c.TokenFile)
		caConn, err := caclient.Dial(c.CAAddress, c.RootCert, "")
		if err != nil {
			return nil, err
		}
		xdsConn, err := caclient.Dial(c.XDSAddress, c.RootCert, "", grpc.WithPerRPCCredentials(caclient.Bearer(token)))
		if err != nil {
			caConn.Close()
			return nil, err
		}
		return &mesh{
			source: &xds.Client{Conn: xdsConn, NodeID: o.Node + o.Workload, Log: o.Log},
			issuer: &caclient.Issuer{Conn: caConn, Token: token, TTL: o.CertTTL, Self: ambient.NodeProxyID()},
			name:   "the control plane at " + c.XDSAddress,
			remote: true,
			close:  func() { xdsConn.Close(); caConn.Close() },
		}, nil
	default:
		return &mesh{source: o.Source, issuer: o.Issuer, name: "its source", close: func() {}}, nil
	}
}

// errStopped is how the proxy's end reaches the helpers' goroutines.
var errStopped = errors.New("proxy stopped")

func ignoreStopped(err error) error {
	if errors.Is(err, errStopped) {
		return nil
	}
	return err
}
