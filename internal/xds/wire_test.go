package xds

import (
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// The hand-written encoding against go-control-plane's generated types,
// both ways, with fields Ambit does not read set too (they are skipped).
func TestWireRequestMatchesGeneratedType(t *testing.T) {
	gen := &discoverygrpc.DeltaDiscoveryRequest{
		Node:                     &corev3.Node{Id: "ztunnel~10.0.0.1~node", Cluster: "Kubernetes"},
		TypeUrl:                  AddressType,
		ResourceNamesSubscribe:   []string{"a", "b/c"},
		ResourceNamesUnsubscribe: []string{"*"},
		InitialResourceVersions:  map[string]string{"x": "1", "y": "2"},
		ResponseNonce:            "7",
		ErrorDetail:              &statuspb.Status{Code: 3, Message: "bad ✓"},
	}
	b, err := proto.Marshal(gen)
	if err != nil {
		t.Fatal(err)
	}
	var got deltaRequest
	if err := got.unmarshal(b); err != nil {
		t.Fatal(err)
	}
	want := deltaRequest{nodeID: gen.Node.Id, typeURL: AddressType, subscribe: gen.ResourceNamesSubscribe,
		unsubscribe: gen.ResourceNamesUnsubscribe, initial: gen.InitialResourceVersions, nonce: "7",
		errorDetail: &rpcStatus{code: 3, message: "bad ✓"}}
	if !sameRequest(got, want) {
		t.Fatalf("decoded %+v, want %+v", got, want)
	}
	var back discoverygrpc.DeltaDiscoveryRequest
	if err := proto.Unmarshal(want.marshal(), &back); err != nil {
		t.Fatal(err)
	}
	gen.Node.Cluster = "" // not carried
	if !proto.Equal(gen, &back) {
		t.Fatalf("our encoding, decoded by the generated type:\n got %v\nwant %v", &back, gen)
	}
}

func TestWireResponseMatchesGeneratedType(t *testing.T) {
	gen := &discoverygrpc.DeltaDiscoveryResponse{
		SystemVersionInfo: "ignored",
		TypeUrl:           AuthorizationType,
		Nonce:             "12",
		RemovedResources:  []string{"gone"},
		Resources: []*discoverygrpc.Resource{
			{Name: "ns/p", Version: "v1", Resource: &anypb.Any{TypeUrl: AuthorizationType, Value: []byte{8, 1}}, Ttl: durationpb.New(5)},
			{Name: "empty", Version: "v2", Resource: &anypb.Any{TypeUrl: AuthorizationType}},
			{Name: "nobody"},
		},
	}
	b, err := proto.Marshal(gen)
	if err != nil {
		t.Fatal(err)
	}
	var got deltaResponse
	if err := got.unmarshal(b); err != nil {
		t.Fatal(err)
	}
	if got.typeURL != AuthorizationType || got.nonce != "12" || !slices.Equal(got.removed, []string{"gone"}) || len(got.resources) != 3 {
		t.Fatalf("decoded %+v", got)
	}
	r := got.resources
	if r[0].name != "ns/p" || r[0].version != "v1" || !r[0].hasBody || r[0].bodyType != AuthorizationType || string(r[0].body) != "\x08\x01" ||
		r[1].name != "empty" || !r[1].hasBody || len(r[1].body) != 0 || r[2].hasBody {
		t.Fatalf("decoded resources %+v %+v %+v", r[0], r[1], r[2])
	}
	var back discoverygrpc.DeltaDiscoveryResponse
	if err := proto.Unmarshal(got.marshal(), &back); err != nil {
		t.Fatal(err)
	}
	gen.SystemVersionInfo, gen.Resources[0].Ttl = "", nil // not carried
	if !proto.Equal(gen, &back) {
		t.Fatalf("our encoding, decoded by the generated type:\n got %v\nwant %v", &back, gen)
	}
}

// Malformed input is an error that says where, never a panic.
func TestWireRefusesMalformedInput(t *testing.T) {
	good := (&deltaResponse{typeURL: AddressType, nonce: "1", resources: []*resource{{name: "r", version: "v", hasBody: true, bodyType: AddressType, body: []byte("xyz")}}}).marshal()
	for i := 1; i < len(good); i++ {
		var r deltaResponse
		if err := r.unmarshal(good[:i]); err == nil {
			// A cut at a field boundary is a valid shorter message.
			continue
		} else if !strings.Contains(err.Error(), "xds: ") {
			t.Errorf("cut at %d: error %q does not say where", i, err)
		}
	}
	bad := appendString(nil, 2, "type")
	bad[len(bad)-1] = 0xff
	var q deltaRequest
	if err := q.unmarshal(bad); err == nil || !strings.Contains(err.Error(), "type_url") || !strings.Contains(err.Error(), "UTF-8") {
		t.Errorf("invalid UTF-8 in type_url: %v", err)
	}
}

func sameRequest(a, b deltaRequest) bool {
	return a.nodeID == b.nodeID && string(a.nodeMeta) == string(b.nodeMeta) && a.typeURL == b.typeURL && slices.Equal(a.subscribe, b.subscribe) &&
		slices.Equal(a.unsubscribe, b.unsubscribe) && maps.Equal(a.initial, b.initial) && a.nonce == b.nonce &&
		(a.errorDetail == nil) == (b.errorDetail == nil) && (a.errorDetail == nil || *a.errorDetail == *b.errorDetail)
}

// FuzzDeltaMessages: whatever a peer sends decodes or fails cleanly, and
// what decodes encodes to the same thing again.
func FuzzDeltaMessages(f *testing.F) {
	f.Add((&deltaRequest{nodeID: "n", nodeMeta: []byte{0x0a, 0x03, 0x0a, 0x01, 0x4b}, typeURL: AddressType, subscribe: []string{"a"}, initial: map[string]string{"k": "v"}, nonce: "1", errorDetail: &rpcStatus{code: 3, message: "m"}}).marshal())
	f.Add((&deltaResponse{typeURL: AddressType, nonce: "1", removed: []string{"x"}, resources: []*resource{{name: "r", version: "v", hasBody: true, bodyType: AddressType, body: []byte{1, 2}}}}).marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		var q deltaRequest
		if q.unmarshal(b) == nil {
			var q2 deltaRequest
			if err := q2.unmarshal(q.marshal()); err != nil || !sameRequest(q, q2) {
				t.Fatalf("request re-encoding: %v (%+v vs %+v)", err, q, q2)
			}
		}
		var r deltaResponse
		if r.unmarshal(b) == nil {
			var r2 deltaResponse
			if err := r2.unmarshal(r.marshal()); err != nil {
				t.Fatalf("response re-encoding: %v", err)
			}
			if string(r2.marshal()) != string(r.marshal()) {
				t.Fatalf("response encodes differently after a round trip")
			}
		}
	})
}

// The node as istiod reads it (go-control-plane's core.Node): ztunnel's id
// and its metadata as a google.protobuf.Struct, JSON values included.
func TestWireNodeMetadataMatchesGeneratedType(t *testing.T) {
	n := Node{ID: "ztunnel~10.244.1.5~ztunnel-x.istio-system~istio-system.svc.cluster.local", Metadata: map[string]any{
		"NAME": "ztunnel-x", "NAMESPACE": "istio-system", "INSTANCE_IPS": "10.244.1.5", "NODE_NAME": "worker1",
		"LABELS": map[string]any{"app": "ztunnel"}, "ENABLE_HBONE": true, "N": 3.0,
	}}
	id, meta, err := n.wire()
	if err != nil {
		t.Fatal(err)
	}
	req := deltaRequest{nodeID: id, nodeMeta: meta, typeURL: AddressType}
	var gen discoverygrpc.DeltaDiscoveryRequest
	if err := proto.Unmarshal(req.marshal(), &gen); err != nil {
		t.Fatal(err)
	}
	if gen.Node.GetId() != n.ID {
		t.Fatalf("node id %q", gen.Node.GetId())
	}
	got := gen.Node.GetMetadata().AsMap()
	if !reflect.DeepEqual(got, n.Metadata) {
		t.Fatalf("metadata as istiod decodes it:\n got %v\nwant %v", got, n.Metadata)
	}
	// And back: the server side keeps the id and the metadata's bytes.
	b, _ := proto.Marshal(&gen)
	var back deltaRequest
	if err := back.unmarshal(b); err != nil || back.nodeID != n.ID || len(back.nodeMeta) == 0 {
		t.Fatalf("decoded %+v: %v", back, err)
	}
	// A value a Struct cannot hold is an error, not a panic.
	if _, _, err := (Node{ID: "x", Metadata: map[string]any{"C": make(chan int)}}).wire(); err == nil {
		t.Fatal("a channel in the metadata encoded")
	}
}
