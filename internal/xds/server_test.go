package xds

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	wapi "istio.io/istio/pkg/workloadapi"
)

// rawClient speaks delta ADS to the server with nothing of Ambit's client:
// the generated gRPC stub only, so the tests see the server's messages as
// any xDS client (a Rust ztunnel, say) would.
type rawClient struct {
	t      *testing.T
	stream discoverygrpc.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	resps  chan *discoverygrpc.DeltaDiscoveryResponse
	errs   chan error
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &rawClient{t: t, stream: stream, resps: make(chan *discoverygrpc.DeltaDiscoveryResponse, 16), errs: make(chan error, 1)}
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				c.errs <- err
				return
			}
			c.resps <- r
		}
	}()
	return c
}

func (c *rawClient) send(req *discoverygrpc.DeltaDiscoveryRequest) {
	c.t.Helper()
	req.Node = &corev3.Node{Id: "raw"}
	if err := c.stream.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

func (c *rawClient) recv() *discoverygrpc.DeltaDiscoveryResponse {
	c.t.Helper()
	select {
	case r := <-c.resps:
		return r
	case err := <-c.errs:
		c.t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		c.t.Fatal("no response in 10 s")
	}
	return nil
}

// quiet asserts that nothing arrives for a while.
func (c *rawClient) quiet(why string) {
	c.t.Helper()
	select {
	case r := <-c.resps:
		c.t.Fatalf("%s, but got %s: %v removed %v", why, r.GetTypeUrl(), names(r), r.GetRemovedResources())
	case err := <-c.errs:
		c.t.Fatalf("stream ended: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
}

func (c *rawClient) ack(r *discoverygrpc.DeltaDiscoveryResponse) {
	c.t.Helper()
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()})
}

func names(r *discoverygrpc.DeltaDiscoveryResponse) []string {
	var ns []string
	for _, x := range r.GetResources() {
		ns = append(ns, x.GetName())
	}
	slices.Sort(ns)
	return ns
}

func wl(uid, ip string) proto.Message {
	return &wapi.Address{Type: &wapi.Address_Workload{Workload: &wapi.Workload{Uid: uid, Name: uid, Namespace: "ns",
		Addresses: [][]byte{[]byte(ip)}}}}
}

// ab is a view of two workloads, a and b.
func ab() map[string]proto.Message {
	return map[string]proto.Message{"a": wl("a", "\x0a\x00\x00\x01"), "b": wl("b", "\x0a\x00\x00\x02")}
}

// serveAddresses runs a server whose Address resources are rs.
func serveAddresses(t *testing.T, rs map[string]proto.Message) (*Server, string) {
	t.Helper()
	srv, addr, stop := serve(t, "127.0.0.1:0", parse(t, "workloads: []\n"))
	t.Cleanup(stop)
	publish(t, srv, rs)
	return srv, addr
}

func publish(t *testing.T, srv *Server, rs map[string]proto.Message) {
	t.Helper()
	if err := srv.Publish(AddressType, rs); err != nil {
		t.Fatal(err)
	}
}

func TestServerWildcardSendsOnlyChanges(t *testing.T) {
	srv, addr := serveAddresses(t, ab())
	c := dialRaw(t, addr)
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType})
	r := c.recv()
	if got := names(r); !slices.Equal(got, []string{"a", "b"}) || len(r.GetRemovedResources()) != 0 {
		t.Fatalf("first push: %v removed %v, want [a b]", got, r.GetRemovedResources())
	}
	for _, x := range r.GetResources() {
		var a wapi.Address
		if err := x.GetResource().UnmarshalTo(&a); err != nil || a.GetWorkload().GetUid() != x.GetName() || x.GetVersion() == "" {
			t.Fatalf("resource %s: %v %v version %q", x.GetName(), &a, err, x.GetVersion())
		}
	}
	c.ack(r)

	// b changes, a stays, c arrives; then a goes.
	publish(t, srv, map[string]proto.Message{"a": wl("a", "\x0a\x00\x00\x01"), "b": wl("b", "\x0a\x00\x00\x09"), "c": wl("c", "\x0a\x00\x00\x03")})
	r = c.recv()
	if got := names(r); !slices.Equal(got, []string{"b", "c"}) || len(r.GetRemovedResources()) != 0 {
		t.Fatalf("after a change: %v removed %v, want [b c] and nothing removed", got, r.GetRemovedResources())
	}
	c.ack(r)
	publish(t, srv, map[string]proto.Message{"b": wl("b", "\x0a\x00\x00\x09"), "c": wl("c", "\x0a\x00\x00\x03")})
	r = c.recv()
	if len(r.GetResources()) != 0 || !slices.Equal(r.GetRemovedResources(), []string{"a"}) {
		t.Fatalf("after a removal: %v removed %v, want only a removed", names(r), r.GetRemovedResources())
	}
	c.ack(r)
	// The same view again: nothing to say.
	publish(t, srv, map[string]proto.Message{"b": wl("b", "\x0a\x00\x00\x09"), "c": wl("c", "\x0a\x00\x00\x03")})
	c.quiet("an unchanged view sends nothing")
}

func TestServerHonoursInitialVersions(t *testing.T) {
	_, addr := serveAddresses(t, ab())
	first := dialRaw(t, addr)
	first.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType})
	r := first.recv()
	held := map[string]string{"gone": "v0"}
	for _, x := range r.GetResources() {
		held[x.GetName()] = x.GetVersion()
	}
	held["b"] = "stale"

	// A second server with the same view gives the same versions (they
	// are digests, so they survive a control-plane restart).
	_, addr2 := serveAddresses(t, ab())
	c := dialRaw(t, addr2)
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType, InitialResourceVersions: held})
	r = c.recv()
	if got := names(r); !slices.Equal(got, []string{"b"}) || !slices.Equal(r.GetRemovedResources(), []string{"gone"}) {
		t.Fatalf("reconnect holding a (current), b (stale), gone: sent %v removed %v, want [b] and [gone]", got, r.GetRemovedResources())
	}
	c.ack(r)

	// A first request with nothing to send still gets an (empty) answer,
	// so the client can tell it is in sync.
	c2 := dialRaw(t, addr2)
	c2.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AuthorizationType})
	if r := c2.recv(); r.GetTypeUrl() != AuthorizationType || len(r.GetResources())+len(r.GetRemovedResources()) != 0 {
		t.Fatalf("first request of an empty type: %v removed %v, want an empty answer", names(r), r.GetRemovedResources())
	}
}

func TestServerOnePushInFlightAndNACK(t *testing.T) {
	srv, addr := serveAddresses(t, nil)
	c := dialRaw(t, addr)
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType})
	empty := c.recv()
	// Not answered yet: a change waits for the answer.
	publish(t, srv, map[string]proto.Message{"x": wl("x", "\x0a\x00\x00\x01"), "bad": wl("bad", "\x01")})
	c.quiet("a push is unanswered")
	c.ack(empty)
	r := c.recv()
	if got := names(r); !slices.Equal(got, []string{"bad", "x"}) {
		t.Fatalf("after the ACK: %v, want [bad x]", got)
	}
	// The client rejects the push: it holds neither x nor bad.
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType, ResponseNonce: r.GetNonce(),
		ErrorDetail: &statuspb.Status{Code: int32(codes.InvalidArgument), Message: "bad: 1 byte address"}})
	c.quiet("a NACK is not answered by the same push")
	// The fix: x is unchanged, but the client never took it, so it goes again.
	publish(t, srv, map[string]proto.Message{"x": wl("x", "\x0a\x00\x00\x01"), "bad": wl("bad", "\x0a\x00\x00\x02")})
	r = c.recv()
	if got := names(r); !slices.Equal(got, []string{"bad", "x"}) {
		t.Fatalf("after a NACK and a fix: %v, want [bad x] (x was never taken)", got)
	}
}

func TestServerNamedSubscriptions(t *testing.T) {
	srv, addr := serveAddresses(t, ab())
	c := dialRaw(t, addr)
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType, ResourceNamesSubscribe: []string{"a", "missing"}})
	r := c.recv()
	if got := names(r); !slices.Equal(got, []string{"a"}) || !slices.Equal(r.GetRemovedResources(), []string{"missing"}) {
		t.Fatalf("subscribe a, missing: sent %v removed %v, want [a] and [missing] (it does not exist)", got, r.GetRemovedResources())
	}
	c.ack(r)
	// b is not subscribed: its changes are not sent.
	publish(t, srv, map[string]proto.Message{"a": wl("a", "\x0a\x00\x00\x01"), "b": wl("b", "\x0a\x00\x00\x07")})
	c.quiet("only b changed and b is not subscribed")
	// Subscribe b later; unsubscribe a, whose changes then stop.
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType, ResourceNamesSubscribe: []string{"b"}, ResourceNamesUnsubscribe: []string{"a"}})
	r = c.recv()
	if got := names(r); !slices.Equal(got, []string{"b"}) || len(r.GetRemovedResources()) != 0 {
		t.Fatalf("subscribe b: sent %v removed %v, want [b]", got, r.GetRemovedResources())
	}
	c.ack(r)
	publish(t, srv, map[string]proto.Message{"a": wl("a", "\x0a\x00\x00\x05"), "b": wl("b", "\x0a\x00\x00\x07")})
	c.quiet("a changed but was unsubscribed")
	// "*" turns the subscription into a wildcard.
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: AddressType, ResourceNamesSubscribe: []string{"*"}})
	if got := names(c.recv()); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("wildcard: sent %v, want [a] (b is held already)", got)
	}
}

func TestServerRefusesWhatItDoesNotServe(t *testing.T) {
	_, addr := serveAddresses(t, nil)
	c := dialRaw(t, addr)
	c.send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"})
	select {
	case err := <-c.errs:
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "unknown type") {
			t.Fatalf("unknown type: %v, want InvalidArgument naming it", err)
		}
	case r := <-c.resps:
		t.Fatalf("unknown type answered: %v", r)
	case <-time.After(10 * time.Second):
		t.Fatal("unknown type: no answer")
	}

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sotw, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(context.Background())
	if err == nil {
		_, err = sotw.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("state-of-the-world ADS: %v, want Unimplemented", err)
	}
}
