package xds

import (
	"context"
	"log/slog"
	"sync"

	"github.com/ambitmesh/ambit/internal/workload"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Server serves the mesh over delta ADS with go-control-plane: one linear
// cache per type, so each resource has its own version and a change sends
// only what changed (and the names of what went).
type Server struct {
	log   *slog.Logger
	addrs *cache.LinearCache
	auths *cache.LinearCache
	srv   serverv3.Server

	mu   sync.Mutex
	last map[string]map[string]proto.Message // type -> name -> resource
}

// NewServer makes a server; ctx bounds its streams.
func NewServer(ctx context.Context, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		log:   log,
		addrs: cache.NewLinearCache(AddressType),
		auths: cache.NewLinearCache(AuthorizationType),
		last:  map[string]map[string]proto.Message{AddressType: {}, AuthorizationType: {}},
	}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cache.Cache{AddressType: s.addrs, AuthorizationType: s.auths},
	}
	s.srv = serverv3.NewServer(ctx, mux, serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(id int64, req *discoverygrpc.DeltaDiscoveryRequest) error {
			if d := req.GetErrorDetail(); d != nil {
				s.log.Warn("proxy rejected a push (NACK)", "stream", id, "node", req.GetNode().GetId(), "type", req.GetTypeUrl(), "error", d.GetMessage())
			}
			return nil
		},
	})
	return s
}

// Register adds the ADS service to a gRPC server.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.srv)
}

// SetIndex publishes a new view of the mesh: changed resources go out with
// new versions, vanished ones as removals, unchanged ones not at all.
func (s *Server) SetIndex(ix *workload.Index) error {
	addrs := map[string]proto.Message{}
	for _, w := range ix.Workloads() {
		addrs[WorkloadName(w)] = WorkloadToProto(w)
	}
	for _, svc := range ix.Services() {
		addrs[ServiceName(svc)] = ServiceToProto(svc)
	}
	auths := map[string]proto.Message{}
	for _, p := range ix.Policies() {
		auths[PolicyName(p)] = PolicyToProto(p)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.publish(s.addrs, AddressType, addrs); err != nil {
		return err
	}
	return s.publish(s.auths, AuthorizationType, auths)
}

// Publish sets raw resources of one type (tests use it to push what the
// index would never produce, e.g. an invalid resource).
func (s *Server) Publish(typeURL string, resources map[string]proto.Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.addrs
	if typeURL == AuthorizationType {
		c = s.auths
	}
	return s.publish(c, typeURL, resources)
}

func (s *Server) publish(c *cache.LinearCache, typeURL string, now map[string]proto.Message) error {
	prev := s.last[typeURL]
	update := map[string]types.Resource{}
	for name, r := range now {
		if old, ok := prev[name]; !ok || !proto.Equal(old, r) {
			update[name] = r
		}
	}
	var gone []string
	for name := range prev {
		if _, ok := now[name]; !ok {
			gone = append(gone, name)
		}
	}
	if len(update) == 0 && len(gone) == 0 {
		return nil
	}
	if err := c.UpdateResources(update, gone); err != nil {
		return err
	}
	s.last[typeURL] = now
	s.log.Info("xds push", "type", typeURL, "updated", len(update), "removed", len(gone))
	return nil
}
