package startup

import (
	"context"
	"encoding/pem"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// call is what the control plane saw of one authenticated call.
type call struct {
	method, token, cluster, tenant, caHeader string
}

// recorder is the control plane's Authenticator, remembering each call.
type recorder struct {
	inner control.Tokens
	mu    sync.Mutex
	calls []call
}

func (r *recorder) Authenticate(ctx context.Context, token string) (control.Caller, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	first := func(k string) string {
		if v := md.Get(k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	method, _ := grpc.Method(ctx)
	r.mu.Lock()
	r.calls = append(r.calls, call{method, token, first("clusterid"), first("x-tenant"), first("x-ca")})
	r.mu.Unlock()
	return r.inner.Authenticate(ctx, token)
}

func (r *recorder) seen(f func(call) bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.calls {
		if f(c) {
			return true
		}
	}
	return false
}

// A proxy on a control plane (Ambit's, a real gRPC server over TLS) sends
// ztunnel's headers on both calls: the bearer token, read from its file for
// each call (a rotated token is the one sent), clusterid, and the extra
// headers of XDS_HEADER_*/CA_HEADER_*, each on its own service only.
func TestControlPlaneCallsCarryZtunnelsHeaders(t *testing.T) {
	ca := testutil.CA(t)
	ix, err := config.Parse("mesh.yaml", []byte(`workloads:
- {uid: u1, name: server, namespace: default, workloadIps: ["127.0.83.20"], protocol: HBONE, node: node-a}
`))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const tok1, tok2 = "token-one-0123456789", "token-two-0123456789"
	rec := &recorder{inner: control.Tokens{tok1: "node-a", tok2: "node-a"}}
	srv, err := control.NewServer(ctx, ca, rec, netip.MustParseAddr("127.0.83.1"), ix, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.83.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Stop()
	dir := t.TempDir()
	root := filepath.Join(dir, "root.pem")
	os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Roots()[0].Raw}), 0o644)
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte(tok1+"\n"), 0o600)
	addr := l.Addr().String()

	ran := make(chan error, 1)
	go func() {
		ran <- Run(ctx, Options{Workload: "default/server", CertTTL: 2 * time.Second,
			Self: Self{ClusterID: "cluster-7"},
			ControlPlane: &ControlPlane{XDSAddress: addr, CAAddress: addr, TokenFile: token, RootCert: root,
				XDSHeaders: map[string]string{"x-tenant": "blue"}, CAHeaders: map[string]string{"x-ca": "yes"}}})
	}()
	isCA := func(c call) bool { return c.method == "/istio.v1.auth.IstioCertificateService/CreateCertificate" }
	isXDS := func(c call) bool { return c.method != "" && !isCA(c) }
	testutil.WaitFor(t, "a CA call and an xDS call", func() bool { return rec.seen(isCA) && rec.seen(isXDS) })
	rec.mu.Lock()
	for _, c := range rec.calls {
		if c.cluster != "cluster-7" || c.token != tok1 {
			t.Errorf("%s: clusterid %q token %q, want cluster-7 and the file's token", c.method, c.cluster, c.token)
		}
		if isXDS(c) && (c.tenant != "blue" || c.caHeader != "") || isCA(c) && (c.caHeader != "yes" || c.tenant != "") {
			t.Errorf("%s: x-tenant %q x-ca %q: each service's extra headers on its own calls only", c.method, c.tenant, c.caHeader)
		}
	}
	rec.mu.Unlock()
	// The kubelet rotates the projected token: the next renewal (the
	// certificate lives 2 s) sends the new one.
	os.WriteFile(token+".new", []byte(tok2+"\n"), 0o600)
	os.Rename(token+".new", token)
	testutil.WaitFor(t, "a CA call with the rotated token", func() bool {
		return rec.seen(func(c call) bool { return isCA(c) && c.token == tok2 })
	})
	cancel()
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
}
