package kubesource

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/kube"
)

// AuthorizationPolicy → authz.Policy, as istiod converts it for ztunnel
// (pilot/pkg/serviceregistry/ambient/authorization.go).

func (t *translator) policies() []*authz.Policy {
	pols := slices.Clone(t.st.Policies)
	sort.Slice(pols, func(a, b int) bool { return pols[a].Metadata.Key() < pols[b].Metadata.Key() })
	var out []*authz.Policy
	for _, p := range pols {
		ap, err := t.policy(p)
		if err != nil {
			t.skip("AuthorizationPolicy", p.Metadata.Key(), "%v", err)
			continue
		}
		if ap == nil {
			continue
		}
		if ap.Scope == authz.ScopeWorkloadSelector {
			t.selectors = append(t.selectors, p)
		}
		out = append(out, ap)
	}
	return out
}

// policy converts as istiod does for ztunnel: a policy with targetRef(s)
// is a waypoint's (nil, and nothing to report); CUSTOM and AUDIT are
// refused; HTTP attributes make an ALLOW rule match nothing and are
// dropped from a DENY rule, both stricter than asked: the policy is kept,
// reported as partly translated.
func (t *translator) policy(p *kube.AuthorizationPolicy) (*authz.Policy, error) {
	spec := &p.Spec
	if spec.TargetRef != nil || len(spec.TargetRefs) > 0 {
		return nil, nil
	}
	dryRun := false
	if v, ok := p.Metadata.Annotations[DryRunAnnotation]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("annotation %s: %q is not a boolean", DryRunAnnotation, v)
		}
		dryRun = b
	}
	ap := &authz.Policy{Name: p.Metadata.Name, Namespace: p.Metadata.Namespace, DryRun: dryRun}
	switch spec.Action {
	case "", "ALLOW":
		ap.Action = authz.ActionAllow
	case "DENY":
		ap.Action = authz.ActionDeny
	default:
		return nil, fmt.Errorf("spec.action: the node proxy does not enforce %s", spec.Action)
	}
	switch {
	case spec.Selector != nil && len(spec.Selector.MatchLabels) > 0:
		ap.Scope = authz.ScopeWorkloadSelector
	case p.Metadata.Namespace == t.o.RootNamespace:
		ap.Scope = authz.ScopeGlobal
	default:
		ap.Scope = authz.ScopeNamespace
	}
	var l7 []string
	for i, r := range spec.Rules {
		group, found, err := rule(r, p.Metadata.Namespace)
		if err != nil {
			return nil, fmt.Errorf("spec.rules[%d]: %w", i, err)
		}
		l7 = append(l7, found...)
		if len(found) > 0 && ap.Action == authz.ActionAllow {
			continue // an ALLOW rule on HTTP attributes never matches at L4
		}
		ap.Rules = append(ap.Rules, group)
	}
	if len(l7) > 0 {
		slices.Sort(l7)
		t.skips = append(t.skips, Skip{Kind: "AuthorizationPolicy", Key: p.Metadata.Key(), Kept: true,
			Reason: fmt.Sprintf("HTTP attributes (%s) need a waypoint: enforced without them, stricter than written", strings.Join(slices.Compact(l7), ", "))})
	}
	return ap, nil
}

// rule is one rule as clauses that all must hold, each a list of matches
// of which one must: the to's, the from's, and a clause per condition.
func rule(r kube.Rule, ns string) ([][]authz.Match, []string, error) {
	var l7 []string
	var group [][]authz.Match
	if len(r.To) > 0 {
		var to []authz.Match
		for _, op := range r.To {
			o := op.Operation
			l7 = appendSet(l7, field{"hosts", o.Hosts}, field{"notHosts", o.NotHosts}, field{"methods", o.Methods},
				field{"notMethods", o.NotMethods}, field{"paths", o.Paths}, field{"notPaths", o.NotPaths})
			ports, err := parsePorts(o.Ports)
			if err != nil {
				return nil, nil, fmt.Errorf("to.operation.ports: %w", err)
			}
			notPorts, err := parsePorts(o.NotPorts)
			if err != nil {
				return nil, nil, fmt.Errorf("to.operation.notPorts: %w", err)
			}
			to = append(to, authz.Match{DestinationPorts: ports, NotDestinationPorts: notPorts})
		}
		group = append(group, to)
	}
	if len(r.From) > 0 {
		var from []authz.Match
		for _, src := range r.From {
			s := src.Source
			l7 = appendSet(l7, field{"remoteIpBlocks", s.RemoteIPBlocks}, field{"notRemoteIpBlocks", s.NotRemoteIPBlocks},
				field{"requestPrincipals", s.RequestPrincipals}, field{"notRequestPrincipals", s.NotRequestPrincipals})
			ips, err := parsePrefixes(s.IPBlocks)
			if err != nil {
				return nil, nil, fmt.Errorf("from.source.ipBlocks: %w", err)
			}
			notIPs, err := parsePrefixes(s.NotIPBlocks)
			if err != nil {
				return nil, nil, fmt.Errorf("from.source.notIpBlocks: %w", err)
			}
			from = append(from, authz.Match{
				Namespaces: stringMatches(s.Namespaces), NotNamespaces: stringMatches(s.NotNamespaces),
				Principals: stringMatches(s.Principals), NotPrincipals: stringMatches(s.NotPrincipals),
				ServiceAccounts: accountMatches(s.ServiceAccounts, ns), NotServiceAccounts: accountMatches(s.NotServiceAccounts, ns),
				SourceIPs: ips, NotSourceIPs: notIPs,
			})
		}
		group = append(group, from)
	}
	for _, c := range r.When {
		var m authz.Match
		var err error
		switch c.Key {
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = stringMatches(c.Values), stringMatches(c.NotValues)
		case "source.principal":
			m.Principals, m.NotPrincipals = stringMatches(c.Values), stringMatches(c.NotValues)
		case "source.ip":
			if m.SourceIPs, err = parsePrefixes(c.Values); err == nil {
				m.NotSourceIPs, err = parsePrefixes(c.NotValues)
			}
		case "destination.ip":
			if m.DestinationIPs, err = parsePrefixes(c.Values); err == nil {
				m.NotDestinationIPs, err = parsePrefixes(c.NotValues)
			}
		case "destination.port":
			if m.DestinationPorts, err = parsePorts(c.Values); err == nil {
				m.NotDestinationPorts, err = parsePorts(c.NotValues)
			}
		default:
			l7 = append(l7, c.Key)
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("when %s: %w", c.Key, err)
		}
		group = append(group, []authz.Match{m})
	}
	return group, l7, nil
}

// field is a rule's field by its name in the API, with its values.
type field struct {
	name   string
	values []string
}

// appendSet appends the names of the fields that have values: the HTTP
// attributes a rule uses.
func appendSet(names []string, fs ...field) []string {
	for _, f := range fs {
		if len(f.values) > 0 {
			names = append(names, f.name)
		}
	}
	return names
}

// stringMatches reads Istio's forms: "*" any value, "*x" suffix, "x*"
// prefix, else exact.
func stringMatches(in []string) []authz.StringMatch {
	var out []authz.StringMatch
	for _, v := range in {
		switch {
		case v == "*":
			out = append(out, authz.StringMatch{Kind: authz.Presence})
		case strings.HasPrefix(v, "*"):
			out = append(out, authz.StringMatch{Kind: authz.Suffix, Value: v[1:]})
		case strings.HasSuffix(v, "*"):
			out = append(out, authz.StringMatch{Kind: authz.Prefix, Value: v[:len(v)-1]})
		default:
			out = append(out, authz.StringMatch{Kind: authz.Exact, Value: v})
		}
	}
	return out
}

// accountMatches reads "ns/sa", or "sa" in the policy's namespace.
func accountMatches(in []string, ns string) []authz.ServiceAccountMatch {
	var out []authz.ServiceAccountMatch
	for _, v := range in {
		if n, sa, ok := strings.Cut(v, "/"); ok {
			out = append(out, authz.ServiceAccountMatch{Namespace: n, ServiceAccount: sa})
		} else {
			out = append(out, authz.ServiceAccountMatch{Namespace: ns, ServiceAccount: v})
		}
	}
	return out
}

// parsePorts refuses what is not a port: istiod drops such a value, which
// makes an ALLOW wider or a DENY narrower than written; refusing the
// policy keeps the last view's, so it fails closed.
func parsePorts(in []string) ([]uint16, error) {
	var out []uint16
	for _, v := range in {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port", v)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

func parsePrefixes(in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range in {
		if strings.Contains(v, "/") {
			p, err := netip.ParsePrefix(v)
			if err != nil {
				return nil, fmt.Errorf("%q is not an address or CIDR", v)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(v)
		if err != nil {
			return nil, fmt.Errorf("%q is not an address or CIDR", v)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}
