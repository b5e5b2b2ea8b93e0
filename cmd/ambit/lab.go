package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/spf13/cobra"
)

func newLabCmd() *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "A cluster of network namespaces on this machine: nodes, pods, the wire between them",
	}
	cmd.PersistentFlags().StringVar(&name, "name", "seed", "the lab's name (prefix of its namespaces)")
	cmd.AddCommand(labUpCmd(&name), labDownCmd(&name), labStatusCmd(&name), labExecCmd(&name), labNSExecCmd(),
		labServeCmd(), labEnrollCmd(&name, true), labEnrollCmd(&name, false), labRestartCmd(&name))
	return cmd
}

func labUpCmd(name *string) *cobra.Command {
	var file string
	var noMesh bool
	up := &cobra.Command{
		Use:   "up [-f topology.yaml]",
		Short: "Build the lab (default: the seed's two nodes, client and server pods)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			topo, data, err := loadTopology(file)
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("name") {
				topo.Name = *name
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if err := lab.UpAll(topo, data, self, out, lab.UpOptions{NoMesh: noMesh, ProxyLogLevel: "debug"}); err != nil {
				return err
			}
			fmt.Fprintf(out, "\nlab %q is up. Try: ambit lab exec client -- curl -s http://10.244.1.3/\nTake it down with: ambit lab down\n", topo.Name)
			return nil
		},
	}
	up.Flags().StringVarP(&file, "file", "f", "", "topology file (default: the seed's, examples/seed-lab.yaml)")
	up.Flags().BoolVar(&noMesh, "no-mesh", false, "build only the network: no node agents, no proxies")
	return up
}

func labDownCmd(name *string) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove the lab: its processes, namespaces, links and rules",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("lab down: removing network namespaces needs root")
			}
			if err := lab.Down(*name); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "lab %q is down\n", *name)
			return nil
		},
	}
}

func labStatusCmd(name *string) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "List the lab's namespaces and addresses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lines, err := lab.Status(*name)
			if err != nil {
				return err
			}
			if len(lines) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "lab %q is not up\n", *name)
				return nil
			}
			fmt.Fprintln(cmd.OutOrStdout(), strings.Join(lines, "\n"))
			return nil
		},
	}
}

func labExecCmd(name *string) *cobra.Command {
	return &cobra.Command{
		Use:   "exec POD|node/NODE -- COMMAND [ARGS...]",
		Short: "Run a command inside a pod's (or a node's) network namespace",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			target := args[0]
			ns := "ambit-" + *name + "-pod-" + target
			if node, ok := strings.CutPrefix(target, "node/"); ok {
				ns = "ambit-" + *name + "-node-" + node
			}
			return lab.ExecIn(ns, args[1:])
		},
	}
}

func labNSExecCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "nsexec NETNS -- COMMAND [ARGS...]",
		Hidden: true, // how lab up starts processes inside namespaces
		Args:   cobra.MinimumNArgs(2),
		RunE:   func(cmd *cobra.Command, args []string) error { return lab.ExecIn(args[0], args[1:]) },
	}
}

func labServeCmd() *cobra.Command {
	var proto string
	var port int
	serve := &cobra.Command{
		Use:    "serve --protocol http|tcp-echo --port N",
		Short:  "Run a pod's built-in server (lab up starts these inside pods)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if port < 1 || port > 65535 {
				return fmt.Errorf("--port %d: out of range", port)
			}
			return lab.Serve(cmd.Context(), proto, uint16(port), slog.New(slog.NewTextHandler(os.Stderr, nil)))
		},
	}
	serve.Flags().StringVar(&proto, "protocol", "http", "http or tcp-echo")
	serve.Flags().IntVar(&port, "port", 80, "port to listen on")
	return serve
}

// labEnrollCmd is "enroll POD" (in) or "unenroll POD".
func labEnrollCmd(name *string, in bool) *cobra.Command {
	use, short := "enroll POD", "Put a pod in the mesh (capture on, served by its node's proxy)"
	if !in {
		use, short = "unenroll POD", "Take a pod out of the mesh: its next connections go direct"
	}
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			t, err := lab.Current(*name)
			if err != nil {
				return err
			}
			if in {
				return t.Enroll(args[0])
			}
			return t.Unenroll(args[0])
		},
	}
}

func labRestartCmd(name *string) *cobra.Command {
	return &cobra.Command{
		Use:   "restart-proxy NODE",
		Short: "Stop and start a node's proxy (it takes its pods back from the node agent)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			t, err := lab.Current(*name)
			if err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			if err := t.StopProxy(args[0]); err != nil {
				return err
			}
			return t.StartProxy(args[0], self)
		},
	}
}

func loadTopology(file string) (*lab.Topology, []byte, error) {
	data, name := lab.DefaultTopology, "default seed topology"
	if file != "" {
		var err error
		if data, err = os.ReadFile(file); err != nil {
			return nil, nil, err
		}
		name = file
	}
	t, err := lab.ParseTopology(name, data)
	return t, data, err
}
