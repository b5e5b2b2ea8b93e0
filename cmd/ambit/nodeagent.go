package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/cni"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubenode"
	"github.com/ambitmesh/ambit/internal/nodeagent"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/spf13/cobra"
)

func newNodeAgentCmd() *cobra.Command {
	var socket, control, kubeconfig, exclude string
	var onKube bool
	var ko kubenode.Options
	cmd := &cobra.Command{
		Use:   "node-agent [--socket PATH] (--control PATH | --kubernetes [--kubeconfig FILE])",
		Short: "Enroll pods in the mesh: program capture in their namespaces and hand them to the node proxy over ZDS",
		Long: `Enroll pods in the mesh: program capture in their namespaces and hand them to
the node proxy over ZDS.

With --control, pods are enrolled through a local API on a Unix socket (the
lab's way). With --kubernetes, the agent watches its node's pods (in-cluster
config unless --kubeconfig), chains the ambit-cni plugin into the node's CNI
configuration (new pods are enrolled during their CNI ADD), enrolls the mesh's
pods that already run, and writes ambient.istio.io/redirection on each.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (control == "") == !onKube {
				return fmt.Errorf("give one of --control (the lab's enrollment API) and --kubernetes")
			}
			if os.Geteuid() != 0 {
				return fmt.Errorf("node-agent: programming nftables in pods' namespaces needs root")
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			agent := &nodeagent.Agent{Socket: socket, Log: log}
			ctx := cmd.Context()
			if onKube {
				for _, ns := range strings.Split(exclude, ",") {
					if ns = strings.TrimSpace(ns); ns != "" {
						ko.CNI.Conf.ExcludeNamespaces = append(ko.CNI.Conf.ExcludeNamespaces, ns)
					}
				}
				return runNodeAgentKube(ctx, agent, kubeconfig, ko, log)
			}
			return runNodeAgentControl(ctx, agent, control, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&socket, "socket", zds.DefaultSocket, "the ZDS socket the node proxy connects to")
	f.StringVar(&control, "control", "", "Unix socket of the enrollment API (POST /enroll, /unenroll; GET /pods)")
	f.BoolVar(&onKube, "kubernetes", false, "take the node's pods from the Kubernetes API server and the ambit-cni plugin")
	f.StringVar(&kubeconfig, "kubeconfig", "", "with --kubernetes: kubeconfig (default: in-cluster)")
	f.StringVar(&ko.Node, "node-name", os.Getenv("NODE_NAME"), "with --kubernetes: this node's name (default $NODE_NAME)")
	f.StringVar(&ko.ClusterID, "cluster-id", "Kubernetes", "with --kubernetes: the cluster's name in workload uids, as the control plane's")
	f.StringVar(&ko.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "with --kubernetes: the agent's own namespace (default $POD_NAMESPACE); never enrolled")
	f.StringVar(&ko.PodName, "pod-name", os.Getenv("POD_NAME"), "with --kubernetes: the agent's own pod (default $POD_NAME): its DaemonSet gone means uninstall")
	f.StringVar(&ko.CNI.BinDir, "cni-bin-dir", "/opt/cni/bin", "with --kubernetes: the node's CNI plugin directory")
	f.StringVar(&ko.CNI.ConfDir, "cni-conf-dir", "/etc/cni/net.d", "with --kubernetes: the node's CNI configuration directory")
	f.StringVar(&ko.Socket, "cni-socket", cni.DefaultAgentSocket, "with --kubernetes: where the plugin reaches the agent (a host path)")
	f.BoolVar(&ko.CNI.Conf.FailOpen, "cni-fail-open", false, "with --kubernetes: a mesh pod the agent cannot enroll starts un-meshed instead of failing (default: fail closed)")
	f.StringVar(&exclude, "exclude-namespaces", "kube-system", "with --kubernetes: namespaces never enrolled, comma-separated (the agent's own always is)")
	return cmd
}

// runNodeAgentControl serves the lab's enrollment API and the ZDS socket.
func runNodeAgentControl(ctx context.Context, agent *nodeagent.Agent, control string, log *slog.Logger) error {
	_ = os.Remove(control)
	l, err := net.Listen("unix", control)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	srv := &http.Server{Handler: agent.ControlHandler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	errc := make(chan error, 1)
	go func() { errc <- agent.Serve(ctx) }()
	log.Info("node agent serving", "zds", agent.Socket, "control", control)
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	_ = os.Remove(control)
	return <-errc
}

// runNodeAgentKube runs the agent on a Kubernetes node.
func runNodeAgentKube(ctx context.Context, agent *nodeagent.Agent, kubeconfig string, ko kubenode.Options, log *slog.Logger) error {
	client, kc, err := kubeClient(kubeconfig, "no --kubeconfig, and not in a pod")
	if err != nil {
		return err
	}
	defer client.Close()
	if kubeconfig == "" {
		ko.CAFile = kube.InClusterCAFile // the plugin's copy; a kubeconfig's CA is not a file here
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("the agent's own binary (installed as ambit-cni): %w", err)
	}
	ko.CNI.Binary = self
	ko.Log = log
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The proxy gets its snapshot (and becomes ready) only once the node
	// is set up: the plugin chained, the running pods enrolled.
	errc := make(chan error, 1)
	ready := make(chan struct{})
	ko.Ready = func() { close(ready) }
	go func() { // ends with ctx
		select {
		case <-ready:
			errc <- agent.Serve(ctx)
		case <-ctx.Done():
			errc <- nil
		}
	}()
	node, err := kubenode.New(client, kc.Server, agent, ko)
	if err != nil {
		return err
	}
	err = node.Run(ctx)
	cancel()
	return errors.Join(err, <-errc)
}
