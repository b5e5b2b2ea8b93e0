package control

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/caclient"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

const (
	tokA = "token-of-node-a-0123456789"
	tokB = "token-of-node-b-0123456789"
)

var (
	clientID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	serverID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "server"}
	proxyID  = ambient.NodeProxyID()
)

// startCA serves the CA over gRPC with TLS on loopback and returns its
// address and the root file a client trusts.
func startCA(t *testing.T) (string, string) {
	dir := t.TempDir()
	ca := testutil.CA(t)
	ix, err := config.Parse("mesh.yaml", []byte(`workloads:
- {name: client, namespace: default, serviceAccount: client, workloadIps: ["10.0.0.1"], node: node-a}
- {name: server, namespace: default, serviceAccount: server, workloadIps: ["10.0.0.2"], node: node-b}
`))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueServing([]string{ambient.IstiodServerName}, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	pb.RegisterIstioCertificateServiceServer(srv, &CAServer{
		CA: ca, Auth: Tokens{tokA: "node-a", tokB: "node-b"}, Index: func() *workload.Index { return ix },
	})
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	root := filepath.Join(dir, "root-cert.pem")
	os.WriteFile(root, identity.EncodeCertificates(ca.Roots()), 0o644)
	return l.Addr().String(), root
}

func issuer(t *testing.T, addr, root, token string) *caclient.Issuer {
	conn, err := caclient.Dial(addr, root, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &caclient.Issuer{Conn: conn, Token: func() (string, error) { return token, nil }, Self: proxyID, TTL: time.Hour}
}

func TestCAIssuesWhatACallerMayHold(t *testing.T) {
	addr, root := startCA(t)
	ctx := context.Background()
	a := issuer(t, addr, root, tokA)
	for _, id := range []identity.ID{clientID, proxyID} {
		c, err := a.Issue(ctx, id)
		if err != nil {
			t.Fatalf("node-a asking for %s: %v", id, err)
		}
		if c.ID != id || len(c.Roots) != 1 || time.Until(c.NotAfter()) > time.Hour+time.Minute {
			t.Errorf("certificate for %s: %+v", id, c.Leaf().URIs)
		}
	}
	codeOf := func(err error) codes.Code { return status.Code(err) }
	if _, err := a.Issue(ctx, serverID); codeOf(errorsCause(err)) != codes.PermissionDenied || !strings.Contains(err.Error(), "node node-a may not hold spiffe://cluster.local/ns/default/sa/server") {
		t.Errorf("node-a asking for node-b's workload: %v", err)
	}
	otherTD := proxyID
	otherTD.TrustDomain = "evil.example"
	if _, err := a.Issue(ctx, otherTD); codeOf(errorsCause(err)) != codes.PermissionDenied {
		t.Errorf("the proxy identity in a trust domain the node does not serve: %v", err)
	}
	if _, err := issuer(t, addr, root, "not-a-token-at-all-0000").Issue(ctx, clientID); codeOf(errorsCause(err)) != codes.Unauthenticated {
		t.Errorf("wrong token: %v", err)
	}
	if _, err := issuer(t, addr, root, "").Issue(ctx, clientID); codeOf(errorsCause(err)) != codes.Unauthenticated {
		t.Errorf("no token: %v", err)
	}
	// A renewal through the manager, with the keys only in memory.
	b := issuer(t, addr, root, tokB)
	b.TTL = 3 * time.Second
	m := identity.NewManager(b, nil)
	defer m.Close()
	first, err := m.Get(ctx, serverID)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for m.Current(serverID) == first && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if m.Current(serverID) == first {
		t.Fatal("no renewal from the remote CA")
	}
}

// errorsCause unwraps to the gRPC status error.
func errorsCause(err error) error {
	for err != nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
	return nil
}

// The CSR and the impersonation header must agree.
func TestCARefusesMismatchedImpersonation(t *testing.T) {
	addr, root := startCA(t)
	conn, err := caclient.Dial(addr, root, "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	der, _, _ := identity.NewCSR(clientID)
	md, _ := structNew(map[string]any{ImpersonatedIdentity: serverID.String()})
	ctx := contextWithToken(tokA)
	_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(identity.EncodeCSR(der)), Metadata: md})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "asks for") {
		t.Fatalf("mismatch: %v", err)
	}
	_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: "garbage"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("garbage CSR: %v", err)
	}
}

func TestParseTokens(t *testing.T) {
	tk, err := ParseTokens("t", []byte("# nodes\n"+tokA+" node-a\n\n"+tokB+"   node-b\n"))
	if err != nil || tk[tokA] != "node-a" || tk[tokB] != "node-b" {
		t.Fatalf("%v %v", tk, err)
	}
	for _, bad := range []string{"onlyonefield-0123456789\n", "short node\n", tokA + " a\n" + tokA + " b\n", tokA + " a b\n"} {
		if _, err := ParseTokens("t", []byte(bad)); err == nil || !strings.HasPrefix(err.Error(), "t:") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}
