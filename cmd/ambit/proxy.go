package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/proxy"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/spf13/cobra"
)

func newProxyCmd() *cobra.Command {
	var (
		cfgPath, caDir, wl, node, listenIP, logFormat, logLevel, zdsSocket string
		certTTL                                                            time.Duration
	)
	cmd := &cobra.Command{
		Use:   "proxy --config FILE --ca-dir DIR (--workload NS/NAME | --node NAME)",
		Short: "Run the node proxy from a ztunnel-format local config",
		Long: `Run the node proxy. The config file (ztunnel's local YAML: workloads,
services, policies) is watched: a valid change applies live, an invalid one is
logged and the last good config stays.

--workload NS/NAME dedicates the proxy to one workload and binds every
listener to its IP (run several on 127.0.0.x without root); --node NAME serves
all workloads of a node.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfgPath == "" || caDir == "" {
				return fmt.Errorf("--config and --ca-dir are required")
			}
			if (wl == "") == (node == "") {
				return fmt.Errorf("set exactly one of --workload NS/NAME or --node NAME")
			}
			level := new(slog.LevelVar)
			if err := level.UnmarshalText([]byte(strings.ToUpper(logLevel))); err != nil {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
			}
			hopts := &slog.HandlerOptions{Level: level}
			var h slog.Handler
			switch logFormat {
			case "text":
				h = slog.NewTextHandler(os.Stderr, hopts)
			case "json":
				h = slog.NewJSONHandler(os.Stderr, hopts)
			default:
				return fmt.Errorf("--log-format %q: want text or json", logFormat)
			}
			log := slog.New(h)
			var lip netip.Addr
			if listenIP != "" {
				var err error
				if lip, err = netip.ParseAddr(listenIP); err != nil {
					return fmt.Errorf("--listen-ip: %w", err)
				}
			}
			ca, err := identity.LoadCA(caDir)
			if err != nil {
				return err
			}
			certs := identity.NewManager(&identity.LocalIssuer{CA: ca, TTL: certTTL}, log)
			defer certs.Close()

			var initial *workload.Index
			watcher := &config.Watcher{Path: cfgPath, Log: log, Apply: func(ix *workload.Index) { initial = ix }}
			if err := watcher.Load(); err != nil {
				return err
			}
			p, err := proxy.New(proxy.Options{
				Workload: wl, Node: node, ListenIP: lip,
				Certs: certs, Log: log, LogLevel: level,
				Metrics: telemetry.NewMetrics(version), Version: version,
			}, initial)
			if err != nil {
				return err
			}
			watcher.Apply = func(ix *workload.Index) {
				if err := p.SetIndex(ix); err != nil {
					log.Error("config change not applied", "err", err)
				}
			}
			ctx := cmd.Context()
			done := make(chan struct{}, 2)
			go func() { watcher.Run(ctx); done <- struct{}{} }()
			if zdsSocket != "" {
				if node == "" {
					return fmt.Errorf("--zds-socket needs --node: in-pod capture serves a node's pods")
				}
				zc := &zds.Client{Socket: zdsSocket, Handler: p.ZDS(), Log: log}
				go func() { zc.Run(ctx); done <- struct{}{} }()
			} else {
				done <- struct{}{}
			}
			log.Info("ambit proxy starting", "version", version, "config", cfgPath, "workload", wl, "node", node)
			err = p.Run(ctx)
			<-done
			<-done
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
	return cmd
}
