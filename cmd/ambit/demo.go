package main

import (
	"github.com/ambitmesh/ambit/internal/demo"
	"github.com/spf13/cobra"
)

func newDemoCmd() *cobra.Command {
	var opt demo.Options
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the loopback demo: a CA, two identities and an HBONE tunnel between them on 127.0.0.x",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return demo.Run(cmd.Context(), cmd.OutOrStdout(), opt)
		},
	}
	cmd.Flags().StringVar(&opt.CADir, "ca-dir", "", "use (or create) the CA in this directory instead of a temporary one")
	return cmd
}
