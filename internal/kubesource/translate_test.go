package kubesource_test

import (
	"context"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/kubetest"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/xds"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	securityv1 "istio.io/api/security/v1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiov1 "istio.io/client-go/pkg/apis/security/v1"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// same compares a resource as the control plane serves it with the
// expected one, written in prototext, field by field.
func same(t *testing.T, what string, got proto.Message, want string) {
	t.Helper()
	exp := got.ProtoReflect().New().Interface()
	if err := prototext.Unmarshal([]byte(want), exp); err != nil {
		t.Fatalf("%s: the expectation does not parse: %v", what, err)
	}
	if !proto.Equal(got, exp) {
		t.Errorf("%s:\ngot  %s\nwant %s", what, prototext.Format(got), prototext.Format(exp))
	}
}

func policy(t *testing.T, api *kubetest.APIServer, ns, name string, annots map[string]string, spec *securityv1.AuthorizationPolicy) {
	t.Helper()
	p := &istiov1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annots}}
	proto.Merge(&p.Spec, spec)
	if _, err := api.Istio.SecurityV1().AuthorizationPolicies(ns).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestTranslateTheCluster writes a cluster's worth of objects with
// client-go and checks what the control plane would serve for each, field
// by field: pods as workloads (membership, capture, identity, locality,
// canonical names, health, services with named ports resolved per pod,
// selected policies), services from ClusterIPs (and a headless one),
// policies by scope, and what is skipped and why.
func TestTranslateTheCluster(t *testing.T) {
	api := kubetest.Start(t)
	namespace(t, api, "demo", map[string]string{"istio.io/dataplane-mode": "ambient"})
	namespace(t, api, "plain", nil)
	namespace(t, api, "istio-system", nil)
	node(t, api, "worker1", map[string]string{"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1a", "topology.istio.io/subzone": "rack7"})
	node(t, api, "worker2", nil)

	captured := map[string]string{"ambient.istio.io/redirection": "enabled"}
	rs := &metav1.OwnerReference{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "server-7c9f5d", UID: "u1", Controller: ptr(true)}
	server := podSpec{ns: "demo", name: "server-7c9f5d-x2x4q", sa: "server", node: "worker1", annots: captured, owner: rs,
		labels: map[string]string{"app": "server", "version": "v1", "pod-template-hash": "7c9f5d"},
		ports:  []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}, ips: []string{"10.244.1.3"}, ready: true}.run(t, api)
	// A second server whose "http" is another port: the named targetPort
	// resolves per pod.
	server2 := podSpec{ns: "demo", name: "server-7c9f5d-b8k2m", sa: "server", node: "worker2", annots: captured, owner: rs,
		labels: map[string]string{"app": "server", "version": "v1", "pod-template-hash": "7c9f5d"},
		ports:  []corev1.ContainerPort{{Name: "http", ContainerPort: 9080}}, ips: []string{"10.244.2.3"}, ready: false}.run(t, api)
	podSpec{ns: "demo", name: "client", sa: "client", node: "worker2", ips: []string{"10.244.2.4"}, ready: true,
		labels: map[string]string{"service.istio.io/canonical-name": "curl", "app.kubernetes.io/version": "8.5"}}.run(t, api)
	podSpec{ns: "demo", name: "legacy", node: "worker2", annots: captured, ips: []string{"10.244.2.5"}, ready: true,
		labels: map[string]string{"istio.io/dataplane-mode": "none"}}.run(t, api)
	podSpec{ns: "plain", name: "outsider", sa: "outsider", node: "worker1", ips: []string{"10.244.1.9"}, ready: true}.run(t, api)
	podSpec{ns: "plain", name: "host", node: "worker1", ips: []string{"192.168.0.10"}, ready: true, hostNetwork: true}.run(t, api)
	podSpec{ns: "plain", name: "done", node: "worker1", ips: []string{"10.244.1.10"}, phase: corev1.PodSucceeded}.run(t, api)
	podSpec{ns: "plain", name: "pending", node: "worker1"}.run(t, api)
	// Another pod on server's address (a stale status): skipped, not the
	// whole view.
	podSpec{ns: "plain", name: "stale", node: "worker1", ips: []string{"10.244.1.3"}, ready: true}.run(t, api)

	service(t, api, "demo", "server", "10.96.0.10", map[string]string{"app": "server"},
		tcpPort("http", 80, intstr.FromString("http")), tcpPort("metrics", 9090, intstr.FromInt32(15090)),
		corev1.ServicePort{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(53), Protocol: corev1.ProtocolUDP})
	slice(t, api, "demo", "server", []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}}, server)
	slice2 := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(9080))}}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "demo", Name: "server-def34", Labels: map[string]string{"kubernetes.io/service-name": "server"}},
		AddressType: discoveryv1.AddressTypeIPv4, Ports: slice2,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.2.3"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true)},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "demo", Name: server2.Name, UID: server2.UID}}},
	}
	if _, err := api.Kube.DiscoveryV1().EndpointSlices("demo").Create(context.Background(), es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	service(t, api, "demo", "server-headless", "None", map[string]string{"app": "server"}, tcpPort("http", 80, intstr.FromInt32(8080)))
	slice(t, api, "demo", "server-headless", []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}}, server)

	policy(t, api, "demo", "allow-client", nil, &securityv1.AuthorizationPolicy{
		Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "server"}},
		Rules: []*securityv1.Rule{{
			From: []*securityv1.Rule_From{{Source: &securityv1.Source{Principals: []string{"cluster.local/ns/demo/sa/client"}, Namespaces: []string{"demo*"}}}},
			To:   []*securityv1.Rule_To{{Operation: &securityv1.Operation{Ports: []string{"8080"}}}},
			When: []*securityv1.Condition{{Key: "source.ip", Values: []string{"10.244.0.0/16"}}},
		}},
	})
	policy(t, api, "istio-system", "deny-evil", nil, &securityv1.AuthorizationPolicy{
		Action: securityv1.AuthorizationPolicy_DENY,
		Rules: []*securityv1.Rule{{From: []*securityv1.Rule_From{
			{Source: &securityv1.Source{Namespaces: []string{"evil"}}},
			{Source: &securityv1.Source{ServiceAccounts: []string{"bad", "other/worse"}}},
		}}},
	})
	policy(t, api, "demo", "http-only", map[string]string{"istio.io/dry-run": "true"}, &securityv1.AuthorizationPolicy{
		Rules: []*securityv1.Rule{
			{To: []*securityv1.Rule_To{{Operation: &securityv1.Operation{Methods: []string{"GET"}}}}},
			{From: []*securityv1.Rule_From{{Source: &securityv1.Source{NotIpBlocks: []string{"10.0.0.1"}}}}},
		},
	})
	policy(t, api, "demo", "ext-authz", nil, &securityv1.AuthorizationPolicy{Action: securityv1.AuthorizationPolicy_CUSTOM,
		ActionDetail: &securityv1.AuthorizationPolicy_Provider{Provider: &securityv1.AuthorizationPolicy_ExtensionProvider{Name: "oauth"}}})
	policy(t, api, "demo", "bad-port", nil, &securityv1.AuthorizationPolicy{
		Rules: []*securityv1.Rule{{To: []*securityv1.Rule_To{{Operation: &securityv1.Operation{Ports: []string{"http"}}}}}}})
	policy(t, api, "demo", "for-waypoint", nil, &securityv1.AuthorizationPolicy{
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "server"}}})

	c := startSource(t, api)
	var ix *workload.Index
	testutil.WaitFor(t, "a view with every object", func() bool {
		ix = c.latest()
		return ix != nil && len(ix.Policies()) == 3 && len(ix.Workloads()) == 5 && len(ix.Services()) == 3 // default/kubernetes too
	})

	// Workloads: the running pods with addresses, host network and
	// finished ones out, the second pod on 10.244.1.3 skipped.
	byUID := map[string]*workload.Workload{}
	for _, w := range ix.Workloads() {
		byUID[w.UID] = w
	}
	want := map[string]string{
		"Kubernetes//Pod/demo/server-7c9f5d-x2x4q": `workload: {uid: "Kubernetes//Pod/demo/server-7c9f5d-x2x4q" name: "server-7c9f5d-x2x4q" namespace: "demo"
			addresses: "\x0a\xf4\x01\x03" service_account: "server" trust_domain: "cluster.local" capacity: {value: 1} node: "worker1" tunnel_protocol: HBONE cluster_id: "Kubernetes"
			canonical_name: "server" canonical_revision: "v1" workload_name: "server" workload_type: POD
			authorization_policies: "demo/allow-client"
			locality: {region: "eu" zone: "eu-1a" subzone: "rack7"}
			services: {key: "demo/server-headless.demo.svc.cluster.local" value: {ports: {service_port: 80 target_port: 8080}}}
			services: {key: "demo/server.demo.svc.cluster.local" value: {ports: {service_port: 80 target_port: 8080} ports: {service_port: 9090 target_port: 15090}}}}`,
		"Kubernetes//Pod/demo/server-7c9f5d-b8k2m": `workload: {uid: "Kubernetes//Pod/demo/server-7c9f5d-b8k2m" name: "server-7c9f5d-b8k2m" namespace: "demo"
			addresses: "\x0a\xf4\x02\x03" service_account: "server" trust_domain: "cluster.local" capacity: {value: 1} node: "worker2" tunnel_protocol: HBONE cluster_id: "Kubernetes"
			canonical_name: "server" canonical_revision: "v1" workload_name: "server" workload_type: POD status: UNHEALTHY
			authorization_policies: "demo/allow-client"
			services: {key: "demo/server.demo.svc.cluster.local" value: {ports: {service_port: 80 target_port: 9080} ports: {service_port: 9090 target_port: 15090}}}}`,
		"Kubernetes//Pod/demo/client": `workload: {uid: "Kubernetes//Pod/demo/client" name: "client" namespace: "demo"
			addresses: "\x0a\xf4\x02\x04" service_account: "client" trust_domain: "cluster.local" capacity: {value: 1} node: "worker2" cluster_id: "Kubernetes"
			canonical_name: "curl" canonical_revision: "8.5" workload_name: "client" workload_type: POD}`,
		"Kubernetes//Pod/demo/legacy": `workload: {uid: "Kubernetes//Pod/demo/legacy" name: "legacy" namespace: "demo"
			addresses: "\x0a\xf4\x02\x05" service_account: "default" trust_domain: "cluster.local" capacity: {value: 1} node: "worker2" cluster_id: "Kubernetes"
			canonical_name: "legacy" canonical_revision: "latest" workload_name: "legacy" workload_type: POD}`,
		"Kubernetes//Pod/plain/outsider": `workload: {uid: "Kubernetes//Pod/plain/outsider" name: "outsider" namespace: "plain"
			addresses: "\x0a\xf4\x01\x09" service_account: "outsider" trust_domain: "cluster.local" capacity: {value: 1} node: "worker1" cluster_id: "Kubernetes"
			canonical_name: "outsider" canonical_revision: "latest" workload_name: "outsider" workload_type: POD
			locality: {region: "eu" zone: "eu-1a" subzone: "rack7"}}`,
	}
	for uid, exp := range want {
		w := byUID[uid]
		if w == nil {
			t.Errorf("no workload %s (have %v)", uid, keys(byUID))
			continue
		}
		same(t, uid, xds.WorkloadToProto(w), exp)
	}

	svcs := map[string]*wapi.Address{}
	for _, s := range ix.Services() {
		svcs[s.Name] = xds.ServiceToProto(s)
	}
	same(t, "service demo/server", svcs["server"], `service: {name: "server" namespace: "demo" hostname: "server.demo.svc.cluster.local"
		addresses: {address: "\x0a\x60\x00\x0a"} ports: {service_port: 80} ports: {service_port: 9090 target_port: 15090}}`)
	same(t, "service demo/server-headless", svcs["server-headless"], `service: {name: "server-headless" namespace: "demo" hostname: "server-headless.demo.svc.cluster.local"
		ports: {service_port: 80 target_port: 8080}}`)

	pols := map[string]*sapi.Authorization{}
	for _, p := range ix.Policies() {
		pols[p.Key()] = xds.PolicyToProto(p)
	}
	same(t, "policy demo/allow-client", pols["demo/allow-client"], `name: "allow-client" namespace: "demo" scope: WORKLOAD_SELECTOR action: ALLOW
		groups: {rules: {matches: {destination_ports: 8080}}
		         rules: {matches: {principals: {exact: "cluster.local/ns/demo/sa/client"} namespaces: {prefix: "demo"}}}
		         rules: {matches: {source_ips: {address: "\x0a\xf4\x00\x00" length: 16}}}}`)
	same(t, "policy istio-system/deny-evil", pols["istio-system/deny-evil"], `name: "deny-evil" namespace: "istio-system" scope: GLOBAL action: DENY
		groups: {rules: {matches: {namespaces: {exact: "evil"}}
		                 matches: {service_accounts: {namespace: "istio-system" serviceAccount: "bad"} service_accounts: {namespace: "other" serviceAccount: "worse"}}}}`)
	// The ALLOW rule on an HTTP method never matches at L4: dropped; the
	// L4 rule stays. Dry-run from the annotation.
	same(t, "policy demo/http-only", pols["demo/http-only"], `name: "http-only" namespace: "demo" scope: NAMESPACE action: ALLOW dry_run: true
		groups: {rules: {matches: {not_source_ips: {address: "\x0a\x00\x00\x01" length: 32}}}}`)
	for _, gone := range []string{"demo/ext-authz", "demo/bad-port", "demo/for-waypoint"} {
		if pols[gone] != nil {
			t.Errorf("policy %s is served; want it left out", gone)
		}
	}

	// Each skip logged once, and counted.
	testutil.WaitFor(t, "the skips logged", func() bool {
		l := c.log.String()
		return strings.Contains(l, `key=demo/ext-authz reason="spec.action: the node proxy does not enforce CUSTOM"`) &&
			strings.Contains(l, `key=demo/bad-port reason="spec.rules[0]: to.operation.ports: \"http\" is not a port"`) &&
			strings.Contains(l, `key=demo/http-only reason="HTTP attributes (methods) need a waypoint`) &&
			strings.Contains(l, `kind=Pod key=plain/stale reason="workloadIps: address /10.244.1.3 is already workload`)
	})
	if n := skipped(t, c.src, "AuthorizationPolicy"); n != 3 {
		t.Errorf("ambit_kube_skipped_objects{kind=AuthorizationPolicy} = %v, want 3 (ext-authz, bad-port, http-only in part)", n)
	}
	if n := skipped(t, c.src, "Pod"); n != 1 {
		t.Errorf("ambit_kube_skipped_objects{kind=Pod} = %v, want 1 (stale)", n)
	}
	if strings.Contains(c.log.String(), "for-waypoint") {
		t.Errorf("a waypoint's policy (targetRefs) is not the node proxy's, and not a skip either:\n%s", c.log)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
