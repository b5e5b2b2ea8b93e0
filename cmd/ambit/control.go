package main

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubesource"
	"github.com/spf13/cobra"
)

func newControlCmd() *cobra.Command {
	var cfgPath, caDir, tokensPath, listen, kubeconfig, trusted, monitoring, rootCM string
	var opts kubesource.Options
	cmd := &cobra.Command{
		Use:   "control --ca-dir DIR (--config FILE --tokens FILE | [--kubeconfig FILE]) [--listen 127.0.0.1:15012]",
		Short: "Run the control plane: Istio's CA and delta xDS (workloads, services, policies) over one TLS gRPC port",
		Long: `Run the control plane. The mesh comes from a watched ztunnel-format file
(--config, with node proxies' bearer tokens in --tokens), or from a Kubernetes
API server (--kubeconfig FILE, or in a pod the in-cluster config when neither
--config nor --kubeconfig is given); Kubernetes node proxies authenticate with
their projected service-account token (audience istio-ca), checked by a
TokenReview.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" {
				return errors.New("--ca-dir is required")
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
			if cfgPath != "" {
				if kubeconfig != "" {
					return errors.New("--config and --kubeconfig are two sources of the mesh: give one")
				}
				return runControlFile(cmd.Context(), cfgPath, tokensPath, ca, ap, log)
			}
			if tokensPath != "" {
				return errors.New("--tokens is for --config; with Kubernetes node proxies present service-account tokens")
			}
			return runControlKube(cmd.Context(), kubeconfig, trusted, monitoring, rootCM, opts, ca, ap, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgPath, "config", "", "ztunnel-format mesh config, watched (instead of Kubernetes)")
	f.StringVar(&caDir, "ca-dir", "", "CA directory in Istio's plug-in layout (required)")
	f.StringVar(&tokensPath, "tokens", "", `with --config: bearer tokens, one "TOKEN NODE" per line`)
	f.StringVar(&listen, "listen", "127.0.0.1:15012", "address to serve the CA and xDS on")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster whose mesh to serve (default: in-cluster)")
	f.StringVar(&trusted, "trusted-node-accounts", kubesource.DefaultTrustedNodeAccounts, "service accounts of the node proxies, namespace/name, comma-separated")
	f.StringVar(&opts.RootNamespace, "root-namespace", "istio-system", "namespace whose selector-less AuthorizationPolicies apply mesh-wide")
	f.StringVar(&opts.ClusterID, "cluster-id", "Kubernetes", "the cluster's name in workload uids (CLUSTER_ID)")
	f.StringVar(&opts.TrustDomain, "trust-domain", "cluster.local", "trust domain of the cluster's workloads")
	f.StringVar(&opts.DomainSuffix, "domain-suffix", "cluster.local", "DNS suffix of the cluster's services")
	f.StringVar(&opts.Network, "network", "", "the cluster's network name, if it has one")
	f.StringVar(&monitoring, "monitoring", "127.0.0.1:15014", `with Kubernetes: address of /metrics ("" for none)`)
	f.StringVar(&rootCM, "root-cert-configmap", "", "with Kubernetes: publish the CA's root certificate(s) to this ConfigMap (namespace/name), for the node proxies")
	return cmd
}

// runControlFile serves the mesh of a watched file to the nodes of a
// tokens file.
func runControlFile(ctx context.Context, cfgPath, tokensPath string, ca *identity.CA, ap netip.AddrPort, log *slog.Logger) error {
	if tokensPath == "" {
		return errors.New("--config needs --tokens (the node proxies' bearer tokens)")
	}
	tokens, err := control.LoadTokens(tokensPath)
	if err != nil {
		return err
	}
	return control.Run(ctx, &config.Watcher{Path: cfgPath, Log: log}, ca, tokens, ap, log)
}

// runControlKube serves the mesh of a Kubernetes cluster to its node
// proxies, authenticated by TokenReview.
func runControlKube(ctx context.Context, kubeconfig, trusted, monitoring, rootCM string, opts kubesource.Options, ca *identity.CA, ap netip.AddrPort, log *slog.Logger) error {
	accounts, err := kubesource.ParseAccounts(trusted)
	if err != nil {
		return fmt.Errorf("--trusted-node-accounts: %w", err)
	}
	client, kc, err := kubeClient(kubeconfig, "no --config or --kubeconfig, and not in a pod")
	if err != nil {
		return err
	}
	defer client.Close()
	src := kubesource.New(client, opts, log)
	auth := &kubesource.Auth{Client: client, Pod: src.Pod, Trusted: accounts}
	if monitoring != "" {
		stop, err := serveMetrics(ctx, monitoring, src.Handler(), log)
		if err != nil {
			return err
		}
		defer stop()
	}
	if rootCM != "" {
		if err := publishRoots(ctx, client, rootCM, ca); err != nil {
			return err
		}
	}
	log.Info("mesh from the Kubernetes API server", "server", kc.Server, "cluster", src.ClusterID, "rootNamespace", src.RootNamespace)
	return control.Run(ctx, src, ca, auth, ap, log)
}

// kubeClient is the API client of the kubeconfig file, or (none given) the
// pod's in-cluster config; notInPod prefixes the error when neither works.
func kubeClient(kubeconfig, notInPod string) (*kube.Client, *kube.Config, error) {
	var kc *kube.Config
	var err error
	if kubeconfig != "" {
		kc, err = kube.LoadKubeconfig(kubeconfig)
	} else if kc, err = kube.InCluster(); err != nil {
		err = fmt.Errorf("%s: %w", notInPod, err)
	}
	if err != nil {
		return nil, nil, err
	}
	client, err := kube.New(kc)
	if err != nil {
		return nil, nil, err
	}
	return client, kc, nil
}

// publishRoots writes the CA's trust bundle to the ConfigMap ns/name
// (root-cert.pem), as istiod publishes istio-ca-root-cert: the node
// proxies mount it to trust the control plane. The CA's key stays in its
// Secret, which no node can read.
func publishRoots(ctx context.Context, client *kube.Client, nsName string, ca *identity.CA) error {
	ns, name, ok := strings.Cut(nsName, "/")
	if !ok || ns == "" || name == "" {
		return fmt.Errorf("--root-cert-configmap %q: want namespace/name", nsName)
	}
	var bundle []byte
	for _, r := range ca.Roots() {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := client.ApplyConfigMap(ctx, ns, name, "ambit-control", map[string]string{"app.kubernetes.io/part-of": "ambit"},
		map[string]string{identity.RootCertFile: string(bundle)}); err != nil {
		return fmt.Errorf("publishing the root certificate to ConfigMap %s: %w", nsName, err)
	}
	return nil
}

// serveMetrics serves h at /metrics on addr until stop (or ctx's end).
func serveMetrics(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--monitoring: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	done := make(chan struct{})
	go func() { // ends when srv is closed by stop
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("monitoring stopped", "err", err)
		}
	}()
	log.Info("monitoring serving", "addr", l.Addr().String())
	return func() { srv.Close(); <-done }, nil
}
