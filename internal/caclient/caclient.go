// Package caclient gets workload certificates from a remote CA over Istio's
// protocol (istio.v1.auth.IstioCertificateService/CreateCertificate): a node
// proxy asks for its workloads' identities with ImpersonatedIdentity, keeps
// the keys in memory only, and checks what comes back.
package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

// Dial connects to the CA over TLS, trusting the roots in rootCertFile and
// expecting serverName (default istiod.istio-system.svc).
func Dial(addr, rootCertFile, serverName string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	pemData, err := os.ReadFile(rootCertFile)
	if err != nil {
		return nil, fmt.Errorf("ca client: root cert: %w", err)
	}
	roots, err := identity.ParseCertificates(pemData)
	if err != nil {
		return nil, fmt.Errorf("ca client: %s: %w", rootCertFile, err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	if serverName == "" {
		serverName = ambient.IstiodServerName
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12})
	return grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, opts...)...)
}

// Issuer is an identity.Issuer backed by a remote CA.
type Issuer struct {
	Conn *grpc.ClientConn
	// Token returns the bearer token for each call (read fresh, so a
	// rotated token file is picked up).
	Token     func() (string, error)
	ClusterID string      // sent as "clusterid"; default Kubernetes
	Self      identity.ID // the proxy's own identity: asked for without impersonation
	TTL       time.Duration
}

// TokenFile reads a token from a file on every call.
func TokenFile(path string) func() (string, error) {
	return func() (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("token: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
}

// Issue makes a key and CSR for id and has the CA sign it.
func (i *Issuer) Issue(ctx context.Context, id identity.ID) (*identity.Certificate, error) {
	der, key, err := identity.NewCSR(id)
	if err != nil {
		return nil, err
	}
	tok, err := i.Token()
	if err != nil {
		return nil, err
	}
	cluster := i.ClusterID
	if cluster == "" {
		cluster = "Kubernetes"
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok, "clusterid", cluster)
	req := &pb.IstioCertificateRequest{Csr: string(identity.EncodeCSR(der)), ValidityDuration: int64(i.TTL / time.Second)}
	if id != i.Self {
		md, _ := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id.String()})
		req.Metadata = md
	}
	resp, err := pb.NewIstioCertificateServiceClient(i.Conn).CreateCertificate(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("remote CA: certificate for %s: %w", id, err)
	}
	parts := resp.GetCertChain()
	if len(parts) < 2 {
		return nil, fmt.Errorf("remote CA: answer for %s has %d PEM parts, want the chain and the roots", id, len(parts))
	}
	var chain []*x509.Certificate
	for n, p := range parts[:len(parts)-1] {
		cs, err := identity.ParseCertificates([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("remote CA: chain part %d: %w", n, err)
		}
		chain = append(chain, cs...)
	}
	roots, err := identity.ParseCertificates([]byte(parts[len(parts)-1]))
	if err != nil {
		return nil, fmt.Errorf("remote CA: roots: %w", err)
	}
	cert, err := identity.NewCertificate(id, chain, key, roots) // refuses a leaf for another identity
	if err != nil {
		return nil, fmt.Errorf("remote CA: %w", err)
	}
	if _, err := identity.VerifyChain(chain, cert.RootPool(), time.Now()); err != nil {
		return nil, fmt.Errorf("remote CA: the chain does not verify against its own roots: %w", err)
	}
	return cert, nil
}

// Bearer is gRPC per-call credentials carrying "authorization: Bearer
// <token>", read fresh for each call; for the xDS stream.
type Bearer func() (string, error)

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (b Bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := b()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: a
// token never travels in clear.
func (Bearer) RequireTransportSecurity() bool { return true }
