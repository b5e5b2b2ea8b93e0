package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/memtrim"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/proxy"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/xds"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
)

// proxyGCPercent is the proxy's default GOGC; see docs/benchmarks.md for
// what it buys (memory with 10,000 idle connections) and costs (CPU).
const proxyGCPercent = 50

// proxyFDTable is the descriptor table the proxy grows at start (capped by
// its RLIMIT_NOFILE): room for ~16,000 relayed connections (two sockets
// each) before the kernel grows it again.
const proxyFDTable = 32768

func newProxyCmd() *cobra.Command {
	var (
		cfgPath, caDir, wl, node, listenIP, logFormat, logLevel, zdsSocket string
		xdsAddr, caAddr, tokenFile, rootCert                               string
		certTTL                                                            time.Duration
		hcfg                                                               hbone.Config
	)
	cmd := &cobra.Command{
		Use:   "proxy --config FILE --ca-dir DIR (--workload NS/NAME | --node NAME)",
		Short: "Run the node proxy from a ztunnel-format local config",
		Long: `Run the node proxy. The config file (ztunnel's local YAML: workloads,
services, policies) is watched: a valid change applies live, an invalid one is
logged and the last good config stays.

--workload NS/NAME dedicates the proxy to one workload and binds every
listener to its IP (run several on 127.0.0.x without root); --node NAME serves
all workloads of a node.

The proxy collects garbage at GOGC=` + fmt.Sprint(proxyGCPercent) + ` unless GOGC is set in its
environment: its hot path allocates ~100 bytes per request, so a tighter heap
costs little CPU and keeps the memory of idle connections down.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Getenv("GOGC") == "" {
				debug.SetGCPercent(proxyGCPercent)
			}
			remote := xdsAddr != "" || caAddr != ""
			if remote && (xdsAddr == "" || caAddr == "" || tokenFile == "" || rootCert == "") {
				return fmt.Errorf("a control plane needs --xds-address, --ca-address, --token-file and --root-cert together")
			}
			if remote && (cfgPath != "" || caDir != "") {
				return fmt.Errorf("--config/--ca-dir and a control plane (--xds-address) are alternatives: use one")
			}
			if !remote && (cfgPath == "" || caDir == "") {
				return fmt.Errorf("--config and --ca-dir are required (or a control plane: --xds-address, --ca-address, --token-file, --root-cert)")
			}
			if (wl == "") == (node == "") {
				return fmt.Errorf("set exactly one of --workload NS/NAME or --node NAME")
			}
			for _, d := range []struct {
				flag string
				v    time.Duration
			}{{"--hbone-idle-timeout", hcfg.ServerIdleTimeout}, {"--hbone-ping-interval", hcfg.PingInterval}, {"--hbone-ping-timeout", hcfg.PingTimeout}} {
				if d.v <= 0 {
					return fmt.Errorf("%s %v: want a duration above zero", d.flag, d.v)
				}
			}
			if hcfg.PingTimeout <= hcfg.PingInterval {
				return fmt.Errorf("--hbone-ping-timeout %v must be longer than --hbone-ping-interval %v: a peer needs a PING to answer", hcfg.PingTimeout, hcfg.PingInterval)
			}
			level := new(slog.LevelVar)
			if err := level.UnmarshalText([]byte(strings.ToUpper(logLevel))); err != nil {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
			}
			hopts := &slog.HandlerOptions{Level: level}
			// Buffered (flushed within 100 ms), so a burst of access-log
			// records does not queue on the handler's lock a syscall at a time.
			lw := telemetry.NewLogWriter(os.Stderr, 100*time.Millisecond)
			defer lw.Close()
			var h slog.Handler
			switch logFormat {
			case "text":
				h = slog.NewTextHandler(lw, hopts)
			case "json":
				h = slog.NewJSONHandler(lw, hopts)
			default:
				return fmt.Errorf("--log-format %q: want text or json", logFormat)
			}
			log := slog.New(h)
			// Before the first connection: growing the table later stalls
			// every thread opening a descriptor (see nsutil.GrowFDTable).
			if n, err := nsutil.GrowFDTable(proxyFDTable); err != nil {
				log.Warn("descriptor table not grown; bursts of connections may start extra threads", "err", err)
			} else {
				log.Debug("descriptor table grown", "slots", n)
			}
			var lip netip.Addr
			if listenIP != "" {
				var err error
				if lip, err = netip.ParseAddr(listenIP); err != nil {
					return fmt.Errorf("--listen-ip: %w", err)
				}
			}
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			var certs *identity.Manager
			var initial *workload.Index
			var watcher *config.Watcher
			var xc *xds.Client
			var pmu sync.Mutex
			var running *proxy.Proxy
			first := make(chan *workload.Index, 1) // pushes before the proxy exists
			if remote {
				token := caclient.TokenFile(tokenFile)
				caConn, err := caclient.Dial(caAddr, rootCert, "")
				if err != nil {
					return err
				}
				defer caConn.Close()
				certs = identity.NewManager(&caclient.Issuer{Conn: caConn, Token: token, TTL: certTTL,
					Self: ambient.NodeProxyID()}, log)
				xdsConn, err := caclient.Dial(xdsAddr, rootCert, "", grpc.WithPerRPCCredentials(caclient.Bearer(token)))
				if err != nil {
					return err
				}
				defer xdsConn.Close()
				xc = &xds.Client{Conn: xdsConn, NodeID: node + wl, Log: log, Apply: func(ix *workload.Index) error {
					pmu.Lock()
					defer pmu.Unlock()
					if running != nil {
						return running.SetIndex(ix)
					}
					select {
					case <-first:
					default:
					}
					first <- ix
					return nil
				}}
				go xc.Run(ctx)
				log.Info("waiting for the control plane's first push", "xds", xdsAddr)
				deadline := time.After(30 * time.Second)
				for !xc.Ready() {
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-deadline:
						return fmt.Errorf("no complete configuration from the control plane at %s within 30 s", xdsAddr)
					case <-time.After(50 * time.Millisecond):
					}
				}
				initial = <-first
			} else {
				ca, err := identity.LoadCA(caDir)
				if err != nil {
					return err
				}
				certs = identity.NewManager(&identity.LocalIssuer{CA: ca, TTL: certTTL}, log)
				watcher = &config.Watcher{Path: cfgPath, Log: log, Apply: func(ix *workload.Index) { initial = ix }}
				if err := watcher.Load(); err != nil {
					return err
				}
			}
			defer certs.Close()
			p, err := proxy.New(proxy.Options{
				Workload: wl, Node: node, ListenIP: lip,
				Certs: certs, HBONE: hcfg, Log: log, LogLevel: level,
				Metrics: telemetry.NewMetrics(version), Version: version,
			}, initial)
			if err != nil {
				return err
			}
			pmu.Lock()
			running = p
			select {
			case ix := <-first: // pushed after the first sync, before the proxy existed
				if err := p.SetIndex(ix); err != nil {
					log.Error("config change not applied", "err", err)
				}
			default:
			}
			pmu.Unlock()
			done := make(chan struct{}, 2)
			if watcher != nil {
				watcher.Apply = func(ix *workload.Index) {
					if err := p.SetIndex(ix); err != nil {
						log.Error("config change not applied", "err", err)
					}
				}
				go func() { watcher.Run(ctx); done <- struct{}{} }()
			} else {
				done <- struct{}{}
			}
			if zdsSocket != "" {
				if node == "" {
					return fmt.Errorf("--zds-socket needs --node: in-pod capture serves a node's pods")
				}
				zc := &zds.Client{Socket: zdsSocket, Handler: p.ZDS(), Log: log}
				go func() { zc.Run(ctx); done <- struct{}{} }()
			} else {
				done <- struct{}{}
			}
			trimmed := make(chan struct{})
			go func() { defer close(trimmed); (&memtrim.Trimmer{Log: log}).Run(ctx) }()
			log.Info("ambit proxy starting", "version", version, "config", cfgPath, "workload", wl, "node", node)
			err = p.Run(ctx)
			cancel() // a proxy that stopped on an error ends its helpers too
			<-done
			<-done
			<-trimmed
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgPath, "config", "", "ztunnel-format local config (YAML), watched for changes (required)")
	f.StringVar(&caDir, "ca-dir", "", "CA directory in Istio's plug-in layout (required)")
	f.StringVar(&wl, "workload", "", "dedicated mode: serve this workload (namespace/name) on its own IP")
	f.StringVar(&node, "node", "", "shared mode: serve the workloads of this node")
	f.StringVar(&listenIP, "listen-ip", "", "shared mode: address the listeners bind to (default 127.0.0.1)")
	f.StringVar(&logFormat, "log-format", "text", "log and access-log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error (changeable at runtime on the admin port)")
	f.DurationVar(&certTTL, "cert-ttl", identity.DefaultCertTTL, "workload certificate lifetime")
	f.StringVar(&zdsSocket, "zds-socket", "", "shared mode: take pods from the node agent on this ZDS socket (in-pod capture)")
	f.StringVar(&xdsAddr, "xds-address", "", "control plane: delta xDS address (instead of --config)")
	f.StringVar(&caAddr, "ca-address", "", "control plane: CA address (instead of --ca-dir)")
	f.StringVar(&tokenFile, "token-file", "", "control plane: file holding this node's bearer token")
	f.StringVar(&rootCert, "root-cert", "", "control plane: root certificate(s) to trust it with")
	f.DurationVar(&hcfg.ServerIdleTimeout, "hbone-idle-timeout", hbone.DefaultServerIdleTimeout, "close an inbound HBONE connection (GOAWAY) that has carried no stream for this long")
	f.DurationVar(&hcfg.PingInterval, "hbone-ping-interval", hbone.DefaultPingInterval, "HTTP/2 keepalive PING period on HBONE connections, both ways")
	f.DurationVar(&hcfg.PingTimeout, "hbone-ping-timeout", hbone.DefaultPingTimeout, "close an HBONE connection after this long with nothing read from the peer")
	return cmd
}
