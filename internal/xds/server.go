package xds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Server serves the mesh over delta ADS. It is written here rather than
// taken from go-control-plane's server and cache: those link every Envoy
// config type (listeners, routes, clusters...) into the one ambit binary,
// and their initialisation alone cost each ambit process, node proxies
// included, 3 MB of resident code and 0.7 MB of heap (docs/benchmarks.md).
// The messages are encoded by hand too (wire.go).
//
// Each resource's version is a digest of its encoding, so versions survive
// a control-plane restart and a client that reconnects with what it holds
// (initial_resource_versions) is sent only what differs. A stream keeps at
// most one push per type in flight: the next waits for the ACK or NACK, so
// the server always knows what the client holds. After a NACK the client
// kept its previous view; what it lacks goes out again with the next
// change (not at once, which would loop on the same bad resource).
type Server struct {
	log *slog.Logger
	ctx context.Context

	mu      sync.Mutex
	res     map[string]map[string]*resource // type -> name -> resource
	streams map[*deltaStream]struct{}
}

// NewServer makes a server; ctx bounds its streams.
func NewServer(ctx context.Context, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		log:     log,
		ctx:     ctx,
		res:     map[string]map[string]*resource{AddressType: {}, AuthorizationType: {}},
		streams: map[*deltaStream]struct{}{},
	}
}

// Register adds the ADS service to a gRPC server: the delta stream, and
// the state-of-the-world one refused as unimplemented.
func (s *Server) Register(g *grpc.Server) {
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: adsService,
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{
			{StreamName: "DeltaAggregatedResources", ServerStreams: true, ClientStreams: true,
				Handler: func(_ any, stream grpc.ServerStream) error { return s.serve(stream) }},
			{StreamName: "StreamAggregatedResources", ServerStreams: true, ClientStreams: true,
				Handler: func(any, grpc.ServerStream) error {
					return status.Error(codes.Unimplemented, "ambit serves delta ADS only (DeltaAggregatedResources)")
				}},
		},
		Metadata: "envoy/service/discovery/v3/ads.proto",
	}, s)
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
	a, err := encode(AddressType, addrs)
	if err != nil {
		return err
	}
	p, err := encode(AuthorizationType, auths)
	if err != nil {
		return err
	}
	s.set(map[string]map[string]*resource{AddressType: a, AuthorizationType: p})
	return nil
}

// Publish sets raw resources of one type (tests use it to push what the
// index would never produce, e.g. an invalid resource).
func (s *Server) Publish(typeURL string, resources map[string]proto.Message) error {
	if typeURL != AddressType && typeURL != AuthorizationType {
		return fmt.Errorf("xds: publish: unknown type %s", typeURL)
	}
	r, err := encode(typeURL, resources)
	if err != nil {
		return err
	}
	s.set(map[string]map[string]*resource{typeURL: r})
	return nil
}

// encode wraps each message for the wire, versioned by its digest.
func encode(typeURL string, msgs map[string]proto.Message) (map[string]*resource, error) {
	out := make(map[string]*resource, len(msgs))
	for name, m := range msgs {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			return nil, fmt.Errorf("xds: encode %s %s: %w", typeURL, name, err)
		}
		sum := sha256.Sum256(b)
		out[name] = &resource{name: name, version: hex.EncodeToString(sum[:8]), hasBody: true, bodyType: typeURL, body: b}
	}
	return out, nil
}

// set replaces the resources of the given types and wakes every stream.
func (s *Server) set(now map[string]map[string]*resource) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for typ, rs := range now {
		prev := s.res[typ]
		updated, removed := 0, 0
		for name, r := range rs {
			if old, ok := prev[name]; !ok || old.version != r.version {
				updated++
			}
		}
		for name := range prev {
			if _, ok := rs[name]; !ok {
				removed++
			}
		}
		s.res[typ] = rs
		if updated+removed > 0 {
			s.log.Info("xds push", "type", typ, "updated", updated, "removed", removed, "streams", len(s.streams))
		}
	}
	for st := range s.streams {
		select {
		case st.wake <- struct{}{}:
		default: // already woken
		}
	}
}

// deltaStream is one client's subscription.
type deltaStream struct {
	wake  chan struct{}
	node  string
	nonce int
	types map[string]*subscription
}

// subscription is what one stream asked for of one type and what it holds.
type subscription struct {
	wildcard bool
	names    map[string]bool
	// held: name -> version the client holds (as of its last ACK).
	held map[string]string
	// inflight is the nonce of the unanswered push, if any; pending is
	// what the client will hold once it ACKs it.
	inflight string
	pending  map[string]string
	// absent: explicitly subscribed names the client must be told do not
	// exist (sent once as removals).
	absent map[string]bool
	first  bool // the first request is always answered, even if empty
	// nacked: the last push was rejected; nothing more goes out until the
	// mesh or the subscription changes.
	nacked bool
}

func (sub *subscription) wants(name string) bool { return sub.wildcard || sub.names[name] }

func (s *Server) serve(stream grpc.ServerStream) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	st := &deltaStream{wake: make(chan struct{}, 1), types: map[string]*subscription{}}
	s.mu.Lock()
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
	}()

	reqs := make(chan *deltaRequest)
	recvErr := make(chan error, 1)
	go func() { // ends when the stream does: Recv fails once ctx is done
		for {
			req := &deltaRequest{}
			if err := recv(stream, req); err != nil {
				if _, ok := status.FromError(err); !ok {
					err = status.Error(codes.InvalidArgument, err.Error()) // ours: the request did not decode
				}
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		select {
		case <-s.ctx.Done():
			return status.Error(codes.Unavailable, "control plane shutting down")
		case err := <-recvErr:
			if errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case req := <-reqs:
			if err := st.request(s.log, req); err != nil {
				return err
			}
		case <-st.wake:
			for _, sub := range st.types {
				sub.nacked = false
			}
		}
		if err := s.push(stream, st); err != nil {
			return err
		}
	}
}

// request applies one client request: a new or changed subscription, or
// the answer to a push.
func (st *deltaStream) request(log *slog.Logger, req *deltaRequest) error {
	typ := req.typeURL
	if typ != AddressType && typ != AuthorizationType {
		return status.Errorf(codes.InvalidArgument, "unknown type %q (served: %s, %s)", typ, AddressType, AuthorizationType)
	}
	if id := req.nodeID; id != "" {
		st.node = id
	}
	sub := st.types[typ]
	if sub == nil {
		// The first request of a type: a subscription with no names is a
		// wildcard; what the client already holds needs no resend.
		sub = &subscription{names: map[string]bool{}, held: map[string]string{}, absent: map[string]bool{}, first: true}
		sub.wildcard = len(req.subscribe) == 0
		for name, v := range req.initial {
			sub.held[name] = v
		}
		st.types[typ] = sub
	}
	if len(req.subscribe)+len(req.unsubscribe) > 0 {
		sub.nacked = false
	}
	for _, name := range req.subscribe {
		if name == "*" {
			sub.wildcard = true
			continue
		}
		if !sub.names[name] {
			sub.names[name] = true
			sub.absent[name] = true // cleared if it exists when pushed
		}
	}
	for _, name := range req.unsubscribe {
		if name == "*" {
			sub.wildcard = false
		}
		delete(sub.names, name)
		delete(sub.absent, name)
		if !sub.wildcard {
			delete(sub.held, name)
		}
	}
	if n := req.nonce; n != "" && n == sub.inflight {
		if d := req.errorDetail; d != nil {
			// The client kept what it held; held stays as it was.
			log.Warn("proxy rejected a push (NACK)", "node", st.node, "type", typ, "nonce", n, "error", d.message)
			sub.nacked = true
		} else {
			sub.held = sub.pending
		}
		sub.inflight, sub.pending = "", nil
	}
	return nil
}

// push sends each type whose subscription differs from what the client
// holds, unless a push of that type is still unanswered.
func (s *Server) push(stream grpc.ServerStream, st *deltaStream) error {
	for _, typ := range []string{AddressType, AuthorizationType} {
		sub := st.types[typ]
		if sub == nil || sub.inflight != "" || sub.nacked {
			continue
		}
		s.mu.Lock()
		cur := s.res[typ]
		resp := &deltaResponse{typeURL: typ}
		next := make(map[string]string, len(cur))
		for name, r := range cur {
			if !sub.wants(name) {
				continue
			}
			next[name] = r.version
			delete(sub.absent, name)
			if sub.held[name] != r.version {
				resp.resources = append(resp.resources, r)
			}
		}
		s.mu.Unlock()
		for name := range sub.held {
			if _, ok := next[name]; !ok {
				resp.removed = append(resp.removed, name)
			}
		}
		for name := range sub.absent {
			if _, held := sub.held[name]; !held {
				resp.removed = append(resp.removed, name)
			}
		}
		sub.absent = map[string]bool{}
		if len(resp.resources) == 0 && len(resp.removed) == 0 && !sub.first {
			continue
		}
		sub.first = false
		st.nonce++
		resp.nonce = strconv.Itoa(st.nonce)
		sub.inflight, sub.pending = resp.nonce, next
		if err := send(stream, resp); err != nil {
			return fmt.Errorf("xds: send %s to %s: %w", typ, st.node, err)
		}
	}
	return nil
}
