package kubetest

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestClusterCarriesPodTraffic starts the two-node cluster, runs a server
// pod on worker1 and a client on master, and sends the seed's request
// from one to the other with kubectl exec (through the API server and the
// client's kubelet): the server sees the client's pod IP, across nodes.
// Then Down leaves nothing behind.
func TestClusterCarriesPodTraffic(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (namespaces, mounts, cgroups); `make test` runs as root")
	}
	ctx := context.Background()
	before := HostPaths()
	c, err := UpCluster(ctx, ClusterSpec{Name: "kt", Log: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	down := func() {
		if err := DownCluster("kt"); err != nil {
			t.Error(err)
		}
	}
	defer func() {
		if t.Failed() && c != nil {
			for _, tag := range []string{"kube-apiserver", "master-kubelet", "worker1-kubelet", "master-containerd"} {
				t.Logf("%s:\n%s", tag, c.Log(tag, 3000))
			}
		}
		down()
	}()
	kc, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	pod := func(name, node string, args ...string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: corev1.PodSpec{
				NodeName: node, AutomountServiceAccountToken: new(false),
				Containers: []corev1.Container{{Name: "app", Image: TestImage, ImagePullPolicy: corev1.PullNever, Args: args}},
			},
		}
	}
	for _, p := range []*corev1.Pod{pod("server", "worker1", "serve", ":8080"), pod("client", "master", "pause")} {
		if _, err := kc.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ips := map[string]string{}
	err = poll(ctx, 2*time.Minute, "both pods running", func() error {
		for _, name := range []string{"server", "client"} {
			p, err := kc.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				return fmt.Errorf("pod %s: %s", name, p.Status.Phase)
			}
			ips[name] = p.Status.PodIP
		}
		return nil
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	if !c.Node("worker1").PodCIDR.Contains(mustAddr(t, ips["server"])) || !c.Node("master").PodCIDR.Contains(mustAddr(t, ips["client"])) {
		t.Errorf("pod IPs %v not in their nodes' pod CIDRs", ips)
	}
	out, err := c.Kubectl(ctx, "exec", "client", "--", "/testapp", "get", "http://"+ips["server"]+":8080/")
	if err != nil {
		t.Fatal(err)
	}
	if want := "you are " + ips["client"] + ":"; !strings.Contains(string(out), want) {
		t.Errorf("the server's answer %q does not show the client's pod IP (want %q)", out, want)
	}
	t.Logf("seed's request across nodes: %s", strings.TrimSpace(string(out)))
	// The pod bridge keeps its own address with pods plugged in: one the
	// kernel picks follows the lowest port's, and a pod going would then
	// leave every pod of the node with a stale ARP entry for its gateway.
	link, err := exec.Command("ip", "-n", c.Node("worker1").NetNS, "link", "show", "cni0").CombinedOutput()
	if err != nil || !strings.Contains(string(link), "02:a0:0a:f4:01:01") {
		t.Errorf("worker1's cni0: %s %v; want the fixed address 02:a0:0a:f4:01:01", link, err)
	}

	down()
	c = nil
	if left := Leftovers("kt"); len(left) > 0 {
		t.Errorf("left behind after Down:\n%s", strings.Join(left, "\n"))
	}
	if after := HostPaths(); !maps.Equal(before, after) {
		t.Errorf("host paths before Up %v, after Down %v", before, after)
	}
}

// TestFailedUpLeavesNothing: an Up that fails half-way (an image that
// is not there, found once the control plane and the first node's
// containerd run) removes what it made; so do refusals before anything.
func TestFailedUpLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root; `make test` runs as root")
	}
	before := HostPaths()
	missing := filepath.Join(t.TempDir(), "absent.tar")
	_, err := UpCluster(context.Background(), ClusterSpec{Name: "kt2", Images: []string{missing}})
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Up with a missing image: %v, want an error naming it", err)
	}
	if left := Leftovers("kt2"); len(left) > 0 {
		t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
	}
	if after := HostPaths(); !maps.Equal(before, after) {
		t.Errorf("host paths before Up %v, after %v", before, after)
	}
	for _, spec := range []ClusterSpec{{Name: "much-too-long"}, {Name: "kt2", Nodes: []string{"Bad_Name"}}} {
		if _, err := UpCluster(context.Background(), spec); err == nil || !strings.Contains(err.Error(), spec.Name) && !strings.Contains(err.Error(), "Bad_Name") {
			t.Errorf("Up(%+v): %v, want an error naming what is wrong", spec, err)
		}
		if left := Leftovers(spec.Name); len(left) > 0 {
			t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
