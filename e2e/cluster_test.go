// Package e2e runs Ambit on a real two-node Kubernetes cluster
// (internal/kubetest: kubelets, containerd, the CNI bridge plugin), installed
// by its Helm chart with the image `make image` builds.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/kubenode"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/trace"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

const imageRef = "ambitmesh/ambit:e2e"

// TestMeshOnARealCluster: helm install of the chart on the seed's
// two-node cluster, with the image `make image` builds, then in turn: a
// pod that ran before the install enrolled through /proc; new pods in an
// ambient namespace enrolled through ambit-cni; the seed's request from
// one to the other as TLS to 15008 only (captured on the pod's interface
// and the wire), the server seeing the client's pod IP; `ambit trace` of
// it; the agent killed alone (a live connection survives); a ClusterIP
// through the mesh; a DENY policy closing a live connection; the node pod
// replaced; a pod deleted and unenrolled; helm uninstall leaving the pods
// working un-meshed and the nodes' CNI configuration as it was.
func TestMeshOnARealCluster(t *testing.T) {
	e := upCluster(t, "e2e")
	ctx, c, kc, work := e.ctx, e.c, e.kc, e.work
	confBefore := e.conflists()

	// The CA, as the chart's README says: `ambit ca init`, then a Secret.
	ambit := filepath.Join(work, "ambit")
	if out, err := exec.Command(ambit, "ca", "init", "--dir", filepath.Join(work, "ca")).CombinedOutput(); err != nil {
		t.Fatalf("ambit ca init: %v: %s", err, out)
	}
	// Istio's AuthorizationPolicy CRD, as a cluster with Istio's base
	// chart has it.
	e.applyFile("crd.yaml", e.authzCRD())
	e.eventually("the AuthorizationPolicy CRD served", func() error {
		_, err := e.c.Kubectl(ctx, "get", "authorizationpolicies", "-A")
		return err
	})
	// A mesh namespace and a pod in it that runs before Ambit is there.
	e.kubectl("create", "namespace", "demo")
	e.kubectl("label", "namespace", "demo", "istio.io/dataplane-mode=ambient")
	for _, sa := range []string{"client", "server", "early"} {
		e.kubectl("-n", "demo", "create", "serviceaccount", sa)
	}
	early := e.pod("demo", "early", "worker1", "early", "serve", ":8080")
	e.kubectl("create", "namespace", "ambit-system")
	e.kubectl("-n", "ambit-system", "create", "secret", "generic", "ambit-ca", "--from-file="+filepath.Join(work, "ca"))
	master := c.Node("master").Addr.String()
	apiHost, apiPort := splitURL(t, c.APIServer)
	e.helm("install", "ambit", chartDir(t), "--namespace", "ambit-system",
		"--set", "image.tag=e2e", "--set", "image.pullPolicy=Never",
		// No kube-proxy and no DNS here: the control plane on master's
		// network, the proxies to it by master's address, the API server
		// by its own.
		"--set", "control.hostNetwork=true", "--set", "control.nodeSelector.kubernetes\\.io/hostname=master",
		"--set", "node.xdsAddress="+master+":15012",
		"--set", "kubernetesServiceHost="+apiHost, "--set", "kubernetesServicePort="+apiPort,
		"--wait", "--timeout", "4m")
	e.waitDaemonSet("ambit-system", "ambit-node", len(c.Nodes))
	for _, n := range c.Nodes {
		if ok := strings.Contains(e.conflist(n.Name), `"type": "ambit-cni"`); !ok {
			t.Fatalf("node %s: ambit-cni is not chained into the CNI configuration:\n%s", n.Name, e.conflist(n.Name))
		}
	}

	// Two pods in an ambient namespace, created after the install: the
	// CNI plugin enrolls them during their ADD. (The namespace, and a pod
	// that ran before Ambit, were made before the install: above.)
	server := e.pod("demo", "server", "worker1", "server", "serve", ":8080")
	client := e.pod("demo", "client", "master", "client", "pause")
	for _, p := range []*corev1.Pod{server, client} {
		if got := p.Annotations["ambient.istio.io/redirection"]; got != "enabled" {
			t.Errorf("pod %s: redirection annotation %q, want enabled", p.Name, got)
		}
	}
	serverURL := "http://" + server.Status.PodIP + ":8080/"
	wantPeer := "you are " + client.Status.PodIP + ":"

	// The seed's request, watched on the server pod's own interface and on
	// worker1's wire: between the pods, only TLS to 15008.
	podCap := e.capture(e.podNetns(server), "eth0")
	wireCap := e.capture(e.nodeNetns("worker1"), "eth0")
	out := e.exec("demo", "client", "/testapp", "get", serverURL)
	for where, capt := range map[string]*trace.Capture{"the server pod's eth0": podCap, "worker1's wire": wireCap} {
		e.onlyHBONE(where, capt.Stop(), client.Status.PodIP, server.Status.PodIP)
	}
	if !strings.Contains(out, wantPeer) {
		t.Fatalf("through the mesh: %q, want the server to see the client's pod IP (%q)", out, wantPeer)
	}
	t.Logf("the seed's request through the mesh: %s", strings.TrimSpace(out))
	logs := e.kubectl("-n", "ambit-system", "logs", "-l", "app=ambit-node", "-c", "proxy", "--tail=-1", "--prefix")
	if !strings.Contains(logs, "dst.hbone_addr="+server.Status.PodIP+":15008") {
		t.Errorf("the proxies' access logs show no HBONE hop to %s:15008:\n%s", server.Status.PodIP, logs)
	}

	// The pod that ran before the install was enrolled when the agent
	// started (found through /proc) and is reached through the mesh.
	e.eventually("the early pod enrolled", func() error {
		p, err := kc.CoreV1().Pods("demo").Get(ctx, "early", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if v := p.Annotations["ambient.istio.io/redirection"]; v != "enabled" {
			return fmt.Errorf("annotation %q", v)
		}
		return nil
	})
	before := strings.Count(e.kubectl("-n", "ambit-system", "logs", e.nodePod("worker1"), "-c", "proxy"), "dst.workload=early")
	if out := e.exec("demo", "client", "/testapp", "get", "http://"+early.Status.PodIP+":8080/"); !strings.Contains(out, wantPeer) {
		t.Errorf("to the pod that ran before the install: %q", out)
	}
	e.eventually("worker1's proxy's record of the request to the early pod", func() error {
		if n := strings.Count(e.kubectl("-n", "ambit-system", "logs", e.nodePod("worker1"), "-c", "proxy"), "dst.workload=early"); n <= before {
			return fmt.Errorf("%d records", n)
		}
		return nil
	})

	// The agent restarted alone (its container killed): the proxy keeps
	// serving the node's pods, a live connection through it survives, and
	// new connections work while the agent is away and after.
	live := e.hold("demo", "client", server.Status.PodIP+":8080")
	restarts := e.containerRestarts("worker1", "agent")
	e.killContainer("worker1", "node-agent")
	if out := e.exec("demo", "client", "/testapp", "get", serverURL); !strings.Contains(out, wantPeer) {
		t.Errorf("while worker1's agent restarts: %q", out)
	}
	e.eventually("worker1's agent restarted", func() error {
		if n := e.containerRestarts("worker1", "agent"); n <= restarts {
			return fmt.Errorf("%d restarts", n)
		}
		return nil
	})
	e.waitDaemonSet("ambit-system", "ambit-node", len(c.Nodes))
	select {
	case <-live.done:
		t.Errorf("a live connection ended when the agent restarted:\n%s", live.out.String())
	default:
	}
	if out := e.exec("demo", "client", "/testapp", "get", serverURL); !strings.Contains(out, wantPeer) {
		t.Errorf("after worker1's agent restarted: %q", out)
	}
	live.stop()

	// ambit trace on the cluster: the same request hop by hop, from the
	// machine that holds the nodes (kubectl's network: the API server's).
	traceDir := filepath.Join(work, "trace")
	tr, err := c.InWire(ctx, nil, ambit, "trace", "--kubeconfig", c.Kubeconfig, "--from", "demo/client", "--to", server.Status.PodIP+":8080", "--out", traceDir)
	if err != nil {
		t.Fatalf("ambit trace: %v\n%s", err, tr)
	}
	for _, want := range []string{"1. client pod, lo", "2. client pod, eth0", "3. node master's uplink (eth0)", "4. server pod, eth0", "5. server pod, lo",
		"answer: HTTP/1.1 200 OK", ":15008", "== the proxy of node worker1 said", "connection complete"} {
		if !strings.Contains(string(tr), want) {
			t.Errorf("ambit trace's account lacks %q:\n%s", want, tr)
		}
	}
	if pcaps, _ := filepath.Glob(filepath.Join(traceDir, "*.pcap")); len(pcaps) != 5 {
		t.Errorf("ambit trace wrote %d pcaps, want one per hop (5): %v", len(pcaps), pcaps)
	}
	t.Logf("ambit trace on the cluster:\n%s", tr)

	// A Service's ClusterIP: no kube-proxy here, so only the mesh routes it.
	e.kubectl("-n", "demo", "create", "service", "clusterip", "server", "--tcp=80:8080")
	svc, err := kc.CoreV1().Services("demo").Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.eventually("the ClusterIP through the mesh", func() error {
		out, err := e.c.Kubectl(ctx, "-n", "demo", "exec", "client", "--", "/testapp", "get", "http://"+svc.Spec.ClusterIP+"/")
		if err != nil {
			return err
		}
		if !strings.Contains(string(out), wantPeer) {
			return fmt.Errorf("answer %q", out)
		}
		return nil
	})

	// A DENY policy applied with kubectl closes a live connection it now
	// denies, and refuses new ones; removed, traffic flows again.
	t.Logf("the live connection was closed %v after kubectl apply of the DENY policy", e.denyClosesLiveConnection(server.Status.PodIP))
	if out, err := e.c.Kubectl(ctx, "-n", "demo", "exec", "client", "--", "/testapp", "get", serverURL); err == nil {
		t.Errorf("a denied request went through: %s", out)
	}
	e.kubectl("-n", "demo", "delete", "authorizationpolicy", "deny-client")
	e.eventually("traffic after the policy is removed", func() error {
		_, err := e.c.Kubectl(ctx, "-n", "demo", "exec", "client", "--", "/testapp", "get", serverURL)
		return err
	})

	// The DaemonSet's rolling update during a long transfer: no reset.
	e.rollingUpdateResetsNothing(server.Status.PodIP, wantPeer)

	// The node pod on worker1 deleted: the DaemonSet makes a new one, whose
	// agent finds the running server pod through /proc and enrolls it
	// again, and traffic flows through the mesh again.
	old := e.nodePod("worker1")
	e.kubectl("-n", "ambit-system", "delete", "pod", old)
	e.eventually("a new node pod on worker1", func() error {
		if p := e.nodePod("worker1"); p == old || p == "" {
			return fmt.Errorf("still %q", p)
		}
		return nil
	})
	e.waitDaemonSet("ambit-system", "ambit-node", len(c.Nodes))
	out = e.exec("demo", "client", "/testapp", "get", serverURL)
	if !strings.Contains(out, wantPeer) {
		t.Fatalf("after the node pod's restart: %q", out)
	}
	e.eventually("the new proxy's inbound record", func() error {
		if l := e.kubectl("-n", "ambit-system", "logs", e.nodePod("worker1"), "-c", "proxy"); !strings.Contains(l, "direction=inbound") {
			return fmt.Errorf("no inbound record: the request did not cross the new proxy:\n%s", l)
		}
		return nil
	})

	// A pod deleted is unenrolled: the agent lets it go and the proxy
	// closes its listeners.
	e.kubectl("-n", "demo", "delete", "pod", "server", "--wait=true")
	e.eventually("the server pod unenrolled", func() error {
		agent := e.kubectl("-n", "ambit-system", "logs", e.nodePod("worker1"), "-c", "agent")
		proxy := e.kubectl("-n", "ambit-system", "logs", e.nodePod("worker1"), "-c", "proxy")
		if !strings.Contains(agent, "pod out of the mesh\" pod=demo/server") || !strings.Contains(proxy, "pod removed\" uid=Kubernetes//Pod/demo/server") {
			return fmt.Errorf("agent:\n%s\nproxy:\n%s", agent, proxy)
		}
		return nil
	})
	server = e.pod("demo", "server", "worker1", "server", "serve", ":8080")
	serverURL = "http://" + server.Status.PodIP + ":8080/"

	// Uninstall: the pods stay and work, out of the mesh; the nodes' CNI
	// configuration is as it was, byte for byte.
	e.followAgentLogs() // the agents' account of the uninstall, shown if the test fails
	e.helm("uninstall", "ambit", "--namespace", "ambit-system", "--wait", "--timeout", "3m")
	e.waitGone("ambit-system", "app=ambit-node")
	for _, n := range c.Nodes {
		if got := e.conflist(n.Name); got != confBefore[n.Name] {
			t.Errorf("node %s: the CNI configuration after uninstall differs:\n%s\nwas:\n%s", n.Name, got, confBefore[n.Name])
		}
	}
	out = e.exec("demo", "client", "/testapp", "get", serverURL)
	if !strings.Contains(out, wantPeer) {
		t.Fatalf("after uninstall: %q, want the request to work un-meshed", out)
	}
	// Un-meshed for real: plain HTTP on the server pod's interface now.
	podCap = e.capture(e.podNetns(server), "eth0")
	e.exec("demo", "client", "/testapp", "get", serverURL)
	plain := false
	for _, p := range trace.TCP(podCap.Stop()) {
		plain = plain || trace.PlaintextHTTP(p)
	}
	if !plain {
		t.Error("after uninstall the request did not go as plain HTTP: capture is still in place")
	}
	// The annotation goes when the agent wins its race with helm, which
	// deletes the agent's RBAC right after its DaemonSet (the agent acts on
	// the DaemonSet's deletion at once): reported, not asserted.
	for _, name := range []string{"server", "client"} {
		if p, err := kc.CoreV1().Pods("demo").Get(ctx, name, metav1.GetOptions{}); err == nil {
			t.Logf("pod %s after uninstall: redirection annotation %q", name, p.Annotations["ambient.istio.io/redirection"])
		}
	}
}

type env struct {
	t         *testing.T
	ctx       context.Context
	c         *kubetest.Cluster
	kc        *kubernetes.Clientset
	work      string
	agentLogs string // followed by followAgentLogs, if it ran
}

// followAgentLogs streams the node agents' logs to a file until the test
// ends: their pods are gone by the time a failure is reported.
// upCluster brings up the seed's two-node cluster under name, with the
// image `make image` builds (and extraImages, OCI layout tars) loaded on its
// nodes; it comes down when the test ends, after a dump of what ran if the
// test failed.
func upCluster(t *testing.T, name string, extraImages ...string) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (a cluster: namespaces, mounts, cgroups); `make test` runs as root")
	}
	ctx := context.Background()
	work := t.TempDir()
	img, err := kubetest.AmbitImage(ctx, work, imageRef)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kubetest.UpCluster(ctx, kubetest.ClusterSpec{Name: name, Images: append([]string{img}, extraImages...), Log: logWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := kubetest.DownCluster(name); err != nil {
			t.Error(err)
		}
	})
	kc, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, c: c, kc: kc, work: work}
	t.Cleanup(e.dumpOnFailure)
	return e
}

func (e *env) followAgentLogs() {
	e.t.Helper()
	e.agentLogs = filepath.Join(e.work, "agents.log")
	f, err := os.Create(e.agentLogs)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := e.kubectlCmd("-n", "ambit-system", "logs", "-f", "-l", "app=ambit-node", "-c", "agent", "--prefix", "--tail=20")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); f.Close() })
}

// kubectlCmd is kubectl with args, from the API server's network, to be
// started in the background (a follow, an exec that runs a while).
func (e *env) kubectlCmd(args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + e.c.WireNS, "--", filepath.Join(kubetest.BinDir(), "kubectl"),
		"--kubeconfig", e.c.Kubeconfig}, args...)...)
}

func (e *env) kubectl(args ...string) string {
	e.t.Helper()
	out, err := e.c.Kubectl(e.ctx, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(out)
}

func (e *env) helm(args ...string) string {
	e.t.Helper()
	bin := os.Getenv("HELM")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("helm"); err != nil {
			e.t.Fatalf("helm is not installed (make helm): %v", err)
		}
	}
	out, err := e.c.InWire(e.ctx, []string{"KUBECONFIG=" + e.c.Kubeconfig, "HELM_CACHE_HOME=" + filepath.Join(e.work, "helm-cache"), "HELM_CONFIG_HOME=" + filepath.Join(e.work, "helm-config")}, bin, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(out)
}

func (e *env) exec(ns, pod string, argv ...string) string {
	e.t.Helper()
	return e.kubectl(append([]string{"-n", ns, "exec", pod, "--"}, argv...)...)
}

// pod creates a test pod on node and waits for it to run.
func (e *env) pod(ns, name, node, sa string, args ...string) *corev1.Pod {
	e.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: kubetest.TestImage, ImagePullPolicy: corev1.PullNever, Args: args}},
		},
	}
	if _, err := e.kc.CoreV1().Pods(ns).Create(e.ctx, p, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	var got *corev1.Pod
	e.wait(2*time.Minute, "pod "+ns+"/"+name+" running", func() error {
		var err error
		if got, err = e.kc.CoreV1().Pods(ns).Get(e.ctx, name, metav1.GetOptions{}); err != nil {
			return err
		}
		if got.Status.Phase != corev1.PodRunning || got.Status.PodIP == "" {
			return fmt.Errorf("phase %s", got.Status.Phase)
		}
		return nil
	})
	return got
}

func (e *env) waitDaemonSet(ns, name string, want int) {
	e.t.Helper()
	e.wait(3*time.Minute, "DaemonSet "+name+" ready on every node", func() error {
		ds, err := e.kc.AppsV1().DaemonSets(ns).Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if int(ds.Status.NumberReady) < want {
			return fmt.Errorf("%d of %d ready", ds.Status.NumberReady, want)
		}
		return nil
	})
}

func (e *env) waitGone(ns, selector string) {
	e.t.Helper()
	e.wait(2*time.Minute, "pods "+selector+" gone", func() error {
		l, err := e.kc.CoreV1().Pods(ns).List(e.ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d left", len(l.Items))
		}
		return nil
	})
}

// wait polls f until it succeeds; limit bounds a stuck cluster, it is not
// a speed check.
func (e *env) wait(limit time.Duration, what string, f func() error) {
	e.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("waiting for %s: %v", what, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// conflist is the node's CNI configuration file, as the runtime reads it.
func (e *env) conflist(node string) string {
	b, err := os.ReadFile(filepath.Join(e.c.Node(node).Dir, "cni", "net.d", "10-bridge.conflist"))
	if err != nil {
		e.t.Fatal(err)
	}
	return string(b)
}

func (e *env) conflists() map[string]string {
	m := map[string]string{}
	for _, n := range e.c.Nodes {
		m[n.Name] = e.conflist(n.Name)
	}
	return m
}

func (e *env) dumpOnFailure() {
	if !e.t.Failed() {
		return
	}
	for _, args := range [][]string{
		{"get", "pods", "-A", "-o", "wide"},
		{"-n", "ambit-system", "logs", "-l", "app=ambit-node", "-c", "agent", "--tail=60", "--prefix"},
		{"-n", "ambit-system", "logs", "-l", "app=ambit-node", "-c", "proxy", "--tail=60", "--prefix"},
		{"-n", "ambit-system", "logs", "-l", "app=ambit-control", "--tail=40"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
	} {
		out, err := e.c.Kubectl(e.ctx, args...)
		e.t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if e.agentLogs != "" {
		b, _ := os.ReadFile(e.agentLogs)
		e.t.Logf("the node agents during the uninstall:\n%s", b)
	}
	// What capture is left in the test pods' namespaces.
	if pods, err := e.kc.CoreV1().Pods("demo").List(e.ctx, metav1.ListOptions{}); err == nil {
		for _, p := range pods.Items {
			if path, err := kubenode.PodNetns("/proc", "", string(p.UID)); err == nil {
				out, _ := exec.Command("nsenter", "--net="+path, "--", "nft", "list", "ruleset").CombinedOutput()
				rules, _ := exec.Command("nsenter", "--net="+path, "--", "ip", "rule").CombinedOutput()
				e.t.Logf("pod %s (%s): nft:\n%s\nip rule:\n%s", p.Name, p.Status.PodIP, out, rules)
			}
		}
	}
	for _, tag := range []string{"master-kubelet", "worker1-kubelet", "master-containerd"} {
		e.t.Logf("%s:\n%s", tag, e.c.Log(tag, 3000))
	}
}

func chartDir(t *testing.T) string {
	d, err := filepath.Abs("../deploy/helm/ambit")
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func splitURL(t *testing.T, u string) (string, string) {
	hp := strings.TrimPrefix(u, "https://")
	i := strings.LastIndexByte(hp, ':')
	if i < 0 {
		t.Fatalf("API server URL %q has no port", u)
	}
	return hp[:i], hp[i+1:]
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// eventually retries f for up to a minute (a bound for a stuck cluster).
func (e *env) eventually(what string, f func() error) {
	e.t.Helper()
	e.wait(time.Minute, what, f)
}

func (e *env) applyFile(name string, data []byte) {
	e.t.Helper()
	f := filepath.Join(e.work, name)
	if err := os.WriteFile(f, data, 0o644); err != nil {
		e.t.Fatal(err)
	}
	e.kubectl("apply", "-f", f)
}

func (e *env) authzCRD() []byte {
	e.t.Helper()
	doc, err := kubetest.AuthorizationPolicyCRD()
	if err != nil {
		e.t.Fatal(err)
	}
	return doc
}

// denyClosesLiveConnection holds a connection from demo/client to the
// server at serverIP:8080, applies a DENY policy for the client's identity
// on the server with kubectl, and returns how long the connection lived
// after (failing the test past 30 s).
func (e *env) denyClosesLiveConnection(serverIP string) time.Duration {
	e.t.Helper()
	hold := e.hold("demo", "client", serverIP+":8080")
	e.applyFile("deny.yaml", []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
`))
	applied := time.Now()
	select {
	case <-hold.done:
		return time.Since(applied).Round(time.Millisecond)
	case <-time.After(30 * time.Second):
		e.t.Fatalf("a DENY policy did not close the live connection it denies (30 s)\n%s", hold.out.String())
	}
	return 0
}

// held is a connection held open from a pod (testapp hold) by a kubectl
// exec in the background; done closes when it ends.
type held struct {
	done chan struct{}
	out  *strings.Builder
	stop func()
}

func (e *env) hold(ns, pod, addr string) *held {
	e.t.Helper()
	h := &held{done: make(chan struct{}), out: &strings.Builder{}}
	cmd := e.kubectlCmd("-n", ns, "exec", pod, "--", "/testapp", "hold", addr)
	pr, pw, err := os.Pipe()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	pw.Close()
	up := make(chan struct{}, 1)
	go func() { // ends when the command's output closes
		buf := make([]byte, 4096)
		for {
			n, err := pr.Read(buf)
			h.out.Write(buf[:n])
			if strings.Contains(h.out.String(), "up\n") {
				select {
				case up <- struct{}{}:
				default:
				}
			}
			if err != nil {
				pr.Close()
				return
			}
		}
	}()
	go func() { _ = cmd.Wait(); close(h.done) }() // ends with the command
	h.stop = func() { _ = cmd.Process.Kill(); <-h.done }
	e.t.Cleanup(h.stop)
	select {
	case <-up:
	case <-h.done:
		e.t.Fatalf("the held connection ended at once: %s", h.out.String())
	case <-time.After(30 * time.Second):
		e.t.Fatalf("the held connection is not up: %s", h.out.String())
	}
	return h
}

func (e *env) nodePod(node string) string {
	l, err := e.kc.CoreV1().Pods("ambit-system").List(e.ctx, metav1.ListOptions{LabelSelector: "app=ambit-node", FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			return p.Name
		}
	}
	return ""
}

// podNetns is a running pod's network namespace, found from the host as
// the node agent finds it (kubenode.PodNetns).
func (e *env) podNetns(p *corev1.Pod) netns.NsHandle {
	e.t.Helper()
	path, err := kubenode.PodNetns("/proc", "", string(p.UID))
	if err != nil {
		e.t.Fatalf("pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { h.Close() })
	return h
}

func (e *env) nodeNetns(node string) netns.NsHandle {
	e.t.Helper()
	h, err := netns.GetFromName(e.c.Node(node).NetNS)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { h.Close() })
	return h
}

func (e *env) capture(ns netns.NsHandle, iface string) *trace.Capture {
	e.t.Helper()
	c, err := trace.Start(ns, iface)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// onlyHBONE: every TCP segment between the two pods went to or from 15008,
// and none carried plain HTTP; at least one did go.
func (e *env) onlyHBONE(where string, packets []trace.Packet, a, b string) {
	e.t.Helper()
	seen := 0
	for _, p := range trace.TCP(packets) {
		line := trace.Describe(p, p.Time)
		if !(strings.Contains(line, a) && strings.Contains(line, b)) {
			continue
		}
		seen++
		if !strings.Contains(line, ":15008") || trace.PlaintextHTTP(p) {
			e.t.Errorf("%s: a segment between the pods not as TLS to 15008: %s", where, line)
		}
	}
	if seen == 0 {
		e.t.Errorf("%s: no segment between %s and %s was captured", where, a, b)
	}
}

func (e *env) containerRestarts(node, container string) int32 {
	e.t.Helper()
	p, err := e.kc.CoreV1().Pods("ambit-system").Get(e.ctx, e.nodePod(node), metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, cs := range p.Status.ContainerStatuses {
		if cs.Name == container {
			return cs.RestartCount
		}
	}
	return 0
}

// killContainer SIGKILLs the process of the node pod on node whose
// command line has arg (the image has no shell: from the host, by the
// pod's cgroup).
func (e *env) killContainer(node, arg string) {
	e.t.Helper()
	p, err := e.kc.CoreV1().Pods("ambit-system").Get(e.ctx, e.nodePod(node), metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cgroup")
	for _, f := range procs {
		cg, err := os.ReadFile(f)
		if err != nil || !strings.Contains(string(cg), "pod"+string(p.UID)) {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join(filepath.Dir(f), "cmdline"))
		if strings.Contains(string(cmdline), arg) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				e.t.Fatal(err)
			}
			return
		}
	}
	e.t.Fatalf("no process %q in pod %s", arg, p.Name)
}
