package control

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/testutil"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
)

// Interop: Ambit's control plane driven by a client made only of Istio's
// and go-control-plane's generated types, speaking as ztunnel does.
func TestControlPlaneSpeaksToAGeneratedClient(t *testing.T) {
	ca := testutil.CA(t)
	ix, err := config.Parse("mesh.yaml", []byte(`workloads:
- {uid: u1, name: a, namespace: default, workloadIps: ["10.0.0.1"], protocol: HBONE, node: node-a}
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
policies:
- {name: p, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [9]}]]]}
`))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv, err := NewServer(ctx, ca, Tokens{tokA: "node-a"}, netip.MustParseAddr("127.0.0.1"), ix, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Stop()
	pool := x509.NewCertPool()
	for _, r := range ca.Roots() {
		pool.AddCert(r)
	}
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: ambient.IstiodServerName})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ads := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn)

	// Without a token the stream is refused.
	noauth, err := ads.DeltaAggregatedResources(ctx)
	if err == nil {
		noauth.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: "type.googleapis.com/istio.workload.Address"})
		_, err = noauth.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("xDS without a token: %v", err)
	}

	actx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tokA)
	stream, err := ads.DeltaAggregatedResources(actx)
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "ztunnel~10.0.0.1~node-a"}
	got := map[string]int{}
	for _, typ := range []string{"type.googleapis.com/istio.workload.Address", "type.googleapis.com/istio.security.Authorization"} {
		if err := stream.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}
	for got["workload"] == 0 || got["service"] == 0 || got["policy"] == 0 {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.Resources {
			switch resp.TypeUrl {
			case "type.googleapis.com/istio.workload.Address":
				var a wapi.Address
				if err := r.Resource.UnmarshalTo(&a); err != nil {
					t.Fatal(err)
				}
				if w := a.GetWorkload(); w != nil && w.Uid == "u1" && r.Name == "u1" && w.TunnelProtocol == wapi.TunnelProtocol_HBONE {
					got["workload"]++
				}
				if s := a.GetService(); s != nil && r.Name == "default/s.default.svc.cluster.local" && len(s.Ports) == 1 {
					got["service"]++
				}
			case "type.googleapis.com/istio.security.Authorization":
				var p sapi.Authorization
				if err := r.Resource.UnmarshalTo(&p); err != nil {
					t.Fatal(err)
				}
				if r.Name == "default/p" && p.Action == sapi.Action_DENY && p.Groups[0].Rules[0].Matches[0].DestinationPorts[0] == 9 {
					got["policy"]++
				}
			}
		}
		stream.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: node, TypeUrl: resp.TypeUrl, ResponseNonce: resp.Nonce}) // ACK
	}
}
