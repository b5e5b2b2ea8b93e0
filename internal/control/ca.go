// Package control is Ambit's control plane: the services istiod offers
// ambient node proxies, beginning with the CA (istio.v1.auth
// IstioCertificateService), and delta xDS, with callers authenticated by
// bearer tokens that each speak for one node (an Authenticator: the lab's
// tokens file, or Kubernetes' TokenReview).
package control

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// ImpersonatedIdentity is the metadata key by which a node proxy asks for
// the identity of a workload on its node.
const ImpersonatedIdentity = "ImpersonatedIdentity"

// CAServer signs CSRs for the identities a caller may hold: the node
// proxy's own, and those of the workloads on the caller's node.
type CAServer struct {
	pb.UnimplementedIstioCertificateServiceServer

	CA   *identity.CA
	Auth Authenticator
	// Index returns the mesh as now known, to find each node's workloads.
	Index func() *workload.Index
	Log   *slog.Logger // nil: discard
	// MaxTTL caps the validity a caller may ask for; default 24 h.
	MaxTTL time.Duration
}

func (s *CAServer) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// CreateCertificate signs the CSR if the caller may hold its identity.
func (s *CAServer) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	caller, err := authenticate(ctx, s.Auth)
	if err != nil {
		s.log().Warn("certificate request refused", "err", err)
		return nil, err
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, status.Error(codes.InvalidArgument, "csr: no PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	if len(csr.URIs) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "csr: want exactly one URI SAN, got %d", len(csr.URIs))
	}
	id, err := identity.Parse(csr.URIs[0].String())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	if imp := req.GetMetadata().GetFields()[ImpersonatedIdentity].GetStringValue(); imp != "" && imp != id.String() {
		return nil, status.Errorf(codes.InvalidArgument, "csr is for %s but %s asks for %s", id, ImpersonatedIdentity, imp)
	}
	node := caller.Node
	if !s.mayHold(caller, id) {
		s.log().Warn("certificate request refused", "node", node, "identity", id.String())
		return nil, status.Errorf(codes.PermissionDenied, "node %s may not hold %s (no workload of that identity on it)", node, id)
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	max := s.MaxTTL
	if max <= 0 {
		max = 24 * time.Hour
	}
	if ttl <= 0 || ttl > max {
		ttl = max
	}
	chain, err := s.CA.Sign(csr, id, ttl)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	resp := &pb.IstioCertificateResponse{}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, string(identity.EncodeCertificates([]*x509.Certificate{c})))
	}
	// The root last; it may hold several roots (the trust bundle).
	resp.CertChain = append(resp.CertChain, string(identity.EncodeCertificates(s.CA.Roots())))
	s.log().Info("certificate issued", "node", node, "identity", id.String(), "expires", chain[0].NotAfter.Format(time.RFC3339))
	return resp, nil
}

// mayHold: the node proxy's own identity (ztunnel's, or the caller's own
// account), or a workload's on the caller's node.
func (s *CAServer) mayHold(c Caller, id identity.ID) bool {
	var local []*workload.Workload
	if s.Index != nil {
		local = s.Index().WorkloadsOnNode(c.Node)
	}
	ztunnel := id.Namespace == ambient.NodeProxyNamespace && id.ServiceAccount == ambient.NodeProxyServiceAccount
	self := c.Namespace != "" && id.Namespace == c.Namespace && id.ServiceAccount == c.ServiceAccount
	if ztunnel || self {
		// The proxy's own identity, in a trust domain the node serves
		// (cluster.local when it serves none yet).
		if len(local) == 0 {
			return id.TrustDomain == ambient.DefaultTrustDomain
		}
		for _, w := range local {
			if w.TrustDomain == id.TrustDomain {
				return true
			}
		}
		return false
	}
	for _, w := range local {
		if w.Identity() == id {
			return true
		}
	}
	return false
}

// String names the service for logs.
func (s *CAServer) String() string { return fmt.Sprintf("CA (%v)", s.Auth) }
