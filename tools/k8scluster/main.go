// Command k8scluster starts and removes the test cluster (`make k8s-up`,
// `make k8s-down`): the seed's two nodes, master and worker1, each a
// kubelet with its own containerd in a network and mount namespace of its
// own on the lab's wire, and the control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler) on the wire
// (internal/kubetest). Nothing of it is in the host's network namespace;
// `kubectl` runs in the wire's:
//
//	k8scluster up [-name N] [-image TAR]...   build and start; prints how to reach it
//	k8scluster down [-name N]                 stop and remove everything
//	k8scluster kubectl [-name N] -- ARGS      kubectl as the admin
//
// It is a development tool, not part of the mesh.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/ambitmesh/ambit/internal/kubetest"
)

type images []string

func (i *images) String() string     { return strings.Join(*i, ",") }
func (i *images) Set(v string) error { *i = append(*i, v); return nil }

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	name := fs.String("name", "ambit", "the cluster's name")
	var imgs images
	tag := ""
	if os.Args[1] == "up" {
		fs.Var(&imgs, "image", "an OCI layout tar to import on every node (repeatable)")
		fs.StringVar(&tag, "ambit-tag", "", "the tag of Ambit's image among them, for the install hint")
	}
	_ = fs.Parse(os.Args[2:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "up":
		var c *kubetest.Cluster
		c, err = kubetest.UpCluster(ctx, kubetest.ClusterSpec{Name: *name, Images: imgs, Log: os.Stdout})
		if err == nil {
			kubectl := fmt.Sprintf("nsenter --net=/run/netns/%s -- %s --kubeconfig %s", c.WireNS, filepath.Join(kubetest.BinDir(), "kubectl"), c.Kubeconfig)
			fmt.Printf("\nThe API server is %s, in the network namespace %s:\n", c.APIServer, c.WireNS)
			fmt.Printf("  go run ./tools/k8scluster kubectl -- get nodes -o wide\n  %s get pods -A\n", kubectl)
			if tag != "" {
				host, port, _ := strings.Cut(strings.TrimPrefix(c.APIServer, "https://"), ":")
				fmt.Printf("\nAmbit on it (no kube-proxy, no DNS here: the control plane on master's network):\n")
				fmt.Printf("  ./bin/ambit ca init --dir ca && %s create namespace ambit-system\n", kubectl)
				fmt.Printf("  %s -n ambit-system create secret generic ambit-ca --from-file=ca/\n", kubectl)
				fmt.Printf("  KUBECONFIG=%s nsenter --net=/run/netns/%s -- helm install ambit deploy/helm/ambit -n ambit-system \\\n", c.Kubeconfig, c.WireNS)
				fmt.Printf("    --set image.tag=%s --set image.pullPolicy=Never --set control.hostNetwork=true \\\n", tag)
				fmt.Printf("    --set control.nodeSelector.kubernetes\\.io/hostname=master --set node.xdsAddress=%s:15012 \\\n", c.Node("master").Addr)
				fmt.Printf("    --set kubernetesServiceHost=%s --set kubernetesServicePort=%s\n", host, port)
			}
			fmt.Printf("Remove it with `make k8s-down`.\n")
		}
	case "down":
		err = kubetest.DownCluster(*name)
	case "kubectl":
		var c *kubetest.Cluster
		if c, err = kubetest.LoadCluster(*name); err == nil {
			var out []byte
			out, err = c.Kubectl(ctx, fs.Args()...)
			os.Stdout.Write(out)
		}
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "k8scluster:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: k8scluster up [-name N] [-image TAR]... | down [-name N] | kubectl [-name N] -- ARGS")
	os.Exit(2)
}
