package main

import (
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/ambitmesh/ambit/internal/demo"
	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/spf13/cobra"
)

func newTraceCmd() *cobra.Command {
	var name, from, to, out string
	cmd := &cobra.Command{
		Use:   "trace --from POD --to IP:PORT",
		Short: "Send a request between pods of a running lab and show it hop by hop (packets, pcaps, the proxies' account)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("trace captures packets inside the lab's namespaces, which needs root")
			}
			dst, err := netip.ParseAddrPort(to)
			if err != nil {
				return fmt.Errorf("--to %q: want ip:port (e.g. 10.244.1.3:80)", to)
			}
			topo, err := lab.Current(name)
			if err != nil {
				return err
			}
			status, body, problems, err := demo.Trace(cmd.OutOrStdout(), topo, from, dst, out)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "\nanswer: %s  %s\n", status, strings.TrimSpace(body))
			if len(problems) > 0 {
				return fmt.Errorf("trace found problems: %s", strings.Join(problems, "; "))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "seed", "the lab")
	cmd.Flags().StringVar(&from, "from", "client", "the pod the request starts in")
	cmd.Flags().StringVar(&to, "to", "10.244.1.3:80", "where it goes: a pod's or a service's ip:port")
	cmd.Flags().StringVar(&out, "out", "trace-out", "directory for the pcap files")
	return cmd
}
