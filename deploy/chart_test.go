// Package deploy holds the Helm chart (helm/ambit) and its rendering for
// kubectl users (ambit.yaml); its tests check both against the real helm
// and a real API server.
package deploy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubesource"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/restmapper"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) { testutil.VerifyNoLeaks(m) }

// helm is the helm CLI that `make helm` installs (HELM, or on PATH).
func helm(t *testing.T, args ...string) string {
	t.Helper()
	bin := os.Getenv("HELM")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("helm"); err != nil {
			t.Fatalf("helm is not installed (make helm installs it from the Go module proxy): %v", err)
		}
	}
	var out, stderr bytes.Buffer
	c := exec.Command(bin, args...)
	c.Stdout, c.Stderr = &out, &stderr
	if err := c.Run(); err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), stderr.String())
	}
	return out.String()
}

// render is what `make manifests` writes to ambit.yaml.
func render(t *testing.T) string {
	return helm(t, "template", "ambit", "helm/ambit", "--namespace", "ambit-system")
}

// TestChartLintsAndRendersAsCommitted: `helm lint` has nothing to say
// beyond INFO, and ambit.yaml is the chart's rendering as it is now.
func TestChartLintsAndRendersAsCommitted(t *testing.T) {
	out := helm(t, "lint", "--strict", "helm/ambit")
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "[WARNING]") || strings.Contains(l, "[ERROR]") {
			t.Errorf("helm lint: %s", l)
		}
	}
	committed, err := os.ReadFile("ambit.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := render(t); got != string(committed) {
		t.Errorf("deploy/ambit.yaml is not the chart's rendering: run `make manifests`")
	}
}

// objects splits a rendering into API objects.
func objects(t *testing.T, yaml string) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(yaml), 4096)
	var out []*unstructured.Unstructured
	for {
		var o map[string]any
		if err := dec.Decode(&o); errors.Is(err, io.EOF) {
			return out
		} else if err != nil {
			t.Fatal(err)
		}
		if o != nil {
			out = append(out, &unstructured.Unstructured{Object: o})
		}
	}
}

// TestChartOnARealAPIServer: every object the chart renders is accepted
// by a real API server (a server-side dry run, then for real), and its
// RBAC is enough to run the control plane and no more: as the
// ambit-control account, the Kubernetes source lists everything and
// syncs, TokenReviews may be created, Secrets and pod writes may not; the
// node account may patch pods and read nothing else.
func TestChartOnARealAPIServer(t *testing.T) {
	api := kubetest.Start(t)
	ctx := context.Background()
	if _, err := api.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambit-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(api.RestConfig())))
	objs := objects(t, render(t))
	kinds := map[string]bool{}
	for _, dryRun := range [][]string{{metav1.DryRunAll}, nil} {
		for _, o := range objs {
			gvk := o.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatalf("%s %s: %v", gvk, o.GetName(), err)
			}
			r := api.Dyn.Resource(m.Resource)
			var created *unstructured.Unstructured
			if o.GetNamespace() != "" {
				created, err = r.Namespace(o.GetNamespace()).Create(ctx, o, metav1.CreateOptions{DryRun: dryRun, FieldValidation: "Strict"})
			} else {
				created, err = r.Create(ctx, o, metav1.CreateOptions{DryRun: dryRun, FieldValidation: "Strict"})
			}
			if err != nil {
				t.Fatalf("the API server refuses %s %s (dry run %v): %v", gvk.Kind, o.GetName(), dryRun != nil, err)
			}
			kinds[created.GetKind()] = true
		}
	}
	for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "PodDisruptionBudget"} {
		if !kinds[k] {
			t.Errorf("the chart renders no %s", k)
		}
	}

	can := func(sa, verb, group, resource string) bool {
		t.Helper()
		r, err := api.Kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:               "system:serviceaccount:ambit-system:" + sa,
			Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:ambit-system", "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: verb, Group: group, Resource: resource, Namespace: "demo"},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status.Allowed
	}
	for _, c := range []struct {
		sa, verb, group, resource string
		want                      bool
	}{
		{"ambit-control", "create", "authentication.k8s.io", "tokenreviews", true},
		{"ambit-control", "watch", "security.istio.io", "authorizationpolicies", true},
		{"ambit-control", "get", "", "secrets", false},
		{"ambit-control", "patch", "", "pods", false},
		{"ambit-control", "create", "", "pods", false},
		{"ambit-node", "patch", "", "pods", true},
		{"ambit-node", "watch", "", "pods", true},
		{"ambit-node", "list", "", "services", false},
		{"ambit-node", "create", "authentication.k8s.io", "tokenreviews", false},
		{"ambit-node", "get", "", "secrets", false},
	} {
		if got := can(c.sa, c.verb, c.group, c.resource); got != c.want {
			t.Errorf("%s may %s %s.%s: %v, want %v", c.sa, c.verb, c.resource, c.group, got, c.want)
		}
	}

	// The control plane's source, as ambit-control: it syncs.
	tr, err := api.Kube.CoreV1().ServiceAccounts("ambit-system").CreateToken(ctx, "ambit-control", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := kube.LoadKubeconfig(api.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Token = tr.Status.Token
	kc, err := kube.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	var log testutil.Buffer
	src := kubesource.New(kc, kubesource.Options{}, testLogger(&log))
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- src.Run(rctx, func(*workload.Index) error { return nil }) }()
	defer func() { cancel(); <-done }()
	testutil.WaitFor(t, "the source synced as ambit-control", func() bool {
		select {
		case <-src.Synced():
			return true
		default:
			return false
		}
	})
	if strings.Contains(log.String(), "forbidden") {
		t.Errorf("the source as ambit-control was refused something:\n%s", &log)
	}
	if _, err := kc.ReviewToken(ctx, tr.Status.Token, []string{"istio-ca"}); err != nil {
		t.Errorf("a TokenReview as ambit-control: %v", err)
	}
}

func testLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
