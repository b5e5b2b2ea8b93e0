package xds

import (
	"reflect"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/protobuf/proto"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
)

const mesh = `workloads:
- uid: c1//client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.244.0.2", "fd00::2"]
  protocol: HBONE
  node: master
  canonicalName: client
  canonicalRevision: v1
  workloadName: client
  workloadType: deployment
  capacity: 3
  locality: {region: r1, zone: z1}
  authorizationPolicies: ["default/p"]
  services: {"default/echo.default.svc.cluster.local": {80: 8080, 90: 0}}
- {uid: c1//legacy, name: legacy, namespace: default, workloadIps: ["10.244.1.9"], status: Unhealthy}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10", "net2/fd00::10"]
  ports: {80: 8080, 90: 0}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: AllowAll}
policies:
- name: p
  namespace: default
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - principals: [!Exact "a", !Prefix "b", !Suffix "c", !Presence []]
        notNamespaces: [!Exact x]
        serviceAccounts: [{namespace: n, serviceAccount: s}]
        sourceIps: ["10.0.0.0/8", "fd00::/64"]
        notDestinationIps: ["192.168.1.1"]
        destinationPorts: [8080]
        notDestinationPorts: [15008]
    - - namespaces: [!Exact default]
  - - - destinationPorts: [1]
`

// Everything in the config survives the trip through Istio's types and
// their wire encoding.
func TestRoundTrip(t *testing.T) {
	ix, err := config.Parse("mesh.yaml", []byte(mesh))
	if err != nil {
		t.Fatal(err)
	}
	wire := func(m proto.Message, into proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if err := proto.Unmarshal(b, into); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range ix.Workloads() {
		var a wapi.Address
		wire(WorkloadToProto(w), &a)
		back, err := WorkloadFromProto(a.GetWorkload())
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, w) {
			t.Errorf("workload %s:\n got %+v\nwant %+v", w.UID, back, w)
		}
	}
	for _, s := range ix.Services() {
		var a wapi.Address
		wire(ServiceToProto(s), &a)
		back, err := ServiceFromProto(a.GetService())
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, s) {
			t.Errorf("service:\n got %+v\nwant %+v", back, s)
		}
	}
	for _, p := range ix.Policies() {
		var a sapi.Authorization
		wire(PolicyToProto(p), &a)
		back, err := PolicyFromProto(&a)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, p) {
			t.Errorf("policy:\n got %+v\nwant %+v", back, p)
		}
	}
}

func TestIstioDefaultsAndRefusals(t *testing.T) {
	w, err := WorkloadFromProto(&wapi.Workload{Uid: "u", Name: "n", Namespace: "ns", Addresses: [][]byte{{10, 0, 0, 1}}})
	if err != nil || w.TrustDomain != "cluster.local" || w.ServiceAccount != "default" || w.ClusterID != "Kubernetes" || w.Capacity != 1 || w.Protocol != "TCP" {
		t.Errorf("defaults: %+v %v", w, err)
	}
	bad := []struct {
		name string
		err  error
		want string
	}{
		{"no uid", errOf(WorkloadFromProto(&wapi.Workload{})), "empty uid"},
		{"5-byte address", errOf(WorkloadFromProto(&wapi.Workload{Uid: "u", Addresses: [][]byte{{1, 2, 3, 4, 5}}})), "5 bytes"},
		{"bad service key", errOf(WorkloadFromProto(&wapi.Workload{Uid: "u", Services: map[string]*wapi.PortList{"nohost": {}}})), "namespace/hostname"},
		{"service port 0", errOf(ServiceFromProto(&wapi.Service{Name: "s", Namespace: "n", Hostname: "h", Ports: []*wapi.Port{{ServicePort: 0}}})), "out of range"},
		{"policy port", errOf(PolicyFromProto(&sapi.Authorization{Name: "p", Namespace: "n", Groups: []*sapi.Group{{Rules: []*sapi.Rules{{Matches: []*sapi.Match{{DestinationPorts: []uint32{70000}}}}}}}})), "out of range"},
		{"empty string match", errOf(PolicyFromProto(&sapi.Authorization{Name: "p", Namespace: "n", Groups: []*sapi.Group{{Rules: []*sapi.Rules{{Matches: []*sapi.Match{{Principals: []*sapi.StringMatch{{}}}}}}}}})), "no type"},
	}
	for _, b := range bad {
		if b.err == nil || !strings.Contains(b.err.Error(), b.want) {
			t.Errorf("%s: %v, want %q", b.name, b.err, b.want)
		}
	}
}

func errOf[T any](_ T, err error) error { return err }

// TestEncodingIsStable: a resource's version is the digest of its
// encoding, so the same workload or service must encode to the same bytes
// every time, whatever Go's map order: ports came out in map order once,
// and every push resent each multi-port service and its endpoints.
func TestEncodingIsStable(t *testing.T) {
	ports := map[uint16]uint16{80: 8080, 443: 8443, 9090: 15090, 15021: 15021, 53: 5353}
	w := &workload.Workload{UID: "u", Name: "w", Namespace: "ns",
		Services: map[workload.NamespacedHost]map[uint16]uint16{{Namespace: "ns", Hostname: "s.ns.svc.cluster.local"}: ports}}
	s := &workload.Service{Name: "s", Namespace: "ns", Hostname: "s.ns.svc.cluster.local", Ports: ports}
	enc := func(m proto.Message) string {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	w0, s0 := enc(WorkloadToProto(w)), enc(ServiceToProto(s))
	for range 50 {
		if enc(WorkloadToProto(w)) != w0 || enc(ServiceToProto(s)) != s0 {
			t.Fatal("one workload or service encoded two ways: its version would change with no change")
		}
	}
}
