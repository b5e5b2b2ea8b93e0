package cni

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/kubetest"
	current "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestAddAsksTheAgent: the plugin's ADD goes to the agent's socket with
// the pod's names, namespace path and addresses; the agent's answer
// decides (enrolled or not a mesh pod: the pod starts; anything else: the
// ADD fails with the agent's reason). The agent here is a test server
// speaking the socket protocol; the real one is tested with this plugin
// on a real cluster (e2e).
func TestAddAsksTheAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Event, 4)
	status := StatusEnrolled
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev Event
		json.NewDecoder(r.Body).Decode(&ev)
		got <- ev
		if status >= 400 {
			http.Error(w, "capture failed: nft: boom", status)
			return
		}
		w.WriteHeader(status)
	})}
	go srv.Serve(l)
	defer srv.Close()
	conf := &Conf{AgentSocket: sock, ExcludeNamespaces: []string{"kube-system"}}
	res := &current.Result{IPs: []*current.IPConfig{{Address: net.IPNet{IP: net.ParseIP("10.244.1.3"), Mask: net.CIDRMask(24, 32)}}}}
	ev := &Event{ContainerID: "c1", Netns: "/var/run/netns/cni-1", IfName: "eth0", PodName: "server", PodNamespace: "demo", PodUID: "u1"}
	ctx := context.Background()
	if err := add(ctx, conf, ev, res); err != nil {
		t.Fatal(err)
	}
	if e := <-got; e.PodName != "server" || e.PodNamespace != "demo" || e.Netns != "/var/run/netns/cni-1" || len(e.IPs) != 1 || e.IPs[0] != "10.244.1.3" {
		t.Errorf("the agent got %+v", e)
	}
	status = StatusNotMesh
	if err := add(ctx, conf, &Event{PodName: "x", PodNamespace: "demo"}, res); err != nil {
		t.Errorf("not a mesh pod: %v, want the pod to start", err)
	}
	<-got
	status = http.StatusInternalServerError
	err = add(ctx, conf, &Event{PodName: "y", PodNamespace: "demo"}, res)
	if err == nil || !strings.Contains(err.Error(), "nft: boom") || !strings.Contains(err.Error(), "demo/y") {
		t.Errorf("the agent's refusal: %v, want the ADD to fail with its reason and the pod's name", err)
	}
	<-got
	// Excluded namespaces and non-Kubernetes sandboxes never reach it.
	for _, e := range []*Event{{PodName: "coredns", PodNamespace: "kube-system"}, {}} {
		if err := add(ctx, conf, e, res); err != nil {
			t.Errorf("%+v: %v", e, err)
		}
	}
	select {
	case e := <-got:
		t.Errorf("the agent was asked about %+v", e)
	default:
	}
}

// TestAddWithoutTheAgent: the agent's socket does not answer. A pod that
// is not in the mesh starts (the API server says so); a mesh pod does
// not (fail closed), nor does one the plugin cannot judge.
func TestAddWithoutTheAgent(t *testing.T) {
	api := kubetest.Start(t)
	ctx := context.Background()
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "mesh", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "plain"}},
	} {
		if _, err := api.Kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []struct{ ns, name string }{{"mesh", "a"}, {"plain", "b"}} {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "x"}}}}
		if _, err := api.Kube.CoreV1().Pods(p.ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	tokenFile, caFile := filepath.Join(dir, "token"), filepath.Join(dir, "ca.crt")
	os.WriteFile(tokenFile, []byte(api.AdminToken), 0o600)
	os.WriteFile(caFile, api.CA, 0o600)
	conf := &Conf{AgentSocket: filepath.Join(dir, "absent.sock"), Kubernetes: &APIAccess{Server: api.URL, CAFile: caFile, TokenFile: tokenFile}}
	res := &current.Result{}
	if err := add(ctx, conf, &Event{PodName: "b", PodNamespace: "plain"}, res); err != nil {
		t.Errorf("a pod outside the mesh while the agent is away: %v, want it to start", err)
	}
	err := add(ctx, conf, &Event{PodName: "a", PodNamespace: "mesh"}, res)
	if err == nil || !strings.Contains(err.Error(), "is in the mesh") || !strings.Contains(err.Error(), "failing closed") {
		t.Errorf("a mesh pod while the agent is away: %v, want a fail-closed error", err)
	}
	err = add(ctx, conf, &Event{PodName: "nobody", PodNamespace: "plain"}, res)
	if err == nil || !strings.Contains(err.Error(), "unknown") {
		t.Errorf("a pod the API server does not know: %v, want a fail-closed error", err)
	}
	conf.Kubernetes = nil
	if err := add(ctx, conf, &Event{PodName: "b", PodNamespace: "plain"}, res); err == nil {
		t.Error("no agent and no API server: the pod started; want fail closed")
	}
	// failOpen: the mesh pod starts, un-meshed, and the log says so.
	conf.FailOpen = true
	var log strings.Builder
	if err := addOrFailOpen(ctx, conf, &Event{PodName: "a", PodNamespace: "mesh"}, res, &log); err != nil {
		t.Errorf("failOpen: %v, want the pod to start", err)
	}
	if !strings.Contains(log.String(), "OUTSIDE the mesh") || !strings.Contains(log.String(), "mesh/a") {
		t.Errorf("failOpen's log line: %q", log.String())
	}
	conf.FailOpen = false
	if err := addOrFailOpen(ctx, conf, &Event{PodName: "a", PodNamespace: "mesh"}, res, &log); err == nil {
		t.Error("fail closed (the default) let the pod start")
	}
}
