// Package authz evaluates Istio's L4 authorization policies for one
// connection at its destination. It is pure: no I/O, no sockets, no clock;
// the caller gives it the policies that apply and the connection.
package authz

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/ambitmesh/ambit/internal/identity"
)

// Scope says which workloads a policy applies to.
type Scope string

// Scopes as ztunnel's config and Istio's xDS name them.
const (
	ScopeGlobal           Scope = "Global"           // every workload in the mesh
	ScopeNamespace        Scope = "Namespace"        // every workload in the policy's namespace
	ScopeWorkloadSelector Scope = "WorkloadSelector" // the workloads that list it
)

// Action is what a matching policy does.
type Action string

// Actions.
const (
	ActionAllow Action = "Allow"
	ActionDeny  Action = "Deny"
)

// Policy is one authorization policy. Rules are OR'ed; the clauses of a
// rule are AND'ed; the matches of a clause are OR'ed.
type Policy struct {
	Name      string
	Namespace string
	Scope     Scope
	Action    Action
	Rules     [][][]Match
	DryRun    bool
}

// Key is the policy's name as workloads and xDS refer to it: "namespace/name".
func (p *Policy) Key() string { return p.Namespace + "/" + p.Name }

// Match is one set of conditions. Inside a match, different fields are
// AND'ed and the values of one field OR'ed; for a not-field, no value may
// match. An empty Match (no field at all) never matches.
type Match struct {
	Namespaces          []StringMatch
	NotNamespaces       []StringMatch
	ServiceAccounts     []ServiceAccountMatch
	NotServiceAccounts  []ServiceAccountMatch
	Principals          []StringMatch
	NotPrincipals       []StringMatch
	SourceIPs           []netip.Prefix
	NotSourceIPs        []netip.Prefix
	DestinationIPs      []netip.Prefix
	NotDestinationIPs   []netip.Prefix
	DestinationPorts    []uint16
	NotDestinationPorts []uint16
}

// StringMatch is one of Exact, Prefix, Suffix or Presence.
type StringMatch struct {
	Kind  MatchKind
	Value string
}

// MatchKind names the way a StringMatch compares.
type MatchKind string

// Match kinds.
const (
	Exact    MatchKind = "Exact"
	Prefix   MatchKind = "Prefix"
	Suffix   MatchKind = "Suffix"
	Presence MatchKind = "Presence"
)

// Matches reports whether s satisfies the match.
func (m StringMatch) Matches(s string) bool {
	switch m.Kind {
	case Exact:
		return s == m.Value
	case Prefix:
		return strings.HasPrefix(s, m.Value)
	case Suffix:
		return strings.HasSuffix(s, m.Value)
	case Presence:
		return s != ""
	}
	return false
}

func (m StringMatch) String() string {
	if m.Kind == Presence {
		return "Presence"
	}
	return fmt.Sprintf("%s %q", m.Kind, m.Value)
}

// ServiceAccountMatch matches a source identity's namespace and service account.
type ServiceAccountMatch struct {
	Namespace      string
	ServiceAccount string
}

// Conn is what policy sees of a connection.
type Conn struct {
	Source      netip.AddrPort
	Destination netip.AddrPort // the target (pod IP and app port), not 15008
	// SourceID is the peer's verified identity; zero for plaintext
	// connections, which no identity-based rule can match.
	SourceID identity.ID
}

// Decision is the verdict and why.
type Decision struct {
	Allow  bool
	Policy string // "namespace/name" of the deciding policy; "" when no policy decided
	Reason string // for logs
	// DryRun lists dry-run policies that matched; they changed nothing.
	DryRun []string
}

func (d Decision) String() string {
	v := "allow"
	if !d.Allow {
		v = "deny"
	}
	return v + ": " + d.Reason
}

// Evaluate applies Istio's L4 order to the policies that apply to the
// destination: any matching DENY denies; with no ALLOW policy, allow; any
// matching ALLOW allows; else deny. Dry-run policies are evaluated for the
// record only.
func Evaluate(policies []*Policy, c Conn) Decision {
	var d Decision
	var allows []*Policy
	for _, p := range policies {
		if p.DryRun {
			if p.matches(c) {
				d.DryRun = append(d.DryRun, p.Key())
			}
			continue
		}
		switch p.Action {
		case ActionDeny:
			if p.matches(c) {
				d.Allow, d.Policy, d.Reason = false, p.Key(), "denied by DENY policy "+p.Key()
				return d
			}
		case ActionAllow:
			allows = append(allows, p)
		}
	}
	if len(allows) == 0 {
		d.Allow, d.Reason = true, "no ALLOW policy applies"
		return d
	}
	for _, p := range allows {
		if p.matches(c) {
			d.Allow, d.Policy, d.Reason = true, p.Key(), "allowed by "+p.Key()
			return d
		}
	}
	names := make([]string, len(allows))
	for i, p := range allows {
		names[i] = p.Key()
	}
	d.Allow, d.Reason = false, "no ALLOW policy matched ("+strings.Join(names, ", ")+")"
	return d
}

func (p *Policy) matches(c Conn) bool {
	for _, rule := range p.Rules {
		if ruleMatches(rule, c) {
			return true
		}
	}
	return false // no rules: never matches
}

func ruleMatches(rule [][]Match, c Conn) bool {
	for _, clause := range rule {
		if len(clause) == 0 {
			continue // an empty clause does not constrain
		}
		if !slices.ContainsFunc(clause, func(m Match) bool { return m.matches(c) }) {
			return false
		}
	}
	return true
}

func (m *Match) empty() bool {
	return len(m.Namespaces)+len(m.NotNamespaces)+len(m.ServiceAccounts)+len(m.NotServiceAccounts)+
		len(m.Principals)+len(m.NotPrincipals)+len(m.SourceIPs)+len(m.NotSourceIPs)+
		len(m.DestinationIPs)+len(m.NotDestinationIPs)+len(m.DestinationPorts)+len(m.NotDestinationPorts) == 0
}

func (m *Match) matches(c Conn) bool {
	if m.empty() {
		return false
	}
	principal := c.SourceID.Principal() // "" without identity
	ns := c.SourceID.Namespace
	hasID := !c.SourceID.IsZero()
	return field(m.DestinationIPs, m.NotDestinationIPs, func(p netip.Prefix) bool { return p.Contains(c.Destination.Addr()) }) &&
		field(m.SourceIPs, m.NotSourceIPs, func(p netip.Prefix) bool { return p.Contains(c.Source.Addr()) }) &&
		field(m.DestinationPorts, m.NotDestinationPorts, func(p uint16) bool { return p == c.Destination.Port() }) &&
		field(m.ServiceAccounts, m.NotServiceAccounts, func(sa ServiceAccountMatch) bool {
			return hasID && sa.Namespace == c.SourceID.Namespace && sa.ServiceAccount == c.SourceID.ServiceAccount
		}) &&
		// Principals are written without "spiffe://"; no identity matches none.
		field(m.Principals, m.NotPrincipals, func(s StringMatch) bool { return hasID && s.Matches(principal) }) &&
		field(m.Namespaces, m.NotNamespaces, func(s StringMatch) bool { return s.Matches(ns) })
}

// field: some positive value matches (or there is none), and no negative one does.
func field[T any](pos, neg []T, match func(T) bool) bool {
	if len(pos) > 0 && !slices.ContainsFunc(pos, match) {
		return false
	}
	return !slices.ContainsFunc(neg, match)
}

// Applies reports whether p applies to a workload in namespace that names
// the policies in named (its authorizationPolicies, "namespace/name"): the
// global policies, its namespace's, and those it names.
func (p *Policy) Applies(namespace string, named []string) bool {
	switch {
	case p.Scope == ScopeGlobal:
		return true
	case p.Scope == ScopeNamespace && p.Namespace == namespace:
		return true
	}
	return slices.Contains(named, p.Key())
}
