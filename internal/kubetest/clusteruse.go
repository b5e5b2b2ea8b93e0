package kubetest

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Log is the tail of a component's log (etcd, kube-apiserver,
// master-kubelet, worker1-containerd, ...), for a failing test.
func (c *Cluster) Log(tag string, max int) string {
	b, err := os.ReadFile(filepath.Join(c.Dir, "logs", tag+".log"))
	if err != nil {
		return err.Error()
	}
	return string(tail(b, max))
}

// RestConfig is the admin's client-go configuration; its connections are
// made in the wire's namespace.
func (c *Cluster) RestConfig() *rest.Config {
	wire := c.WireNS
	return &rest.Config{
		Host:            c.APIServer,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.CA, CertData: c.AdminCert, KeyData: c.AdminKey},
		QPS:             100, Burst: 200,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ctx, wire, addr)
		},
	}
}

func dialIn(ctx context.Context, nsName, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("kubetest: dial %s: want an IP address and port", addr)
	}
	h, err := netns.GetFromName(nsName)
	if err != nil {
		return nil, fmt.Errorf("kubetest: netns %s: %w", nsName, err)
	}
	defer h.Close()
	return nsutil.DialTCP(ctx, h, netip.AddrPort{}, ap, nil)
}

// Client is client-go for the admin.
func (c *Cluster) Client() (*kubernetes.Clientset, error) {
	return kubernetes.NewForConfig(c.RestConfig())
}

// Kubectl runs the cluster's kubectl as the admin, in the wire's namespace.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return c.InWire(ctx, nil, filepath.Join(BinDir(), "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
}

// InWire runs a command in the wire's namespace (helm, say, with
// KUBECONFIG=c.Kubeconfig in env) and returns its combined output.
func (c *Cluster) InWire(ctx context.Context, env []string, bin string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + c.WireNS, "--", bin}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, bytes.TrimSpace(tail(out, 2048)))
	}
	return out, nil
}

// StartInWire runs a long-lived process in the wire's namespace, beside
// the API server (istiod, say), with env added to the test's environment
// and dir as its working directory; its output goes to the cluster's log
// under tag (Log reads it) and DownCluster stops it with the rest.
func (c *Cluster) StartInWire(tag string, env []string, dir, bin string, args ...string) error {
	return c.startIn(tag, []string{"--net=/run/netns/" + c.WireNS}, "", env, dir, bin, args...)
}

// OnNode runs a command in a node's network, mount and PID namespaces (as
// a process on that node would run).
func (c *Cluster) OnNode(ctx context.Context, node string, argv ...string) ([]byte, error) {
	n := c.Node(node)
	if n == nil {
		return nil, fmt.Errorf("kubetest: no node %q", node)
	}
	cmd := exec.CommandContext(ctx, "nsenter", append(append(n.nsenterArgs(), "--"), argv...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("on %s: %s: %w: %s", node, strings.Join(argv, " "), err, bytes.TrimSpace(tail(out, 2048)))
	}
	return out, nil
}

// Node finds a node by name.
func (c *Cluster) Node(name string) *ClusterNode {
	for i := range c.Nodes {
		if c.Nodes[i].Name == name {
			return &c.Nodes[i]
		}
	}
	return nil
}

// ImportImage loads an OCI layout tar into a node's containerd, where the
// kubelet finds it (the k8s.io namespace); pods use it with
// imagePullPolicy Never or IfNotPresent.
func (c *Cluster) ImportImage(ctx context.Context, node, tarFile string) error {
	abs, err := filepath.Abs(tarFile)
	if err != nil {
		return err
	}
	_, err = c.OnNode(ctx, node, "ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io", "images", "import", abs)
	return err
}

func (c *Cluster) waitAPI(ctx context.Context) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.CA)
	cfg := c.RestConfig()
	tr, err := rest.TransportFor(cfg)
	if err != nil {
		return err
	}
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	return poll(ctx, 2*time.Minute, "the API server's /readyz", func() error {
		resp, err := hc.Get(c.APIServer + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	}, c.Log("kube-apiserver", 2048))
}

func (c *Cluster) waitContainerd(ctx context.Context, n *ClusterNode) error {
	return poll(ctx, time.Minute, n.Name+"'s containerd", func() error {
		_, err := c.OnNode(ctx, n.Name, "ctr", "--address", "/run/containerd/containerd.sock", "version")
		return err
	}, "")
}

// waitReady waits for every node to be Ready and for the default
// namespace's service account (the controller-manager makes it).
func (c *Cluster) waitReady(ctx context.Context) error {
	kc, err := c.Client()
	if err != nil {
		return err
	}
	return poll(ctx, 3*time.Minute, "the nodes Ready", func() error {
		nodes, err := kc.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		ready := 0
		for _, n := range nodes.Items {
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					ready++
				}
			}
		}
		if ready < len(c.Nodes) {
			return fmt.Errorf("%d of %d nodes Ready", ready, len(c.Nodes))
		}
		if _, err := kc.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("the default service account: %w", err)
		}
		return nil
	}, "")
}

// poll calls f until it succeeds, ctx ends or limit passes (a bound for a
// stuck component, not a speed check: each wait ends at the first success).
func poll(ctx context.Context, limit time.Duration, what string, f func() error, logTail string) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("kubetest: waiting for %s: %v", what, err)
			if logTail != "" {
				msg += "\n" + logTail
			}
			return errors.New(msg)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
