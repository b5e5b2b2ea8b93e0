// Package caclient gets workload certificates from a remote CA over Istio's
// protocol (istio.v1.auth.IstioCertificateService/CreateCertificate): a node
// proxy asks for its workloads' identities with ImpersonatedIdentity, keeps
// the keys in memory only, and checks what comes back.
package caclient

import (
	"cmp"
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
	pool, err := RootPool(pemData)
	if err != nil {
		return nil, fmt.Errorf("ca client: %s: %w", rootCertFile, err)
	}
	return DialRoots(addr, pool, serverName, opts...)
}

// RootPool is a pool of the PEM certificates in pemData (at least one).
func RootPool(pemData []byte) (*x509.CertPool, error) {
	roots, err := identity.ParseCertificates(pemData)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return pool, nil
}

// DialRoots is Dial with the roots given (nil: the system's) and the
// server's name expected in its certificate (default
// istiod.istio-system.svc: istiod's serving certificate holds DNS names
// only, so an address given as an IP still verifies).
func DialRoots(addr string, roots *x509.CertPool, serverName string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if serverName == "" {
		serverName = ambient.IstiodServerName
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12})
	return grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, opts...)...)
}

// Issuer is an identity.Issuer backed by a remote CA.
type Issuer struct {
	Conn *grpc.ClientConn
	// Token returns the bearer token for each call (read fresh, so a
	// rotated token file is picked up).
	Token     func() (string, error)
	ClusterID string            // sent as "clusterid"; default Kubernetes
	Extra     map[string]string // more headers (ztunnel's CA_HEADER_<NAME>)
	Self      identity.ID       // the proxy's own identity: asked for without impersonation
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
	md, err := Headers{Token: i.Token, ClusterID: i.ClusterID, Extra: i.Extra}.GetRequestMetadata(ctx)
	if err != nil {
		return nil, err
	}
	ctx = metadata.NewOutgoingContext(ctx, metadata.New(md))
	req := &pb.IstioCertificateRequest{Csr: string(identity.EncodeCSR(der)), ValidityDuration: int64(i.TTL / time.Second)}
	if id != i.Self {
		imp, _ := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id.String()})
		req.Metadata = imp
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

// Headers are the metadata of every call to the CA and to xDS, as ztunnel
// sends them: "authorization: Bearer <token>" (the token read fresh for
// each call, so a rotated projected token is the one sent; none when Token
// is nil or gives ""), "clusterid", and any extra headers. They are
// gRPC per-call credentials that require TLS.
type Headers struct {
	Token     func() (string, error)
	ClusterID string // default Kubernetes
	Extra     map[string]string
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (h Headers) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := make(map[string]string, len(h.Extra)+2)
	for k, v := range h.Extra {
		md[strings.ToLower(k)] = v
	}
	md[ambient.ClusterIDHeader] = cmp.Or(h.ClusterID, ambient.DefaultClusterID)
	if h.Token != nil {
		tok, err := h.Token()
		if err != nil {
			return nil, err
		}
		if tok != "" {
			md["authorization"] = "Bearer " + tok
		}
	}
	return md, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (Headers) RequireTransportSecurity() bool { return true }

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
