package authz

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/identity"
)

var (
	client = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	other  = identity.ID{TrustDomain: "cluster.local", Namespace: "other", ServiceAccount: "sleep"}
)

func conn(src string, id identity.ID, dst string) Conn {
	return Conn{Source: netip.MustParseAddrPort(src), Destination: netip.MustParseAddrPort(dst), SourceID: id}
}

func exact(s string) StringMatch  { return StringMatch{Kind: Exact, Value: s} }
func prefix(s string) StringMatch { return StringMatch{Kind: Prefix, Value: s} }
func suffix(s string) StringMatch { return StringMatch{Kind: Suffix, Value: s} }

func policy(action Action, rules ...[][]Match) *Policy {
	return &Policy{Name: "p", Namespace: "default", Scope: ScopeNamespace, Action: action, Rules: rules}
}

// one wraps a single match as a rule of one clause.
func one(m Match) [][]Match { return [][]Match{{m}} }

func TestMatchSemantics(t *testing.T) {
	fromClient := conn("10.244.0.2:40000", client, "10.244.1.3:8080")
	plaintext := conn("10.244.0.9:40000", identity.ID{}, "10.244.1.3:8080")
	cases := []struct {
		name  string
		rules [][][]Match
		c     Conn
		want  bool
	}{
		{"no rules never matches", nil, fromClient, false},
		{"empty match never matches", [][][]Match{one(Match{})}, fromClient, false},
		{"empty clause does not constrain", [][][]Match{{{}, {{DestinationPorts: []uint16{8080}}}}}, fromClient, true},
		{"principal exact", [][][]Match{one(Match{Principals: []StringMatch{exact("cluster.local/ns/default/sa/client")}})}, fromClient, true},
		{"principal compares without spiffe://", [][][]Match{one(Match{Principals: []StringMatch{exact("spiffe://cluster.local/ns/default/sa/client")}})}, fromClient, false},
		{"principal prefix", [][][]Match{one(Match{Principals: []StringMatch{prefix("cluster.local/ns/default/")}})}, fromClient, true},
		{"principal suffix", [][][]Match{one(Match{Principals: []StringMatch{suffix("/sa/client")}})}, fromClient, true},
		{"principal presence", [][][]Match{one(Match{Principals: []StringMatch{{Kind: Presence}}})}, fromClient, true},
		{"presence needs an identity", [][][]Match{one(Match{Principals: []StringMatch{{Kind: Presence}}})}, plaintext, false},
		{"principal never matches plaintext", [][][]Match{one(Match{Principals: []StringMatch{prefix("")}})}, plaintext, false},
		{"notPrincipals passes plaintext", [][][]Match{one(Match{NotPrincipals: []StringMatch{prefix("")}})}, plaintext, true},
		{"notPrincipals excludes", [][][]Match{one(Match{NotPrincipals: []StringMatch{exact("cluster.local/ns/default/sa/client")}})}, fromClient, false},
		{"namespace", [][][]Match{one(Match{Namespaces: []StringMatch{exact("default")}})}, fromClient, true},
		{"namespace of plaintext is empty", [][][]Match{one(Match{NotNamespaces: []StringMatch{exact("default")}})}, plaintext, true},
		{"service account", [][][]Match{one(Match{ServiceAccounts: []ServiceAccountMatch{{"default", "client"}}})}, fromClient, true},
		{"service account other ns", [][][]Match{one(Match{ServiceAccounts: []ServiceAccountMatch{{"other", "client"}}})}, fromClient, false},
		{"source ip cidr", [][][]Match{one(Match{SourceIPs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")}})}, fromClient, true},
		{"not source ip", [][][]Match{one(Match{NotSourceIPs: []netip.Prefix{netip.MustParsePrefix("10.244.0.2/32")}})}, fromClient, false},
		{"destination ip", [][][]Match{one(Match{DestinationIPs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}})}, fromClient, true},
		{"not destination ip", [][][]Match{one(Match{NotDestinationIPs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}})}, fromClient, false},
		{"target port, not 15008", [][][]Match{one(Match{DestinationPorts: []uint16{15008}})}, fromClient, false},
		{"not destination port", [][][]Match{one(Match{NotDestinationPorts: []uint16{8080}})}, fromClient, false},
		{"values of a field OR", [][][]Match{one(Match{DestinationPorts: []uint16{1, 8080}})}, fromClient, true},
		{"fields of a match AND", [][][]Match{one(Match{DestinationPorts: []uint16{8080}, Namespaces: []StringMatch{exact("other")}})}, fromClient, false},
		{"not-values: every one must miss", [][][]Match{one(Match{DestinationPorts: []uint16{8080}, NotDestinationPorts: []uint16{1, 8080}})}, fromClient, false},
		{"matches of a clause OR", [][][]Match{{{{Namespaces: []StringMatch{exact("other")}}, {DestinationPorts: []uint16{8080}}}}}, fromClient, true},
		{"clauses of a rule AND", [][][]Match{{{{Namespaces: []StringMatch{exact("default")}}}, {{DestinationPorts: []uint16{9090}}}}}, fromClient, false},
		{"a rule of no clauses matches all", [][][]Match{{}}, plaintext, true},
		{"rules OR", [][][]Match{one(Match{DestinationPorts: []uint16{9090}}), one(Match{Namespaces: []StringMatch{exact("default")}})}, fromClient, true},
	}
	for _, tc := range cases {
		p := policy(ActionAllow, tc.rules...)
		if got := p.matches(tc.c); got != tc.want {
			t.Errorf("%s: matches = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestEvaluateOrder(t *testing.T) {
	c := conn("10.244.0.2:40000", client, "10.244.1.3:8080")
	allowClient := policy(ActionAllow, one(Match{Principals: []StringMatch{exact(client.Principal())}}))
	allowClient.Name = "allow-client"
	allowOther := policy(ActionAllow, one(Match{Principals: []StringMatch{exact(other.Principal())}}))
	allowOther.Name = "allow-other"
	denyPort := policy(ActionDeny, one(Match{DestinationPorts: []uint16{8080}}))
	denyPort.Name = "deny-8080"
	denyOtherPort := policy(ActionDeny, one(Match{DestinationPorts: []uint16{9090}}))
	dry := policy(ActionDeny, one(Match{DestinationPorts: []uint16{8080}}))
	dry.Name, dry.DryRun = "dry", true

	cases := []struct {
		name     string
		policies []*Policy
		allow    bool
		by       string
		reason   string
	}{
		{"no policy: allow", nil, true, "", "no ALLOW policy"},
		{"deny only, not matching: allow", []*Policy{denyOtherPort}, true, "", "no ALLOW"},
		{"matching allow", []*Policy{allowOther, allowClient}, true, "default/allow-client", "allowed by"},
		{"allow exists, none matches: deny", []*Policy{allowOther}, false, "", "no ALLOW policy matched (default/allow-other)"},
		{"deny wins over allow", []*Policy{allowClient, denyPort}, false, "default/deny-8080", "DENY policy"},
		{"dry-run deny changes nothing", []*Policy{dry}, true, "", "no ALLOW"},
	}
	for _, tc := range cases {
		d := Evaluate(tc.policies, c)
		if d.Allow != tc.allow || d.Policy != tc.by || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%s: %+v; want allow=%v by %q reason ~%q", tc.name, d, tc.allow, tc.by, tc.reason)
		}
	}
	if d := Evaluate([]*Policy{dry, allowClient}, c); !d.Allow || len(d.DryRun) != 1 || d.DryRun[0] != "default/dry" {
		t.Errorf("dry run not recorded: %+v", d)
	}
	// A plaintext connection (no identity) meets an identity-based ALLOW: deny.
	if d := Evaluate([]*Policy{allowClient}, conn("10.244.0.9:1", identity.ID{}, "10.244.1.3:8080")); d.Allow {
		t.Errorf("plaintext allowed by a principal rule: %+v", d)
	}
}

func TestApplies(t *testing.T) {
	global := &Policy{Name: "g", Namespace: "istio-system", Scope: ScopeGlobal}
	ns := &Policy{Name: "n", Namespace: "default", Scope: ScopeNamespace}
	sel := &Policy{Name: "s", Namespace: "default", Scope: ScopeWorkloadSelector}
	if !global.Applies("anything", nil) {
		t.Error("global policy must apply everywhere")
	}
	if !ns.Applies("default", nil) || ns.Applies("other", nil) {
		t.Error("namespace policy scope")
	}
	if sel.Applies("default", nil) || !sel.Applies("default", []string{"default/s"}) {
		t.Error("selector policy applies only where named")
	}
}
