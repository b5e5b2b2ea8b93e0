package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/ambitmesh/ambit/internal/bench"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/spf13/cobra"
)

func newBenchCmd() *cobra.Command {
	var o bench.Options
	var only, out string
	var idle []int
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure the mesh in a lab beside direct TCP and a TLS relay pair (root)",
		Long: `bench builds a lab of its own and measures, in one run: throughput (iperf3),
latency at 1000 req/s and the proxies' CPU (fortio), memory with idle connections,
and a connection storm, each through the mesh, directly and through a TLS relay
pair. The report is Markdown; see docs/benchmarks.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			self, err := os.Executable()
			if err != nil {
				return err
			}
			o.Self, o.Idle = self, idle
			if only != "" {
				o.Only = strings.Split(only, ",")
			}
			o.Out, o.Progress = cmd.OutOrStdout(), cmd.ErrOrStderr()
			if out != "" {
				f, err := os.Create(out)
				if err != nil {
					return err
				}
				defer f.Close()
				o.Out = f
			}
			return bench.Run(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&o.Quick, "quick", false, "the smoke run: seconds per scenario (CI)")
	f.StringVar(&only, "only", "", "comma-separated scenarios to run: "+strings.Join(bench.Scenarios, ","))
	f.IntSliceVar(&idle, "idle", nil, "idle connection counts (default 1000,10000; quick: 200)")
	f.IntVar(&o.StormBoundMB, "storm-bound-mb", 100, "the RSS each proxy must stay under in the storm")
	f.BoolVar(&o.Keep, "keep", false, "leave the lab up afterwards")
	f.StringVar(&out, "out", "", "write the report here instead of standard output")
	f.StringVar(&o.LabName, "lab-name", "bench", "the lab's name (prefix of its namespaces)")
	cmd.AddCommand(newBenchHoldCmd(), newBenchRelayCmd())
	return cmd
}

func newBenchHoldCmd() *cobra.Command {
	var addr, ready string
	var n, parallel int
	cmd := &cobra.Command{
		Use:    "hold --addr HOST:PORT --conns N",
		Short:  "Open N connections to an echo server and keep them idle (the bench runs it in a pod)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := bench.Hold(cmd.Context(), addr, n, parallel, func(r bench.HoldResult) {
				fmt.Fprintln(cmd.ErrOrStderr(), r)
				if ready != "" {
					b, _ := json.Marshal(r)
					if err := os.WriteFile(ready+".tmp", b, 0o644); err == nil {
						_ = os.Rename(ready+".tmp", ready)
					}
				}
			})
			if cmd.Context().Err() != nil {
				return nil // stopped, as meant
			}
			return err
		},
	}
	cmd.Flags().StringVar(&addr, "addr", "", "the echo server")
	cmd.Flags().IntVar(&n, "conns", 1000, "connections to open")
	cmd.Flags().IntVar(&parallel, "parallel", 32, "connections opened at once")
	cmd.Flags().StringVar(&ready, "ready-file", "", "write the result here (JSON) once all are open")
	return cmd
}

func newBenchRelayCmd() *cobra.Command {
	var r bench.TLSRelay
	var caDir string
	cmd := &cobra.Command{
		Use:    "tls-relay --listen ADDR --connect ADDR --ca-dir DIR [--server]",
		Short:  "The TLS relay the bench measures the mesh against (one side of the pair)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := identity.LoadCA(caDir)
			if err != nil {
				return err
			}
			r.CA, r.Log = ca, slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return r.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&r.Listen, "listen", "", "address to accept on")
	cmd.Flags().StringVar(&r.Connect, "connect", "", "the other relay (client side) or the target (server side)")
	cmd.Flags().BoolVar(&r.Server, "server", false, "accept TLS, connect in plain TCP")
	cmd.Flags().StringVar(&caDir, "ca-dir", "", "the CA both relays take their certificates from")
	return cmd
}
