package kubesource_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/xds"
	"google.golang.org/grpc"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	scalePods     = 1000
	scaleServices = 200
	scaleNodes    = 10
)

// BenchmarkControlPlaneAtScale measures `ambit control --kubeconfig`, the
// real binary in a process of its own, over 1,000 pods behind 200 services
// on 10 nodes written to a real API server: its RSS once a node proxy holds
// the full view, the time from its start to that (first list, translation,
// first push), and per op the time one pod's change takes from the API
// server's answer to the proxy's view. Baseline in the same run: none
// exists for a control plane here; the figures stand in docs/kubernetes.md.
func BenchmarkControlPlaneAtScale(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "ambit")
	build := exec.Command("go", "build", "-o", bin, "./cmd/ambit")
	build.Dir = "../.."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	api := kubetest.Start(b)
	ctx := context.Background()
	for _, ns := range []string{"ambit-system", "scale"} {
		if _, err := api.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	for i := range scaleNodes {
		if _, err := api.Kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("worker%d", i)}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := api.Kube.CoreV1().ServiceAccounts("ambit-system").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "ambit-system", Name: "ambit-node"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	proxyPod := podSpec{ns: "ambit-system", name: "ambit-node-w0", sa: "ambit-node", node: "worker0", ips: []string{"10.240.0.2"}, ready: true}.run(b, api)
	populate(b, api)
	tok := token(b, api, "ambit-system", "ambit-node", []string{"istio-ca"}, proxyPod)

	caDir := filepath.Join(b.TempDir(), "ca")
	ca, err := identity.InitCA(caDir, "scale", 24*time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "control", "--kubeconfig", api.Kubeconfig, "--ca-dir", caDir, "--listen", addr, "--monitoring", "")
	var log testutil.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if b.Failed() {
			b.Logf("ambit control's log:\n%s", &log)
		}
	}()

	rootFile := filepath.Join(b.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, identity.EncodeCertificates(ca.Roots()), 0o600); err != nil {
		b.Fatal(err)
	}
	conn, err := caclient.Dial(addr, rootFile, "", grpc.WithPerRPCCredentials(caclient.Bearer(func() (string, error) { return tok, nil })))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	pv := &proxyView{}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- (&xds.Client{Conn: conn, Node: xds.Node{ID: "ztunnel~10.240.0.2~ambit-node-w0.ambit-system~ambit-system.svc.cluster.local"}}).Run(cctx, pv.apply)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("xds client: %v", err)
		}
	}()
	full := func() bool {
		ix, _ := pv.get()
		return ix != nil && len(ix.Workloads()) == scalePods+1 && len(ix.Services()) == scaleServices+1 // + default/kubernetes
	}
	for deadline := time.Now().Add(5 * time.Minute); !full(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) || cmd.ProcessState != nil {
			ix, _ := pv.get()
			b.Fatalf("no full view at the proxy after %v (have %v)", time.Since(start), ix)
		}
	}
	_, at := pv.get()
	toFull, rssFull := at.Sub(start), rssMB(b, cmd.Process.Pid)

	pods := api.Kube.CoreV1().Pods("scale")
	i := 0
	b.ResetTimer()
	for b.Loop() {
		i++
		patch := fmt.Sprintf(`{"metadata":{"labels":{"version":"v%d"}}}`, i)
		if _, err := pods.Patch(ctx, "p-0-0", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			b.Fatal(err)
		}
		want := "v" + strconv.Itoa(i)
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
			ix, _ := pv.get()
			if w := ix.WorkloadByUID("Kubernetes//Pod/scale/p-0-0"); w != nil && w.CanonicalRevision == want {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("change %d not at the proxy after a minute", i)
			}
		}
	}
	b.StopTimer()
	// Reported after the loop: ResetTimer clears metrics reported before.
	b.ReportMetric(float64(toFull.Milliseconds()), "ms-to-full-view")
	b.ReportMetric(rssFull, "control-RSS-MB")
	b.ReportMetric(rssMB(b, cmd.Process.Pid), "control-RSS-MB-after")
}

// populate writes the pods, their services and EndpointSlices, eight
// writers at a time.
func populate(b *testing.B, api *kubetest.APIServer) {
	b.Helper()
	work := make(chan func() error)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range work {
				if err := f(); err != nil {
					mu.Lock()
					first = err
					mu.Unlock()
				}
			}
		}()
	}
	ctx := context.Background()
	perService := scalePods / scaleServices
	for s := range scaleServices {
		work <- func() error {
			name := fmt.Sprintf("svc-%d", s)
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "scale", Name: name},
				Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}}}
			if _, err := api.Kube.CoreV1().Services("scale").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
				return err
			}
			es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "scale", Name: name + "-x", Labels: map[string]string{"kubernetes.io/service-name": name}},
				AddressType: discoveryv1.AddressTypeIPv4, Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}}}
			for p := range perService {
				k := s*perService + p
				ip := fmt.Sprintf("10.244.%d.%d", k/250, k%250+2)
				pod, err := podSpec{ns: "scale", name: fmt.Sprintf("p-%d-%d", s, p), sa: name, node: fmt.Sprintf("worker%d", k%scaleNodes),
					labels: map[string]string{"app": name}, annots: map[string]string{"ambient.istio.io/redirection": "enabled"},
					ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}, ips: []string{ip}, ready: true}.create(api)
				if err != nil {
					return err
				}
				es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
					TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "scale", Name: pod.Name, UID: pod.UID}})
			}
			_, err := api.Kube.DiscoveryV1().EndpointSlices("scale").Create(ctx, es, metav1.CreateOptions{})
			return err
		}
	}
	close(work)
	wg.Wait()
	if first != nil {
		b.Fatal(first)
	}
}

// rssMB is a process's resident set, from /proc.
func rssMB(b *testing.B, pid int) float64 {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				b.Fatal(err)
			}
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
