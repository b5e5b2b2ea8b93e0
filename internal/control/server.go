package control

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/xds"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
)

// Server is the control plane: one gRPC server over TLS with the CA and
// delta ADS, every call authenticated by a node's bearer token. Its view of
// the mesh comes from SetIndex (a Source feeds it: the local file or the
// Kubernetes API server).
type Server struct {
	CA   *identity.CA
	Auth Authenticator
	Log  *slog.Logger

	index atomic.Pointer[workload.Index]
	xds   *xds.Server
	grpc  *grpc.Server
	ca    *CAServer
}

// NewServer builds the control plane for listen address ip (put in its
// certificate) over an initial index.
func NewServer(ctx context.Context, ca *identity.CA, auth Authenticator, ip netip.Addr, ix *workload.Index, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{CA: ca, Auth: auth, Log: log}
	s.index.Store(ix)
	cert, err := ca.IssueServing([]string{ambient.IstiodServerName}, []net.IP{net.IP(ip.AsSlice())}, 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	s.ca = &CAServer{CA: ca, Auth: auth, Index: s.index.Load, Log: log}
	s.xds = xds.NewServer(ctx, log)
	if err := s.xds.SetIndex(ix); err != nil {
		return nil, err
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			caller, err := authenticate(ss.Context(), auth)
			if err != nil {
				log.Warn("xds stream refused", "err", err)
				return err
			}
			log.Info("xds stream opened", "node", caller.Node)
			return h(srv, ss)
		}),
	)
	pb.RegisterIstioCertificateServiceServer(s.grpc, s.ca)
	s.xds.Register(s.grpc)
	return s, nil
}

// SetIndex publishes a new view of the mesh to every proxy.
func (s *Server) SetIndex(ix *workload.Index) error {
	s.index.Store(ix)
	if err := s.xds.SetIndex(ix); err != nil {
		return fmt.Errorf("control: publish: %w", err)
	}
	return nil
}

// Serve serves l until Stop.
func (s *Server) Serve(l net.Listener) error { return s.grpc.Serve(l) }

// Stop ends every stream and the server.
func (s *Server) Stop() { s.grpc.Stop() }
