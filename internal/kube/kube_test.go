package kube_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) { testutil.VerifyNoLeaks(m) }

func client(t *testing.T, api *kubetest.APIServer) *kube.Client {
	t.Helper()
	cfg, err := kube.LoadKubeconfig(api.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kube.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// TestInformerFollowsTheAPIServer: a field-selected pod informer against a
// real API server sees lists in pages (more pods than a page), adds,
// changes and deletes, only for its node; a collection the server does
// not serve (a CRD not installed) is empty and synced when Optional.
func TestInformerFollowsTheAPIServer(t *testing.T) {
	api := kubetest.Start(t)
	c := client(t, api)
	ctx := context.Background()
	if _, err := api.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mk := func(name, node string) {
		t.Helper()
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
		if _, err := api.Kube.CoreV1().Pods("demo").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// One page is 500: 510 on worker1 make the first list two pages.
	for i := range 510 {
		mk(fmt.Sprintf("p%d", i), "worker1")
	}
	mk("elsewhere", "worker2")

	changes := make(chan struct{}, 1)
	in := &kube.Informer[kube.Pod, *kube.Pod]{Client: c, Resource: kube.Pods, Selector: kube.Selector{Field: "spec.nodeName=worker1"},
		Changed: func() {
			select {
			case changes <- struct{}{}:
			default:
			}
		}}
	missing := &kube.Informer[kube.Pod, *kube.Pod]{Client: c, Resource: kube.Resource{Group: "example.com", Version: "v1", Resource: "widgets", Kind: "Widget"}, Optional: true}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	for _, run := range []func(context.Context) error{in.Run, missing.Run} {
		go func() {
			if err := run(rctx); err != nil {
				t.Errorf("informer: %v", err)
			}
			done <- struct{}{}
		}()
	}
	defer func() { cancel(); <-done; <-done }()

	<-in.Synced()
	if n := len(in.List()); n != 510 {
		t.Fatalf("first list: %d pods, want the 510 on worker1", n)
	}
	if in.Get("demo/elsewhere") != nil {
		t.Error("a pod of worker2 in worker1's informer")
	}
	if _, err := api.Kube.CoreV1().Pods("demo").Patch(ctx, "p1", types.MergePatchType, []byte(`{"metadata":{"labels":{"k":"v"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the change", func() bool { p := in.Get("demo/p1"); return p != nil && p.Metadata.Labels["k"] == "v" })
	mk("late", "worker1")
	testutil.WaitFor(t, "the add", func() bool { return in.Get("demo/late") != nil })
	if err := api.Kube.CoreV1().Pods("demo").Delete(ctx, "p2", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the delete", func() bool { return in.Get("demo/p2") == nil })
	select {
	case <-changes:
	default:
		t.Error("Changed was never called")
	}

	<-missing.Synced()
	if n := len(missing.List()); n != 0 {
		t.Errorf("a resource the server does not serve: %d objects", n)
	}

	// The client's own calls: a pod by name, a 404 that says so, an
	// annotation patch that touches nothing else.
	p, err := c.GetPod(ctx, "demo", "p1")
	if err != nil || p.Spec.NodeName != "worker1" || p.Metadata.Labels["k"] != "v" {
		t.Fatalf("GetPod: %+v, %v", p, err)
	}
	if _, err := c.GetPod(ctx, "demo", "nope"); !kube.IsNotFound(err) || !strings.Contains(err.Error(), `pods "nope" not found`) {
		t.Errorf("GetPod of no pod: %v", err)
	}
	v := "enabled"
	if err := c.AnnotatePod(ctx, "demo", "p1", map[string]*string{"ambient.istio.io/redirection": &v}); err != nil {
		t.Fatal(err)
	}
	got, err := api.Kube.CoreV1().Pods("demo").Get(ctx, "p1", metav1.GetOptions{})
	if err != nil || got.Annotations["ambient.istio.io/redirection"] != "enabled" || got.Labels["k"] != "v" {
		t.Errorf("after AnnotatePod: %v %v, %v", got.Annotations, got.Labels, err)
	}
	if err := c.AnnotatePod(ctx, "demo", "p1", map[string]*string{"ambient.istio.io/redirection": nil}); err != nil {
		t.Fatal(err)
	}
	if got, _ := api.Kube.CoreV1().Pods("demo").Get(ctx, "p1", metav1.GetOptions{}); got.Annotations["ambient.istio.io/redirection"] != "" {
		t.Errorf("annotation not removed: %v", got.Annotations)
	}
}

// TestKubeconfigErrors: a kubeconfig that is wrong says what and where.
func TestKubeconfigErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ name, body, want string }{
		{"empty", "", "no current-context"},
		{"no-context", "apiVersion: v1\nkind: Config\ncurrent-context: nope\nclusters: []\ncontexts: []\nusers: []\n", `"nope"`},
		{"not-yaml", "clusters: [", "yaml"},
	} {
		path := filepath.Join(dir, c.name)
		if err := os.WriteFile(path, []byte(c.body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := kube.LoadKubeconfig(path)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v; want an error naming %s and saying %q", c.name, err, path, c.want)
		}
	}
	if _, err := kube.LoadKubeconfig(filepath.Join(dir, "absent")); err == nil {
		t.Error("a kubeconfig that does not exist: no error")
	}
}
