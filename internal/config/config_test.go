package config

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
)

func TestLoadExample(t *testing.T) {
	ix, err := Load("../../examples/local-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(ix.Workloads()) != 3 || len(ix.Services()) != 1 || len(ix.Policies()) != 1 {
		t.Fatalf("%d workloads, %d services, %d policies", len(ix.Workloads()), len(ix.Services()), len(ix.Policies()))
	}
	echo := ix.WorkloadByAddr("", netip.MustParseAddr("10.244.1.3"))
	if echo == nil || echo.Protocol != workload.ProtocolHBONE || echo.Identity().String() != "spiffe://cluster.local/ns/default/sa/echo" {
		t.Fatalf("echo = %+v", echo)
	}
	legacy := ix.WorkloadByUID("cluster1//v1/Pod/default/legacy")
	if legacy.Protocol != workload.ProtocolTCP || legacy.ServiceAccount != "default" || legacy.TrustDomain != "cluster.local" || legacy.Status != workload.Healthy || legacy.Capacity != 1 {
		t.Errorf("defaults not applied: %+v", legacy)
	}
	svc := ix.ServiceByVIP("", netip.MustParseAddr("10.96.0.10"))
	if svc == nil || svc.Ports[80] != 8080 || svc.LoadBalancer.Mode != workload.LBFailover || len(svc.LoadBalancer.RoutingPreferences) != 3 {
		t.Fatalf("service = %+v", svc)
	}
	if eps := ix.Endpoints(svc.Key()); len(eps) != 1 || eps[0].Workload != echo {
		t.Errorf("endpoints = %+v", eps)
	}
	pols := ix.PoliciesFor(echo)
	if len(pols) != 1 {
		t.Fatalf("policies for echo: %v", pols)
	}
	p := pols[0]
	if p.Scope != authz.ScopeWorkloadSelector || p.Action != authz.ActionAllow || len(p.Rules) != 1 || len(p.Rules[0]) != 2 {
		t.Fatalf("policy = %+v", p)
	}
	if pm := p.Rules[0][0][0].Principals; len(pm) != 1 || pm[0] != (authz.StringMatch{Kind: authz.Exact, Value: "cluster.local/ns/default/sa/client"}) {
		t.Errorf("principals = %+v", pm)
	}
	client := identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	c := authz.Conn{Source: netip.MustParseAddrPort("10.244.0.2:1"), Destination: netip.MustParseAddrPort("10.244.1.3:8080"), SourceID: client}
	if d := authz.Evaluate(pols, c); !d.Allow {
		t.Errorf("the example policy denies the client: %v", d)
	}
	c.Destination = netip.MustParseAddrPort("10.244.1.3:9090")
	if d := authz.Evaluate(pols, c); d.Allow {
		t.Errorf("the example policy allows port 9090: %v", d)
	}
}

func TestStringMatchForms(t *testing.T) {
	doc := `
policies:
- name: p
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact "a", !Prefix "b", !Suffix "c", !Presence [], {Exact: "d"}]
        notNamespaces: [!Exact ns]
        sourceIps: ["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"]
        serviceAccounts: [{namespace: default, serviceAccount: sleep}]
        notDestinationPorts: [15008]
`
	ix, err := Parse("test.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	m := ix.Policies()[0].Rules[0][0][0]
	want := []authz.StringMatch{{Kind: authz.Exact, Value: "a"}, {Kind: authz.Prefix, Value: "b"}, {Kind: authz.Suffix, Value: "c"}, {Kind: authz.Presence}, {Kind: authz.Exact, Value: "d"}}
	if len(m.Principals) != len(want) {
		t.Fatalf("principals %+v", m.Principals)
	}
	for i := range want {
		if m.Principals[i] != want[i] {
			t.Errorf("principal %d = %+v, want %+v", i, m.Principals[i], want[i])
		}
	}
	if len(m.SourceIPs) != 3 || m.SourceIPs[1].String() != "192.168.1.1/32" {
		t.Errorf("sourceIps %v", m.SourceIPs)
	}
	if len(m.ServiceAccounts) != 1 || m.ServiceAccounts[0].ServiceAccount != "sleep" || m.NotDestinationPorts[0] != 15008 {
		t.Errorf("match %+v", m)
	}
}

func TestEmptyConfig(t *testing.T) {
	for _, doc := range []string{"", "# nothing\n", "workloads: []\n"} {
		ix, err := Parse("empty.yaml", []byte(doc))
		if err != nil || len(ix.Workloads()) != 0 {
			t.Errorf("%q: %v", doc, err)
		}
	}
}

// Every refusal names the file, the line and the field.
func TestErrorsNameLineAndField(t *testing.T) {
	const head = "workloads:\n- name: a\n  namespace: default\n"
	cases := []struct {
		name, doc, want string
	}{
		{"unknown top-level field", "workload: []\n", "bad.yaml:1:1: workload: unknown field"},
		{"unknown workload field", head + "  workloadIps: [\"10.0.0.1\"]\n  colour: blue\n", "bad.yaml:5:3: workloads[0].colour: unknown field"},
		{"bad IP", head + "  workloadIps: [\"10.0.0.300\"]\n", `bad.yaml:4:17: workloads[0].workloadIps[0]: "10.0.0.300" is not an IP address`},
		{"bad protocol", head + "  workloadIps: [\"10.0.0.1\"]\n  protocol: UDP\n", `bad.yaml:5:13: workloads[0].protocol: "UDP" is not one of TCP, HBONE`},
		{"missing IPs", head, "bad.yaml:2:3: workloads[0].workloadIps: required"},
		{"port out of range", head + "  workloadIps: [\"10.0.0.1\"]\n  services: {\"default/x\": {70000: 80}}\n", "workloads[0].services.default/x: \"70000\" is not a whole number from 0 to 65535"},
		{"duplicate uid", "workloads:\n- {uid: u, name: a, namespace: d, workloadIps: [\"10.0.0.1\"]}\n- {uid: u, name: b, namespace: d, workloadIps: [\"10.0.0.2\"]}\n", `bad.yaml:3:9: workloads[1].uid: uid "u" is used twice`},
		{"dangling policy", head + "  workloadIps: [\"10.0.0.1\"]\n  authorizationPolicies: [default/nope]\n", "bad.yaml:5:26: workloads[0].authorizationPolicies: no policy default/nope"},
		{"dangling service", head + "  workloadIps: [\"10.0.0.1\"]\n  services: {\"default/nope\": {80: 80}}\n", "bad.yaml:5:13: workloads[0].services: no service default/nope"},
		{"bad string match", "policies:\n- {name: p, namespace: d, scope: Global, action: Allow, rules: [[[{principals: [!Regex \"x\"]}]]]}\n", `policies[0].rules[0][0][0].principals[0]: unknown string match "Regex"`},
		{"untagged string match", "policies:\n- {name: p, namespace: d, scope: Global, action: Allow, rules: [[[{principals: [\"x\"]}]]]}\n", "want a string match such as !Exact"},
		{"bad scope", "policies:\n- {name: p, namespace: d, scope: Cluster, action: Allow}\n", `bad.yaml:2:34: policies[0].scope: "Cluster" is not one of Global, Namespace, WorkloadSelector`},
		{"missing action", "policies:\n- {name: p, namespace: d, scope: Global}\n", "bad.yaml:2:3: policies[0].action: required"},
		{"bad VIP", "services:\n- {name: s, namespace: d, hostname: h, vips: [\"10.96.0.1\"]}\n", `services[0].vips[0]: "10.96.0.1": want network/ip`},
		{"waypoint not supported", head + "  workloadIps: [\"10.0.0.1\"]\n  waypoint: {destination: \"/10.0.0.9\", hboneMtlsPort: 15008}\n", "workloads[0].waypoint: not supported by Ambit yet"},
		{"repeated field", head + "  name: b\n", "bad.yaml:4:3: workloads[0].name: field repeated"},
		{"syntax", "workloads: [\n", "bad.yaml: "},
		{"two documents", "workloads: []\n---\npolicies: []\n", "more than one YAML document"},
		{"bad bool", "policies:\n- {name: p, namespace: d, scope: Global, action: Allow, dryRun: maybe}\n", `policies[0].dryRun: "maybe" is not true or false`},
		{"presence in block style", "policies:\n- name: p\n  namespace: d\n  scope: Global\n  action: Allow\n  rules:\n  - - - principals:\n        - !Presence\n        - !Bogus x\n", "bad.yaml:9:11: policies[0].rules[0][0][0].principals[1]: unknown string match \"Bogus\""},
		{"bad identity", "workloads:\n- {name: a, namespace: \"bad ns\", workloadIps: [\"10.0.0.1\"]}\n", "workloads[0].serviceAccount: the workload's identity is not valid"},
	}
	for _, tc := range cases {
		_, err := Parse("bad.yaml", []byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v; want it to contain %q", tc.name, err, tc.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("workloads:\n- {name: a, namespace: d, workloadIps: [\"10.0.0.1\"]}\n"))
	f.Add([]byte("policies:\n- {name: p, namespace: d, scope: Global, action: Allow, rules: [[[{principals: [!Exact x]}]]]}\n"))
	f.Add([]byte("services:\n- {name: s, namespace: d, hostname: h, vips: [\"/10.96.0.1\"], ports: {80: 8080}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ix, err := Parse("fuzz.yaml", data)
		if err == nil && ix == nil {
			t.Fatal("nil index without error")
		}
	})
}
