package kubesource_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"

	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubesource"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) { testutil.VerifyNoLeaks(m) }

// cluster is a real API server, the source reading it, and the views the
// source applied.
type cluster struct {
	api *kubetest.APIServer
	src *kubesource.Source
	kc  *kube.Client
	log *testutil.Buffer

	mu    sync.Mutex
	view  *workload.Index
	views int
}

func (c *cluster) latest() *workload.Index {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.view
}

// startSource runs the source against api, as `ambit control --kubeconfig`
// does: the admin's kubeconfig, read by Ambit's own parser.
func startSource(t *testing.T, api *kubetest.APIServer) *cluster {
	t.Helper()
	c := newSource(t, api)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- c.src.Run(ctx, func(ix *workload.Index) error {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.view, c.views = ix, c.views+1
			return nil
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("source: %v", err)
		}
	})
	testutil.WaitFor(t, "the source's first view", func() bool {
		select {
		case <-c.src.Synced():
			return true
		default:
			return false
		}
	})
	return c
}

// newSource makes the source, not yet running.
func newSource(t *testing.T, api *kubetest.APIServer) *cluster {
	t.Helper()
	cfg, err := kube.LoadKubeconfig(api.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := kube.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{api: api, kc: kc, log: &testutil.Buffer{}}
	c.src = kubesource.New(kc, kubesource.Options{}, slog.New(slog.NewTextHandler(c.log, nil)))
	t.Cleanup(func() {
		kc.Close()
		if t.Failed() {
			t.Logf("source's log:\n%s", c.log)
		}
	})
	return c
}

func ptr[T any](v T) *T { return &v }

// Writers of the objects, through client-go: the reference client.

func namespace(t *testing.T, api *kubetest.APIServer, name string, labels map[string]string) {
	t.Helper()
	if _, err := api.Kube.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func node(t *testing.T, api *kubetest.APIServer, name string, labels map[string]string) {
	t.Helper()
	if _, err := api.Kube.CoreV1().Nodes().Create(context.Background(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// podSpec is a pod as a test describes it; run creates it and gives it
// the status a kubelet would.
type podSpec struct {
	ns, name, sa, node string
	labels, annots     map[string]string
	ports              []corev1.ContainerPort
	owner              *metav1.OwnerReference
	ips                []string
	ready              bool
	phase              corev1.PodPhase
	hostNetwork        bool
}

func (p podSpec) run(t testing.TB, api *kubetest.APIServer) *corev1.Pod {
	t.Helper()
	pod, err := p.create(api)
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// create is run for a goroutine other than the test's.
func (p podSpec) create(api *kubetest.APIServer) (*corev1.Pod, error) {
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.ns, Name: p.name, Labels: p.labels, Annotations: p.annots},
		Spec: corev1.PodSpec{
			NodeName: p.node, ServiceAccountName: p.sa, HostNetwork: p.hostNetwork,
			Containers: []corev1.Container{{Name: "app", Image: "app", Ports: p.ports}},
		},
	}
	if p.owner != nil {
		pod.OwnerReferences = []metav1.OwnerReference{*p.owner}
	}
	created, err := api.Kube.CoreV1().Pods(p.ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	phase := p.phase
	if phase == "" {
		phase = corev1.PodRunning
	}
	created.Status.Phase = phase
	for _, ip := range p.ips {
		created.Status.PodIPs = append(created.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(p.ips) > 0 {
		created.Status.PodIP = p.ips[0]
	}
	ready := corev1.ConditionFalse
	if p.ready {
		ready = corev1.ConditionTrue
	}
	created.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: ready}}
	return api.Kube.CoreV1().Pods(p.ns).UpdateStatus(ctx, created, metav1.UpdateOptions{})
}

func service(t testing.TB, api *kubetest.APIServer, ns, name, clusterIP string, selector map[string]string, ports ...corev1.ServicePort) {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.ServiceSpec{ClusterIP: clusterIP, Selector: selector, Ports: ports},
	}
	if _, err := api.Kube.CoreV1().Services(ns).Create(context.Background(), svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// slice is the EndpointSlice the endpointslice controller would write for
// svc's pods (no controller-manager runs beside this API server).
func slice(t testing.TB, api *kubetest.APIServer, ns, svc string, ports []discoveryv1.EndpointPort, pods ...*corev1.Pod) {
	t.Helper()
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: svc + "-abc12", Labels: map[string]string{"kubernetes.io/service-name": svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
	}
	for _, p := range pods {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: p.UID},
			NodeName:   ptr(p.Spec.NodeName),
		})
	}
	if _, err := api.Kube.DiscoveryV1().EndpointSlices(ns).Create(context.Background(), es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func tcpPort(name string, port int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, TargetPort: target, Protocol: corev1.ProtocolTCP}
}

// skipped is the metric's count of kind in the last view.
func skipped(t testing.TB, src *kubesource.Source, kind string) float64 {
	t.Helper()
	mfs, err := src.Gather().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "ambit_kube_skipped_objects" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == kind {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return 0
}
