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
	var name, from, to, out, kubeconfig, meshNS string
	var onKube bool
	cmd := &cobra.Command{
		Use:   "trace --from POD --to IP:PORT",
		Short: "Send a request between pods of a running lab or cluster and show it hop by hop (packets, pcaps, the proxies' account)",
		Long: `Send a request between pods and show it hop by hop: packets at each place it
crosses, a pcap per hop, and what the proxies logged.

In a lab: --from names a pod of the lab. On a Kubernetes cluster (--kubernetes,
or --kubeconfig FILE), run as root on the node: --from is namespace/name and
--to a pod's ip:port; the pods' and nodes' namespaces are found on this machine.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("trace captures packets inside the pods' namespaces, which needs root")
			}
			dst, err := netip.ParseAddrPort(to)
			if err != nil {
				return fmt.Errorf("--to %q: want ip:port (e.g. 10.244.1.3:80)", to)
			}
			var status, body string
			var problems []string
			if onKube || kubeconfig != "" {
				client, _, err := kubeClient(kubeconfig, "no --kubeconfig, and not in a pod")
				if err != nil {
					return err
				}
				defer client.Close()
				status, body, problems, err = demo.TraceCluster(cmd.Context(), cmd.OutOrStdout(), demo.ClusterTrace{
					Client: client, From: from, To: dst, OutDir: out, MeshNamespace: meshNS})
				if err != nil {
					return err
				}
			} else {
				topo, err := lab.Current(name)
				if err != nil {
					return err
				}
				if status, body, problems, err = demo.Trace(cmd.OutOrStdout(), topo, from, dst, out); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "\nanswer: %s  %s\n", status, strings.TrimSpace(body))
			if len(problems) > 0 {
				return fmt.Errorf("trace found problems: %s", strings.Join(problems, "; "))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "seed", "the lab")
	cmd.Flags().StringVar(&from, "from", "client", "the pod the request starts in (on a cluster: namespace/name)")
	cmd.Flags().BoolVar(&onKube, "kubernetes", false, "trace on the Kubernetes cluster this machine is a node of (in-cluster config unless --kubeconfig)")
	cmd.Flags().StringVar(&kubeconfig, "kubeconfig", "", "trace on this kubeconfig's cluster")
	cmd.Flags().StringVar(&meshNS, "mesh-namespace", "ambit-system", "on a cluster: where the ambit-node pods run")
	cmd.Flags().StringVar(&to, "to", "10.244.1.3:80", "where it goes: a pod's or a service's ip:port")
	cmd.Flags().StringVar(&out, "out", "trace-out", "directory for the pcap files")
	return cmd
}
