package kubesource_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/kubesource"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/xds"
	"google.golang.org/grpc"
	securityv1 "istio.io/api/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// proxyView is a node proxy's xDS client and the last view it applied,
// with when.
type proxyView struct {
	mu   sync.Mutex
	view *workload.Index
	at   time.Time
}

func (p *proxyView) apply(ix *workload.Index) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.view, p.at = ix, time.Now()
	return nil
}

func (p *proxyView) get() (*workload.Index, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.view, p.at
}

// TestChangesReachTheProxies: the whole path, API server → source →
// control plane → delta xDS → a node proxy's xDS client (authenticated by
// its projected token), for each kind of change. Each change's delay, from
// the API server's answer to the proxy's view, is logged; the figure in
// docs/kubernetes.md comes from BenchmarkChangeToProxy.
func TestChangesReachTheProxies(t *testing.T) {
	api := kubetest.Start(t)
	namespace(t, api, "ambit-system", nil)
	namespace(t, api, "demo", map[string]string{"istio.io/dataplane-mode": "ambient"})
	node(t, api, "worker1", nil)
	serviceAccount(t, api, "ambit-system", "ambit-node")
	proxyPod := podSpec{ns: "ambit-system", name: "ambit-node-w1", sa: "ambit-node", node: "worker1", ips: []string{"10.244.1.2"}, ready: true}.run(t, api)
	podSpec{ns: "demo", name: "server", sa: "server", node: "worker1", ips: []string{"10.244.1.3"}, ready: true, labels: map[string]string{"app": "server"}}.run(t, api)

	c := newSource(t, api)
	pv, stop := runMesh(t, c, token(t, api, "ambit-system", "ambit-node", []string{"istio-ca"}, proxyPod))
	defer stop()
	const uid = "Kubernetes//Pod/demo/server"
	testutil.WaitFor(t, "the proxy's first view", func() bool {
		ix, _ := pv.get()
		return ix != nil && ix.WorkloadByUID(uid) != nil
	})
	ctx := context.Background()
	step := func(what string, change func() error, seen func(*workload.Index) bool) {
		t.Helper()
		if err := change(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		written := time.Now()
		testutil.WaitFor(t, what+" at the proxy", func() bool {
			ix, _ := pv.get()
			return seen(ix)
		})
		_, at := pv.get()
		t.Logf("%s: at the proxy %v after the API server's answer", what, at.Sub(written).Round(time.Millisecond))
	}
	pods := api.Kube.CoreV1().Pods("demo")

	step("the node agent's capture annotation", func() error {
		_, err := pods.Patch(ctx, "server", types.MergePatchType, []byte(`{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}`), metav1.PatchOptions{})
		return err
	}, func(ix *workload.Index) bool {
		w := ix.WorkloadByUID(uid)
		return w != nil && w.Protocol == workload.ProtocolHBONE
	})
	step("the namespace leaving the mesh", func() error {
		_, err := api.Kube.CoreV1().Namespaces().Patch(ctx, "demo", types.MergePatchType, []byte(`{"metadata":{"labels":{"istio.io/dataplane-mode":null}}}`), metav1.PatchOptions{})
		return err
	}, func(ix *workload.Index) bool {
		w := ix.WorkloadByUID(uid)
		return w != nil && w.Protocol == workload.ProtocolTCP
	})
	step("a service", func() error {
		service(t, api, "demo", "server", "10.96.0.20", map[string]string{"app": "server"}, tcpPort("http", 80, intstr.FromInt32(8080)))
		return nil
	}, func(ix *workload.Index) bool {
		return ix.ServiceByVIP("", netip.MustParseAddr("10.96.0.20")) != nil
	})
	step("a DENY policy", func() error {
		policy(t, api, "demo", "deny-all", nil, &securityv1.AuthorizationPolicy{Action: securityv1.AuthorizationPolicy_DENY, Rules: []*securityv1.Rule{{}}})
		return nil
	}, func(ix *workload.Index) bool {
		for _, p := range ix.Policies() {
			if p.Key() == "demo/deny-all" && p.Action == authz.ActionDeny && p.Scope == authz.ScopeNamespace {
				return true
			}
		}
		return false
	})
	step("the pod's deletion", func() error {
		return pods.Delete(ctx, "server", metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))})
	}, func(ix *workload.Index) bool { return ix.WorkloadByUID(uid) == nil })
}

// startControl runs the control plane over c's source with auth, as
// `ambit control --kubeconfig` does, on a loopback port: its address and
// a file with its root.
func startControl(t testing.TB, c *cluster, auth control.Authenticator) (addr, rootFile string, stop func()) {
	t.Helper()
	ca := testutil.CA(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := netip.MustParseAddrPort(l.Addr().String())
	l.Close()
	rootFile = filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, identity.EncodeCertificates(ca.Roots()), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- control.Run(ctx, c.src, ca, auth, ap, nil) }()
	return ap.String(), rootFile, func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("control plane: %v", err)
		}
	}
}

// runMesh runs the control plane over c's source, and a node proxy's xDS
// client with tok against it.
func runMesh(t testing.TB, c *cluster, tok string) (*proxyView, func()) {
	t.Helper()
	auth := &kubesource.Auth{Client: c.kc, Pod: c.src.Pod, Trusted: []string{kubesource.DefaultTrustedNodeAccounts}}
	addr, rootFile, stopControl := startControl(t, c, auth)
	conn, err := caclient.Dial(addr, rootFile, "", grpc.WithPerRPCCredentials(caclient.Bearer(func() (string, error) { return tok, nil })))
	if err != nil {
		t.Fatal(err)
	}
	pv := &proxyView{}
	client := &xds.Client{Conn: conn, Node: xds.Node{ID: "ztunnel~10.244.1.2~ambit-node-w1.ambit-system~ambit-system.svc.cluster.local"}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- client.Run(ctx, pv.apply) }()
	return pv, func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("xds client: %v", err)
		}
		conn.Close()
		stopControl()
	}
}
