package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/ambitmesh/ambit/internal/nodeagent"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/spf13/cobra"
)

func newNodeAgentCmd() *cobra.Command {
	var socket, control string
	cmd := &cobra.Command{
		Use:   "node-agent [--socket PATH] --control PATH",
		Short: "Enroll pods in the mesh: program capture in their namespaces and hand them to the node proxy over ZDS",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if control == "" {
				return fmt.Errorf("--control is required (the Unix socket of the enrollment API)")
			}
			if os.Geteuid() != 0 {
				return fmt.Errorf("node-agent: programming nftables in pods' namespaces needs root")
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			agent := &nodeagent.Agent{Socket: socket, Log: log}
			ctx := cmd.Context()
			_ = os.Remove(control)
			l, err := net.Listen("unix", control)
			if err != nil {
				return fmt.Errorf("control socket: %w", err)
			}
			srv := &http.Server{Handler: agent.ControlHandler(), ReadHeaderTimeout: 10 * time.Second}
			go func() { <-ctx.Done(); srv.Close() }()
			errc := make(chan error, 1)
			go func() { errc <- agent.Serve(ctx) }()
			log.Info("node agent serving", "zds", socket, "control", control)
			if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			_ = os.Remove(control)
			return <-errc
		},
	}
	cmd.Flags().StringVar(&socket, "socket", zds.DefaultSocket, "the ZDS socket the node proxy connects to")
	cmd.Flags().StringVar(&control, "control", "", "Unix socket of the enrollment API (POST /enroll, /unenroll; GET /pods)")
	return cmd
}
