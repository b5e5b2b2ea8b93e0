package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestUnderIstiod: Ambit's node proxies and node agents (the chart without
// Ambit's control plane) under a real istiod, pilot-discovery built from
// the istio.io/istio module go.mod names, on the seed's two-node cluster.
// istiod runs beside the API server (no kube-proxy or DNS here to reach a
// pod of it), as istiod's chart configures it for ambient, trusting the
// chart's node account for impersonation. Then: the proxies' xDS node is
// ztunnel's; workloads, services and policies come from istiod's xDS and
// certificates from its CA (each proxy asks for its pods' identities, as a
// ztunnel does, with its own pod-bound token checked by istiod's
// TokenReview); the seed's request crosses the mesh; a PeerAuthentication
// in STRICT mode refuses plaintext from outside the mesh; a DENY policy
// applied with kubectl closes a live connection.
func TestUnderIstiod(t *testing.T) {
	pilot := istiodBin(t)
	e := upCluster(t, "istiod")
	ctx, c, kc := e.ctx, e.c, e.kc
	e.kubectl("create", "namespace", "ambit-system")
	e.startIstiod(pilot, "ambit-system/ambit-node", "ambit-system")
	apiHost, apiPort := splitURL(t, c.APIServer)
	e.helm("install", "ambit", chartDir(t), "--namespace", "ambit-system",
		"--set", "image.tag=e2e", "--set", "image.pullPolicy=Never", "--set", "control.enabled=false",
		"--set", "node.xdsAddress="+apiHost+":15012",
		"--set", "kubernetesServiceHost="+apiHost, "--set", "kubernetesServicePort="+apiPort,
		"--wait", "--timeout", "4m")
	e.waitDaemonSet("ambit-system", "ambit-node", len(c.Nodes))
	// Each proxy is a ztunnel to istiod: istiod took its node id (it closes
	// the stream on any other form) and sent it a complete view.
	for _, n := range c.Nodes {
		name := e.nodePod(n.Name)
		p, err := kc.CoreV1().Pods("ambit-system").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		logs := e.kubectl("-n", "ambit-system", "logs", name, "-c", "proxy")
		want := "id=ztunnel~" + p.Status.PodIP + "~" + name + ".ambit-system~ambit-system.svc.cluster.local"
		if !strings.Contains(logs, want) {
			t.Errorf("node %s: the proxy's xDS node is not ztunnel's (%s):\n%s", n.Name, want, logs)
		}
		if strings.Contains(logs, "NACK") {
			t.Errorf("node %s: the proxy rejected a push of istiod's:\n%s", n.Name, logs)
		}
	}

	// The seed's pods in an ambient namespace, and one outside the mesh.
	e.kubectl("create", "namespace", "demo")
	e.kubectl("label", "namespace", "demo", "istio.io/dataplane-mode=ambient")
	e.kubectl("create", "namespace", "outside")
	for _, sa := range []string{"client", "server"} {
		e.kubectl("-n", "demo", "create", "serviceaccount", sa)
	}
	server := e.pod("demo", "server", "worker1", "server", "serve", ":8080")
	client := e.pod("demo", "client", "master", "client", "pause")
	e.pod("outside", "outsider", "master", "default", "pause")
	e.kubectl("-n", "demo", "create", "service", "clusterip", "server", "--tcp=8080:8080") // selects app=server
	svc, err := kc.CoreV1().Services("demo").Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	serverURL := "http://" + server.Status.PodIP + ":8080/"
	get := func(ns, pod string) (string, error) {
		out, err := e.c.Kubectl(ctx, "-n", ns, "exec", pod, "--", "/testapp", "get", serverURL)
		return string(out), err
	}

	// The seed's request through the mesh: istiod's view of the pods (the
	// server is an HBONE workload on worker1) and its certificates.
	wantPeer := "you are " + client.Status.PodIP + ":"
	e.eventually("the seed's request through the mesh", func() error {
		out, err := get("demo", "client")
		if err != nil {
			return err
		}
		if !strings.Contains(out, wantPeer) {
			return fmt.Errorf("answer %q, want the client's pod IP", out)
		}
		return nil
	})
	logs := e.kubectl("-n", "ambit-system", "logs", "-l", "app=ambit-node", "-c", "proxy", "--tail=-1", "--prefix")
	if !strings.Contains(logs, "dst.hbone_addr="+server.Status.PodIP+":15008") {
		t.Errorf("the proxies' access logs show no HBONE hop to %s:15008:\n%s", server.Status.PodIP, logs)
	}
	// worker1's proxy holds the server's certificate, signed by istiod for
	// the node proxy's own account (impersonation).
	dump := e.adminGet("worker1", "/config_dump")
	if !strings.Contains(dump, `"identity": "spiffe://cluster.local/ns/demo/sa/server"`) {
		t.Errorf("worker1's proxy holds no certificate for the server's identity:\n%s", dump)
	}
	t.Logf("the seed's request under istiod: client %s -> server %s over HBONE", client.Status.PodIP, server.Status.PodIP)

	// Plaintext from outside the mesh is served (PERMISSIVE, Istio's
	// default) until a PeerAuthentication says STRICT; then refused, while
	// the mesh client goes on.
	if out, err := get("outside", "outsider"); err != nil {
		t.Fatalf("plaintext from outside the mesh before STRICT: %v: %s", err, out)
	}
	e.applyFile("strict.yaml", []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
`))
	e.eventually("plaintext refused under STRICT", func() error {
		if out, err := get("outside", "outsider"); err == nil {
			return fmt.Errorf("plaintext still served: %s", out)
		}
		return nil
	})
	if out, err := get("demo", "client"); err != nil || !strings.Contains(out, wantPeer) {
		t.Fatalf("the mesh client under STRICT: %v: %s", err, out)
	}
	e.kubectl("-n", "demo", "delete", "peerauthentication", "strict")
	e.eventually("plaintext served again without STRICT", func() error {
		_, err := get("outside", "outsider")
		return err
	})

	// A DENY policy applied with kubectl, translated by istiod, closes a
	// live connection it now denies.
	t.Logf("the live connection was closed %v after kubectl apply of the DENY policy (through istiod)", e.denyClosesLiveConnection(server.Status.PodIP))
	if out, err := get("demo", "client"); err == nil {
		t.Errorf("a denied request went through: %s", out)
	}

	// Istio's istioctl reads the proxy's state as it reads ztunnel's.
	e.checkIstioctl("worker1", server.Status.PodIP, client.Status.PodIP, svc.Spec.ClusterIP)
}

// istiodBin is pilot-discovery in ISTIO_BIN (`make istio-bins`).
func istiodBin(t *testing.T) string {
	t.Helper()
	bins := os.Getenv("ISTIO_BIN")
	if bins == "" {
		t.Fatal("ISTIO_BIN is not set: `make istio-bins` builds Istio's components into it (`make test` sets it)")
	}
	pilot := filepath.Join(bins, "pilot-discovery")
	if _, err := os.Stat(pilot); err != nil {
		t.Fatalf("istiod: %v (`make istio-bins` builds it)", err)
	}
	return pilot
}

// startIstiod applies Istio's CRDs (its base chart's) and runs istiod as
// its chart runs it for ambient, beside the API server, trusting
// nodeAccount ("namespace/serviceaccount") as node proxies; it returns once
// istiod has published its root in rootNS.
func (e *env) startIstiod(pilot, nodeAccount, rootNS string) {
	t, c := e.t, e.c
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("istiod:\n%s", c.Log("istiod", 6000))
		}
	})
	e.kubectl("apply", "--server-side", "-f", istioCRDs(t))
	e.kubectl("create", "namespace", "istio-system")
	idir := filepath.Join(e.work, "istiod")
	if err := os.MkdirAll(idir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(idir, "mesh.yaml"), []byte("trustDomain: cluster.local\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := c.StartInWire("istiod", []string{
		"REVISION=default", "PILOT_CERT_PROVIDER=istiod", "POD_NAME=istiod-e2e", "POD_NAMESPACE=istio-system",
		"SERVICE_ACCOUNT=istiod", "KUBECONFIG=" + c.Kubeconfig, "CLUSTER_ID=Kubernetes",
		"PILOT_ENABLE_AMBIENT=true", "PILOT_ENABLE_ANALYSIS=false", "CA_TRUSTED_NODE_ACCOUNTS=" + nodeAccount,
	}, idir, pilot, "discovery", "--meshConfig", filepath.Join(idir, "mesh.yaml"), "--monitoringAddr=:15014",
		"--log_output_level=default:info", "--domain", "cluster.local", "--keepaliveMaxServerConnectionAge", "30m")
	if err != nil {
		t.Fatal(err)
	}
	// istiod publishes its root in every namespace; the charts mount it.
	e.wait(2*time.Minute, "istiod's root certificate in "+rootNS, func() error {
		_, err := e.kc.CoreV1().ConfigMaps(rootNS).Get(e.ctx, "istio-ca-root-cert", metav1.GetOptions{})
		return err
	})
}

// istioCRDs is Istio's CRDs file from the istio.io/istio module go.mod
// requires (the base chart's), in the module cache.
func istioCRDs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/istio: %v", err)
	}
	f := filepath.Join(strings.TrimSpace(string(out)), "manifests", "charts", "base", "files", "crd-all.gen.yaml")
	if _, err := os.Stat(f); err != nil {
		t.Fatal(err)
	}
	return f
}

// adminGet fetches a path of the admin port (127.0.0.1:15000) of the node
// proxy on node, from inside its pod's network namespace.
func (e *env) adminGet(node, path string) string {
	e.t.Helper()
	p, err := e.kc.CoreV1().Pods("ambit-system").Get(e.ctx, e.nodePod(node), metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	ns := e.podNetns(p)
	defer ns.Close()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return nsutil.DialTCP(ctx, ns, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:15000"), nil)
		},
	}}
	resp, err := hc.Get("http://127.0.0.1:15000" + path)
	if err != nil {
		e.t.Fatalf("admin %s on %s: %v", path, node, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
