package xds

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
)

// serve runs an xDS server on addr (":0" for any) until the returned stop.
func serve(t *testing.T, addr string, ix *workload.Index) (*Server, string, func()) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := NewServer(ctx, nil)
	if err := s.SetIndex(ix); err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	s.Register(g)
	go g.Serve(l)
	return s, l.Addr().String(), func() { g.Stop(); cancel() }
}

func parse(t *testing.T, doc string) *workload.Index {
	ix, err := config.Parse("mesh.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return ix
}

type latest struct {
	mu sync.Mutex
	ix *workload.Index
	n  int
}

func (l *latest) apply(ix *workload.Index) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ix, l.n = ix, l.n+1
	return nil
}

func (l *latest) get() *workload.Index { l.mu.Lock(); defer l.mu.Unlock(); return l.ix }

const one = `workloads:
- {uid: u1, name: a, namespace: default, workloadIps: ["10.0.0.1"], protocol: HBONE, authorizationPolicies: [default/p]}
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
policies:
- {name: p, namespace: default, scope: WorkloadSelector, action: Allow, rules: [[[{destinationPorts: [8080]}]]]}
`

func TestDeltaADSEndToEnd(t *testing.T) {
	srv, addr, stop := serve(t, "127.0.0.1:0", parse(t, one))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := &latest{}
	obs := &observed{msgs: map[string]int{}, bytes: map[string]int{}}
	c := &Client{Conn: conn, Node: Node{ID: "node-a"}, Observer: obs}
	synced := c.Synced() // taken before Run: the same channel is closed later
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx, got.apply); close(done) }()
	defer func() { cancel(); <-done }()

	testutil.WaitFor(t, "both types acked", c.Ready)
	select {
	case <-synced:
	default:
		t.Fatal("both types acked, Synced not closed")
	}
	testutil.WaitFor(t, "the initial mesh", func() bool {
		ix := got.get()
		return ix != nil && len(ix.Workloads()) == 1 && len(ix.Services()) == 1 && len(ix.Policies()) == 1
	})
	if w := got.get().WorkloadByUID("u1"); w == nil || len(got.get().PoliciesFor(w)) != 1 {
		t.Fatal("the workload lost its policy on the way")
	}

	// A live change: a workload added, the policy removed.
	two := strings.Replace(one, "policies:\n- {name: p", "more:\n- {name: p", 1)
	two = strings.Replace(two, "more:\n- {name: p, namespace: default, scope: WorkloadSelector, action: Allow, rules: [[[{destinationPorts: [8080]}]]]}\n", "", 1)
	two = strings.Replace(two, "workloads:\n", "workloads:\n- {uid: u2, name: b, namespace: default, workloadIps: [\"10.0.0.2\"], protocol: HBONE}\n", 1)
	two = strings.Replace(two, ", authorizationPolicies: [default/p]", "", 1)
	if err := srv.SetIndex(parse(t, two)); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the change", func() bool {
		ix := got.get()
		return len(ix.Workloads()) == 2 && len(ix.Policies()) == 0
	})

	// A push with one resource that does not decode is served but for it,
	// and NACKed with its reason: the push does not freeze the rest.
	before := got.get()
	bad := map[string]proto.Message{
		"u1":   WorkloadToProto(before.WorkloadByUID("u1")),
		"u2":   WorkloadToProto(before.WorkloadByUID("u2")),
		"s":    ServiceToProto(before.Services()[0]),
		"evil": &wapi.Address{Type: &wapi.Address_Workload{Workload: &wapi.Workload{Uid: "evil", Addresses: [][]byte{{1, 2, 3}}}}},
	}
	if err := srv.Publish(AddressType, bad); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the NACK", func() bool { return strings.Contains(c.LastNACK(), "evil: workload evil: address 0 is 3 bytes") })
	if ix := got.get(); ix == before || ix.WorkloadByUID("evil") != nil || ix.WorkloadByUID("u1") == nil || ix.WorkloadByUID("u2") == nil || len(ix.Services()) != 1 {
		t.Fatal("the push's good resources were not served apart from the bad one")
	}
	if rejected, _ := c.Counters(); rejected != 1 {
		t.Fatalf("rejected %d resources, want 1", rejected)
	}

	// The control plane restarts on the same address: the client comes
	// back, telling what it holds, and converges on the new server's view.
	stop()
	_, _, stop2 := serve(t, addr, parse(t, one))
	defer stop2()
	testutil.WaitFor(t, "convergence after the restart", func() bool {
		ix := got.get()
		return len(ix.Workloads()) == 1 && len(ix.Policies()) == 1 && ix.WorkloadByUID("u2") == nil
	})

	// ztunnel's xDS metrics saw it all: messages of both types, with their
	// sizes, and the stream the stopped server ended, as a Reconnect.
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if obs.msgs[AddressType] < 3 || obs.msgs[AuthorizationType] < 1 || obs.bytes[AddressType] < 100 {
		t.Errorf("messages observed %v, bytes %v", obs.msgs, obs.bytes)
	}
	if len(obs.ends) < 1 || obs.ends[0] != "Reconnect" {
		t.Errorf("stream ends observed %q, want the first a Reconnect", obs.ends)
	}
}

// observed records what an Observer is told.
type observed struct {
	mu          sync.Mutex
	msgs, bytes map[string]int
	ends        []string
}

func (o *observed) XDSMessage(typeURL string, n int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.msgs[typeURL]++
	o.bytes[typeURL] += n
}

func (o *observed) XDSTermination(reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.ends = append(o.ends, reason)
}

func TestTerminationReasons(t *testing.T) {
	for _, c := range []struct {
		received bool
		err      error
		want     string
	}{
		{false, status.Error(codes.Unavailable, "connection refused"), "ConnectionError"},
		{true, status.Error(codes.Unavailable, "server closing"), "Reconnect"},
		{true, io.EOF, "Complete"},
		{false, status.Error(codes.InvalidArgument, "missing parts in the service node"), "Error"},
		{true, errors.New("decode: truncated"), "Error"},
	} {
		if got := TerminationReason(c.received, c.err); got != c.want {
			t.Errorf("TerminationReason(%v, %v) = %s, want %s", c.received, c.err, got, c.want)
		}
	}
}

// Interop the other way: Ambit's client against a minimal server built
// straight from go-control-plane's cache and Istio's generated types (no
// Ambit code on the server side).
func TestClientAgainstAMinimalServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addrs, auths := cache.NewLinearCache(AddressType), cache.NewLinearCache(AuthorizationType)
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cache.Cache{AddressType: addrs, AuthorizationType: auths},
	}
	g := grpc.NewServer()
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, mux, nil))
	go g.Serve(l)
	defer g.Stop()
	addrs.UpdateResources(map[string]types.Resource{
		"u1": &wapi.Address{Type: &wapi.Address_Workload{Workload: &wapi.Workload{Uid: "u1", Name: "a", Namespace: "ns",
			Addresses: [][]byte{{10, 0, 0, 1}}, TunnelProtocol: wapi.TunnelProtocol_HBONE, AuthorizationPolicies: []string{"ns/p"}}}},
	}, nil)
	auths.UpdateResources(map[string]types.Resource{
		"ns/p": &sapi.Authorization{Name: "p", Namespace: "ns", Scope: sapi.Scope_WORKLOAD_SELECTOR, Action: sapi.Action_DENY,
			Groups: []*sapi.Group{{Rules: []*sapi.Rules{{Matches: []*sapi.Match{{DestinationPorts: []uint32{9}}}}}}}},
	}, nil)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := &latest{}
	c := &Client{Conn: conn, Node: Node{ID: "n"}}
	go c.Run(ctx, got.apply)
	testutil.WaitFor(t, "the minimal server's resources", func() bool {
		ix := got.get()
		if ix == nil || !c.Ready() {
			return false
		}
		w := ix.WorkloadByUID("u1")
		return w != nil && w.Protocol == workload.ProtocolHBONE && len(ix.PoliciesFor(w)) == 1
	})
	addrs.UpdateResources(nil, []string{"u1"})
	testutil.WaitFor(t, "the removal", func() bool { return len(got.get().Workloads()) == 0 })
}

// TestAPushNeverFreezes: what istiod sends that Ambit cannot serve yet (a
// waypoint, a network gateway, PASSTHROUGH, CIDR addresses), addresses
// claimed twice and host-network workloads sharing their node's address
// are all taken into the index with the rest of the push; a policy that
// does not convert denies everything in its scope (fail closed).
func TestAPushNeverFreezes(t *testing.T) {
	srv, addr, stop := serve(t, "127.0.0.1:0", parse(t, one))
	defer stop()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := &latest{}
	c := &Client{Conn: conn, Node: Node{ID: "ztunnel~10.0.0.9~z.istio-system~istio-system.svc.cluster.local"}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx, got.apply); close(done) }()
	defer func() { cancel(); <-done }()
	testutil.WaitFor(t, "both types acked", c.Ready)

	wl := func(uid string, ip byte, f func(*wapi.Workload)) proto.Message {
		w := &wapi.Workload{Uid: uid, Name: uid, Namespace: "default", Addresses: [][]byte{{10, 0, 1, ip}}}
		if f != nil {
			f(w)
		}
		return &wapi.Address{Type: &wapi.Address_Workload{Workload: w}}
	}
	svc := func(name string, f func(*wapi.Service)) proto.Message {
		s := &wapi.Service{Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local", Ports: []*wapi.Port{{ServicePort: 80, TargetPort: 8080}}}
		if f != nil {
			f(s)
		}
		return &wapi.Address{Type: &wapi.Address_Service{Service: s}}
	}
	waypoint := &wapi.GatewayAddress{Destination: &wapi.GatewayAddress_Address{Address: &wapi.NetworkAddress{Address: []byte{10, 0, 9, 9}}}, HboneMtlsPort: 15008}
	var length uint32 = 24
	push := map[string]proto.Message{
		"good":       wl("good", 1, nil),
		"waypointed": wl("waypointed", 2, func(w *wapi.Workload) { w.Waypoint = waypoint }),
		"gatewayed":  wl("gatewayed", 3, func(w *wapi.Workload) { w.NetworkGateway = waypoint }),
		"legacy":     wl("legacy", 4, func(w *wapi.Workload) { w.TunnelProtocol = wapi.TunnelProtocol_LEGACY_ISTIO_MTLS }),
		"host-a":     wl("host-a", 5, func(w *wapi.Workload) { w.NetworkMode = wapi.NetworkMode_HOST_NETWORK }),
		"host-b":     wl("host-b", 5, func(w *wapi.Workload) { w.NetworkMode = wapi.NetworkMode_HOST_NETWORK }),
		"twin-1":     wl("twin-1", 6, nil),
		"default/wp": svc("wp", func(s *wapi.Service) {
			s.Addresses = []*wapi.NetworkAddress{{Address: []byte{10, 96, 0, 7}}}
			s.Waypoint = waypoint
		}),
		"default/pass": svc("pass", func(s *wapi.Service) {
			s.Addresses = []*wapi.NetworkAddress{{Address: []byte{10, 96, 0, 8}}}
			s.LoadBalancing = &wapi.LoadBalancing{Mode: wapi.LoadBalancing_PASSTHROUGH}
		}),
		"default/cidr": svc("cidr", func(s *wapi.Service) {
			s.Addresses = []*wapi.NetworkAddress{{Address: []byte{192, 168, 4, 0}, Length: &length}}
		}),
	}
	if err := srv.Publish(AddressType, push); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the push served", func() bool { ix := got.get(); return ix != nil && ix.WorkloadByUID("twin-1") != nil })
	// Later, a second workload claims twin-1's address: the later one keeps it.
	push["twin-2"] = wl("twin-2", 6, nil)
	if err := srv.Publish(AddressType, push); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the second twin", func() bool { return got.get().WorkloadByUID("twin-2") != nil })
	ix := got.get()
	if n := c.LastNACK(); n != "" {
		t.Errorf("NACKed: %s", n)
	}
	for uid, want := range map[string]string{"good": "", "waypointed": "a waypoint", "gatewayed": "a network gateway", "legacy": "tunnel protocol LEGACY_ISTIO_MTLS"} {
		if w := ix.WorkloadByUID(uid); w == nil || w.Unsupported != want {
			t.Errorf("workload %s: %+v, want unsupported %q", uid, w, want)
		}
	}
	for key, want := range map[string]string{"wp": "a waypoint", "pass": "PASSTHROUGH load balancing", "cidr": "CIDR addresses"} {
		s := ix.Service(workload.NamespacedHost{Namespace: "default", Hostname: key + ".default.svc.cluster.local"})
		if s == nil || s.Unsupported != want {
			t.Errorf("service %s: %+v, want unsupported %q", key, s, want)
		}
	}
	if s := ix.ServiceCovering("", netip.MustParseAddr("192.168.4.77")); s == nil || s.Name != "cidr" {
		t.Errorf("an address in the CIDR service's range: %v", s)
	}
	if w := ix.WorkloadByAddr("", netip.MustParseAddr("10.0.1.5")); w != nil {
		t.Errorf("a host-network workload was looked up by its shared address: %s", w.UID)
	}
	if w := ix.WorkloadByAddr("", netip.MustParseAddr("10.0.1.6")); w == nil || w.UID != "twin-2" {
		t.Errorf("the address claimed twice belongs to %v, want the later twin-2", w)
	}
	if _, overlaps := c.Counters(); overlaps == 0 {
		t.Error("the overlap was not counted")
	}

	// A policy that does not convert denies everything in its scope.
	bad := &sapi.Authorization{Name: "broken", Namespace: "default", Scope: sapi.Scope_NAMESPACE, Action: sapi.Action(9)}
	if err := srv.Publish(AuthorizationType, map[string]proto.Message{"default/broken": bad}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the broken policy held", func() bool { return got.get().Policy("default/broken") != nil })
	p := got.get().Policy("default/broken")
	if p.Action != authz.ActionDeny || !strings.Contains(c.LastNACK(), "default/broken") {
		t.Errorf("a policy that does not convert: %+v (NACK %q), want a deny-all and a NACK naming it", p, c.LastNACK())
	}
	d := authz.Evaluate([]*authz.Policy{p}, authz.Conn{Source: netip.MustParseAddrPort("10.0.1.1:4000"), Destination: netip.MustParseAddrPort("10.0.1.2:80")})
	if d.Allow {
		t.Error("the deny-all held for a broken policy allowed a connection")
	}
}
