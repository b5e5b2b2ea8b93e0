package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/spf13/cobra"
)

func newControlCmd() *cobra.Command {
	var cfgPath, caDir, tokensPath, listen string
	cmd := &cobra.Command{
		Use:   "control --config FILE --ca-dir DIR --tokens FILE [--listen 127.0.0.1:15012]",
		Short: "Run the control plane: Istio's CA and delta xDS (workloads, services, policies) over one TLS gRPC port",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfgPath == "" || caDir == "" || tokensPath == "" {
				return fmt.Errorf("--config, --ca-dir and --tokens are required")
			}
			ap, err := netip.ParseAddrPort(listen)
			if err != nil {
				return fmt.Errorf("--listen %q: want ip:port", listen)
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			ca, err := identity.LoadCA(caDir)
			if err != nil {
				return err
			}
			tokens, err := control.LoadTokens(tokensPath)
			if err != nil {
				return err
			}
			return control.Run(cmd.Context(), &config.Watcher{Path: cfgPath, Log: log}, ca, tokens, ap, log)
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "ztunnel-format mesh config, watched (required)")
	cmd.Flags().StringVar(&caDir, "ca-dir", "", "CA directory in Istio's plug-in layout (required)")
	cmd.Flags().StringVar(&tokensPath, "tokens", "", `bearer tokens, one "TOKEN NODE" per line (required)`)
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:15012", "address to serve on")
	return cmd
}
