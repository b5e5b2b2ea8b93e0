package main

import (
	"os"

	"github.com/ambitmesh/ambit/internal/demo"
	"github.com/spf13/cobra"
)

func newDemoCmd() *cobra.Command {
	var opt demo.Options
	var lo demo.LabOptions
	var loopback bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "The seed's request in a lab of network namespaces, hop by hop (root); --loopback for the small tunnel demo",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if loopback {
				return demo.Run(cmd.Context(), cmd.OutOrStdout(), opt)
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			lo.Self = self
			return demo.RunLab(cmd.OutOrStdout(), lo)
		},
	}
	cmd.Flags().BoolVar(&loopback, "loopback", false, "run the loopback demo instead: a CA, two identities, one HBONE tunnel on 127.0.0.x (no root)")
	cmd.Flags().StringVar(&opt.CADir, "ca-dir", "", "loopback demo: use (or create) the CA in this directory")
	cmd.Flags().BoolVar(&lo.Keep, "keep", false, "leave the lab up afterwards to explore it")
	cmd.Flags().StringVar(&lo.OutDir, "out", "demo-out", "directory for the pcap files, one per hop")
	cmd.Flags().StringVar(&lo.Name, "lab-name", "seed", "name of the lab the demo builds")
	return cmd
}
