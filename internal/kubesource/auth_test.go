package kubesource_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/kubesource"
	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func serviceAccount(t *testing.T, api *kubetest.APIServer, ns, name string) {
	t.Helper()
	if _, err := api.Kube.CoreV1().ServiceAccounts(ns).Create(context.Background(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// token is a projected token from the API server's TokenRequest, bound to
// pod when it is not nil, as the kubelet asks for one.
func token(t testing.TB, api *kubetest.APIServer, ns, sa string, aud []string, pod *corev1.Pod) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: aud, ExpirationSeconds: ptr(int64(3600))}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := api.Kube.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// TestNodeProxiesAuthenticateByTokenReview runs the control plane as
// `ambit control --kubeconfig` does, on a real API server, and checks
// istiod's rules: a trusted account's projected token for istio-ca, bound to
// a pod, speaks for that pod's node; the CA then signs only for the
// workloads on it; every other token is refused, with a status that says
// why, on the CA and on xDS alike.
func TestNodeProxiesAuthenticateByTokenReview(t *testing.T) {
	api := kubetest.Start(t)
	for _, ns := range []string{"ambit-system", "demo"} {
		namespace(t, api, ns, nil)
	}
	node(t, api, "worker1", nil)
	node(t, api, "worker2", nil)
	serviceAccount(t, api, "ambit-system", "ambit-node")
	serviceAccount(t, api, "demo", "server")
	serviceAccount(t, api, "demo", "sneaky")
	proxy1 := podSpec{ns: "ambit-system", name: "ambit-node-w1", sa: "ambit-node", node: "worker1", ips: []string{"10.244.1.2"}, ready: true}.run(t, api)
	proxy2 := podSpec{ns: "ambit-system", name: "ambit-node-w2", sa: "ambit-node", node: "worker2", ips: []string{"10.244.2.2"}, ready: true}.run(t, api)
	podSpec{ns: "demo", name: "server", sa: "server", node: "worker1", ips: []string{"10.244.1.3"}, ready: true}.run(t, api)
	sneaky := podSpec{ns: "demo", name: "sneaky", sa: "sneaky", node: "worker2", ips: []string{"10.244.2.3"}, ready: true}.run(t, api)

	// The source runs inside the control plane below; its pod cache may
	// be empty until then, and Auth asks the API server instead.
	c := newSource(t, api)
	auth := &kubesource.Auth{Client: c.kc, Pod: c.src.Pod, Trusted: []string{kubesource.DefaultTrustedNodeAccounts}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	good := token(t, api, "ambit-system", "ambit-node", []string{"istio-ca"}, proxy1)
	caller, err := auth.Authenticate(ctx, good)
	if err != nil || caller != (control.Caller{Node: "worker1", Namespace: "ambit-system", ServiceAccount: "ambit-node"}) {
		t.Fatalf("a node proxy's projected token: %+v, %v; want worker1's", caller, err)
	}
	// The verdict is reused: more calls with the same token send no more
	// TokenReviews; a refused token is asked about every time.
	asked := auth.Reviews()
	for i := 0; i < 5; i++ {
		if _, err := auth.Authenticate(ctx, good); err != nil {
			t.Fatal(err)
		}
	}
	if n := auth.Reviews(); n != asked {
		t.Errorf("5 more calls with one token sent %d more TokenReviews, want 0 (cached)", n-asked)
	}
	now := time.Now()
	refusals := []struct {
		what, token string
		want        error
		msg         string
	}{
		{"an expired token", api.SignToken(t, "system:serviceaccount:ambit-system:ambit-node", []string{"istio-ca"}, now.Add(-2*time.Hour), now.Add(-time.Hour),
			map[string]any{"namespace": "ambit-system", "serviceaccount": map[string]string{"name": "ambit-node", "uid": "x"},
				"pod": map[string]string{"name": proxy1.Name, "uid": string(proxy1.UID)}}),
			control.ErrUnauthenticated, "token refused by the API server"},
		{"a token for another audience", token(t, api, "ambit-system", "ambit-node", []string{"other"}, proxy1),
			control.ErrUnauthenticated, "token refused by the API server"},
		{"a token bound to no pod", token(t, api, "ambit-system", "ambit-node", []string{"istio-ca"}, nil),
			control.ErrUnauthenticated, "token of ambit-system/ambit-node is not bound to a pod"},
		{"an untrusted account's token", token(t, api, "demo", "sneaky", []string{"istio-ca"}, sneaky),
			control.ErrPermissionDenied, "service account demo/sneaky is not a node proxy's (trusted: ambit-system/ambit-node)"},
		{"no token at all", "garbage.not.ajwt", control.ErrUnauthenticated, "token refused by the API server"},
	}
	asked = auth.Reviews()
	for _, r := range append(refusals, refusals...) {
		_, err := auth.Authenticate(ctx, r.token)
		if !errors.Is(err, r.want) || !strings.Contains(err.Error(), r.msg) {
			t.Errorf("%s: %v; want %v saying %q", r.what, err, r.want, r.msg)
		} else {
			t.Logf("%s: refused: %v", r.what, err)
		}
	}

	// The API server's refusals are asked about each time; a token it
	// authenticates (then refused by the checks after it) once.
	want := int64(0)
	for _, r := range refusals {
		if strings.Contains(r.msg, "token refused by the API server") {
			want += 2
		} else {
			want++
		}
	}
	if n := auth.Reviews() - asked; n != want {
		t.Errorf("%d refused calls sent %d TokenReviews, want %d (the API server's refusals are not cached)", 2*len(refusals), n, want)
	}
	// A cached verdict does not outlive the pod its token is bound to.
	proxy3 := podSpec{ns: "ambit-system", name: "ambit-node-w1b", sa: "ambit-node", node: "worker1", ips: []string{"10.244.1.9"}, ready: true}.run(t, api)
	t3 := token(t, api, "ambit-system", "ambit-node", []string{"istio-ca"}, proxy3)
	if _, err := auth.Authenticate(ctx, t3); err != nil {
		t.Fatal(err)
	}
	if err := api.Kube.CoreV1().Pods("ambit-system").Delete(ctx, proxy3.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the deleted pod's token refused", func() bool {
		_, err := auth.Authenticate(ctx, t3)
		return errors.Is(err, control.ErrUnauthenticated)
	})

	// The control plane with it: node scoping on the CA, the same
	// authentication on xDS.
	addr, rootFile, stop := startControl(t, c, auth)
	defer stop()
	conn, err := caclient.Dial(addr, rootFile, "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	issuer := func(tok string) *caclient.Issuer {
		return &caclient.Issuer{Conn: conn, Token: func() (string, error) { return tok, nil }}
	}
	serverID := identity.ID{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "server"}
	var cert *identity.Certificate
	testutil.WaitFor(t, "the control plane serving", func() bool {
		cert, err = issuer(good).Issue(ctx, serverID)
		return err == nil || !strings.Contains(err.Error(), "Unavailable") // not yet listening
	})
	if err != nil {
		t.Fatalf("worker1's proxy asking for demo/server (on worker1): %v", err)
	}
	if got := cert.Leaf().URIs[0].String(); got != serverID.String() {
		t.Errorf("certificate for %s, want %s", got, serverID)
	}
	own := identity.ID{TrustDomain: "cluster.local", Namespace: "ambit-system", ServiceAccount: "ambit-node"}
	if _, err := issuer(good).Issue(ctx, own); err != nil {
		t.Errorf("a node proxy asking for its own identity: %v", err)
	}
	sneakyID := identity.ID{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "sneaky"}
	if _, err := issuer(good).Issue(ctx, sneakyID); err == nil || !strings.Contains(err.Error(), "PermissionDenied") || !strings.Contains(err.Error(), "node worker1 may not hold") {
		t.Errorf("worker1's proxy asking for demo/sneaky (on worker2): %v; want PermissionDenied", err)
	}
	w2 := token(t, api, "ambit-system", "ambit-node", []string{"istio-ca"}, proxy2)
	if _, err := issuer(w2).Issue(ctx, sneakyID); err != nil {
		t.Errorf("worker2's proxy asking for demo/sneaky (on worker2): %v", err)
	}
	for _, r := range refusals {
		if _, err := issuer(r.token).Issue(ctx, serverID); err == nil || !strings.Contains(err.Error(), r.msg) {
			t.Errorf("CA, %s: %v; want refused saying %q", r.what, err, r.msg)
		}
	}

	// xDS: the same tokens, the same verdicts.
	ads := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn)
	xds := func(tok string) error {
		sctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok))
		defer cancel()
		s, err := ads.DeltaAggregatedResources(sctx)
		if err != nil {
			return err
		}
		// A server that refuses at once may close the stream before Send:
		// gRPC then reports io.EOF there, and the status comes from Recv.
		if err := s.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: "type.googleapis.com/istio.workload.Address"}); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		_, err = s.Recv()
		return err
	}
	if err := xds(good); err != nil {
		t.Errorf("xDS with worker1's token: %v", err)
	}
	for _, r := range refusals {
		want := codes.Unauthenticated
		if r.want == control.ErrPermissionDenied {
			want = codes.PermissionDenied
		}
		if err := xds(r.token); status.Code(err) != want || !strings.Contains(err.Error(), r.msg) {
			t.Errorf("xDS, %s: %v; want %v saying %q", r.what, err, want, r.msg)
		}
	}
}
