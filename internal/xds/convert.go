// Package xds carries the mesh over Istio's ambient xDS: workloads and
// services as type.googleapis.com/istio.workload.Address, policies as
// type.googleapis.com/istio.security.Authorization, in Istio's own
// generated types. This file maps them to and from Ambit's index types.
package xds

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
)

// Type URLs of the two resource types.
const (
	AddressType       = "type.googleapis.com/istio.workload.Address"
	AuthorizationType = "type.googleapis.com/istio.security.Authorization"
)

// Resource names: a workload by UID, a service by namespace/hostname, a
// policy by namespace/name.
func WorkloadName(w *workload.Workload) string { return w.UID }
func ServiceName(s *workload.Service) string   { return s.Key().String() }
func PolicyName(p *authz.Policy) string        { return p.Key() }

// WorkloadToProto renders a workload as an Address resource.
func WorkloadToProto(w *workload.Workload) *wapi.Address {
	p := &wapi.Workload{
		Uid: w.UID, Name: w.Name, Namespace: w.Namespace, Hostname: w.Hostname, Network: w.Network,
		TrustDomain: w.TrustDomain, ServiceAccount: w.ServiceAccount, Node: w.Node,
		CanonicalName: w.CanonicalName, CanonicalRevision: w.CanonicalRevision, WorkloadName: w.WorkloadName,
		AuthorizationPolicies: w.AuthorizationPolicies, ClusterId: w.ClusterID,
		Capacity: wrapperspb.UInt32(w.Capacity),
	}
	for _, ip := range w.IPs {
		p.Addresses = append(p.Addresses, ip.AsSlice())
	}
	if w.Protocol == workload.ProtocolHBONE {
		p.TunnelProtocol = wapi.TunnelProtocol_HBONE
	}
	if w.Status == workload.Unhealthy {
		p.Status = wapi.WorkloadStatus_UNHEALTHY
	}
	if v, ok := wapi.WorkloadType_value[strings.ToUpper(w.WorkloadType)]; ok {
		p.WorkloadType = wapi.WorkloadType(v)
	}
	if w.Locality != (workload.Locality{}) {
		p.Locality = &wapi.Locality{Region: w.Locality.Region, Zone: w.Locality.Zone, Subzone: w.Locality.Subzone}
	}
	if len(w.Services) > 0 {
		p.Services = map[string]*wapi.PortList{}
		for key, ports := range w.Services {
			pl := &wapi.PortList{}
			pl.Ports = portsToProto(ports)
			p.Services[key.String()] = pl
		}
	}
	return &wapi.Address{Type: &wapi.Address_Workload{Workload: p}}
}

// WorkloadFromProto reads a Workload resource, filling what Istio leaves
// empty with ztunnel's defaults.
func WorkloadFromProto(p *wapi.Workload) (*workload.Workload, error) {
	if p.GetUid() == "" {
		return nil, errors.New("workload: empty uid")
	}
	w := &workload.Workload{
		UID: p.Uid, Name: p.Name, Namespace: p.Namespace, Hostname: p.Hostname, Network: p.Network,
		TrustDomain: p.TrustDomain, ServiceAccount: p.ServiceAccount, Node: p.Node,
		CanonicalName: p.CanonicalName, CanonicalRevision: p.CanonicalRevision, WorkloadName: p.WorkloadName,
		AuthorizationPolicies: p.AuthorizationPolicies, ClusterID: p.ClusterId,
		Protocol: workload.ProtocolTCP, Status: workload.Healthy, Capacity: 1,
		WorkloadType: strings.ToLower(p.WorkloadType.String()),
	}
	w.FillDefaults()
	if p.Capacity != nil {
		w.Capacity = p.Capacity.Value
	}
	for i, b := range p.Addresses {
		ip, ok := netip.AddrFromSlice(b)
		if !ok {
			return nil, fmt.Errorf("workload %s: address %d is %d bytes, want 4 or 16", p.Uid, i, len(b))
		}
		w.IPs = append(w.IPs, ip.Unmap())
	}
	// What Ambit cannot serve yet is kept, marked: the rest of the push
	// is served, and traffic that would need it is refused.
	var needs []string
	switch p.TunnelProtocol {
	case wapi.TunnelProtocol_NONE:
	case wapi.TunnelProtocol_HBONE:
		w.Protocol = workload.ProtocolHBONE
	default:
		needs = append(needs, "tunnel protocol "+p.TunnelProtocol.String())
	}
	if p.Status == wapi.WorkloadStatus_UNHEALTHY {
		w.Status = workload.Unhealthy
	}
	if p.Waypoint != nil {
		needs = append(needs, "a waypoint")
		w.Waypoint = gatewayDest(p.Waypoint)
	}
	if p.NetworkGateway != nil {
		needs = append(needs, "a network gateway")
	}
	if p.ApplicationTunnel != nil {
		needs = append(needs, "an application tunnel")
	}
	w.Unsupported = strings.Join(needs, ", ")
	w.HostNetwork = p.NetworkMode == wapi.NetworkMode_HOST_NETWORK
	if l := p.Locality; l != nil {
		w.Locality = workload.Locality{Region: l.Region, Zone: l.Zone, Subzone: l.Subzone}
	}
	if len(p.Services) > 0 {
		w.Services = map[workload.NamespacedHost]map[uint16]uint16{}
		for key, pl := range p.Services {
			nh, err := workload.ParseNamespacedHost(key)
			if err != nil {
				return nil, fmt.Errorf("workload %s: services: %w", p.Uid, err)
			}
			ports := map[uint16]uint16{}
			for _, port := range pl.GetPorts() {
				if port.ServicePort > 65535 || port.TargetPort > 65535 {
					return nil, fmt.Errorf("workload %s: port %d->%d out of range", p.Uid, port.ServicePort, port.TargetPort)
				}
				ports[uint16(port.ServicePort)] = uint16(port.TargetPort)
			}
			w.Services[nh] = ports
		}
	}
	return w, nil
}

var scopeToProto = map[workload.Scope]wapi.LoadBalancing_Scope{
	workload.ScopeRegion: wapi.LoadBalancing_REGION, workload.ScopeZone: wapi.LoadBalancing_ZONE,
	workload.ScopeSubzone: wapi.LoadBalancing_SUBZONE, workload.ScopeNode: wapi.LoadBalancing_NODE,
	workload.ScopeCluster: wapi.LoadBalancing_CLUSTER, workload.ScopeNetwork: wapi.LoadBalancing_NETWORK,
}

// ServiceToProto renders a service as an Address resource.
func ServiceToProto(s *workload.Service) *wapi.Address {
	p := &wapi.Service{Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname, SubjectAltNames: s.SubjectAltNames}
	for _, v := range s.VIPs {
		p.Addresses = append(p.Addresses, &wapi.NetworkAddress{Network: v.Network, Address: v.IP.AsSlice()})
	}
	p.Ports = portsToProto(s.Ports)
	if lb := s.LoadBalancer; lb != nil {
		p.LoadBalancing = &wapi.LoadBalancing{}
		for _, r := range lb.RoutingPreferences {
			p.LoadBalancing.RoutingPreference = append(p.LoadBalancing.RoutingPreference, scopeToProto[r])
		}
		switch lb.Mode {
		case workload.LBStrict:
			p.LoadBalancing.Mode = wapi.LoadBalancing_STRICT
		case workload.LBFailover:
			p.LoadBalancing.Mode = wapi.LoadBalancing_FAILOVER
		}
		if lb.HealthPolicy == workload.AllowAll {
			p.LoadBalancing.HealthPolicy = wapi.LoadBalancing_ALLOW_ALL
		}
	}
	return &wapi.Address{Type: &wapi.Address_Service{Service: p}}
}

// portsToProto lists ports in service-port order: the same map encodes to
// the same bytes, so its digest (the resource's version) changes only when
// it does, and a push carries only what changed.
func portsToProto(ports map[uint16]uint16) []*wapi.Port {
	out := make([]*wapi.Port, 0, len(ports))
	for sp, tp := range ports {
		out = append(out, &wapi.Port{ServicePort: uint32(sp), TargetPort: uint32(tp)})
	}
	slices.SortFunc(out, func(a, b *wapi.Port) int { return cmp.Compare(a.ServicePort, b.ServicePort) })
	return out
}

// ServiceFromProto reads a Service resource.
func ServiceFromProto(p *wapi.Service) (*workload.Service, error) {
	if p.GetName() == "" || p.GetNamespace() == "" || p.GetHostname() == "" {
		return nil, errors.New("service: name, namespace and hostname are required")
	}
	s := &workload.Service{Name: p.Name, Namespace: p.Namespace, Hostname: p.Hostname, SubjectAltNames: p.SubjectAltNames, Ports: map[uint16]uint16{}}
	var needs []string
	for i, a := range p.Addresses {
		ip, ok := netip.AddrFromSlice(a.Address)
		if !ok {
			return nil, fmt.Errorf("service %s/%s: address %d is %d bytes", p.Namespace, p.Hostname, i, len(a.Address))
		}
		ip = ip.Unmap()
		if a.Length != nil && int(*a.Length) < ip.BitLen() {
			pfx, err := ip.Prefix(int(*a.Length))
			if err != nil {
				return nil, fmt.Errorf("service %s/%s: address %d: /%d: %w", p.Namespace, p.Hostname, i, *a.Length, err)
			}
			s.Prefixes = append(s.Prefixes, workload.NetworkPrefix{Network: a.Network, Prefix: pfx})
			continue
		}
		s.VIPs = append(s.VIPs, workload.NetworkAddr{Network: a.Network, IP: ip})
	}
	if len(s.Prefixes) > 0 {
		needs = append(needs, "CIDR addresses")
	}
	for _, port := range p.Ports {
		if port.ServicePort == 0 || port.ServicePort > 65535 || port.TargetPort > 65535 {
			return nil, fmt.Errorf("service %s/%s: port %d->%d out of range", p.Namespace, p.Hostname, port.ServicePort, port.TargetPort)
		}
		s.Ports[uint16(port.ServicePort)] = uint16(port.TargetPort)
	}
	if p.Waypoint != nil || len(p.WeightedWaypoints) > 0 {
		needs = append(needs, "a waypoint")
		s.Waypoint = gatewayDest(p.Waypoint)
	}
	s.IPFamilies = ipFamilies[p.IpFamilies]

	if lb := p.LoadBalancing; lb != nil {
		out := &workload.LoadBalancer{Mode: workload.LBStandard, HealthPolicy: workload.OnlyHealthy}
		for _, r := range lb.RoutingPreference {
			found := false
			for k, v := range scopeToProto {
				if v == r {
					out.RoutingPreferences, found = append(out.RoutingPreferences, k), true
				}
			}
			if !found {
				needs = append(needs, "routing preference "+r.String())
			}
		}
		switch lb.Mode {
		case wapi.LoadBalancing_UNSPECIFIED_MODE:
		case wapi.LoadBalancing_STRICT:
			out.Mode = workload.LBStrict
		case wapi.LoadBalancing_FAILOVER:
			out.Mode = workload.LBFailover
		default:
			needs = append(needs, lb.Mode.String()+" load balancing")
		}
		if lb.HealthPolicy == wapi.LoadBalancing_ALLOW_ALL {
			out.HealthPolicy = workload.AllowAll
		}
		s.LoadBalancer = out
	}
	s.Unsupported = strings.Join(needs, ", ")
	return s, nil
}

var scopes = map[authz.Scope]sapi.Scope{authz.ScopeGlobal: sapi.Scope_GLOBAL, authz.ScopeNamespace: sapi.Scope_NAMESPACE, authz.ScopeWorkloadSelector: sapi.Scope_WORKLOAD_SELECTOR}

// PolicyToProto renders a policy as an Authorization resource: rules are
// groups, clauses are rules, matches are matches.
func PolicyToProto(p *authz.Policy) *sapi.Authorization {
	out := &sapi.Authorization{Name: p.Name, Namespace: p.Namespace, Scope: scopes[p.Scope], DryRun: p.DryRun}
	if p.Action == authz.ActionDeny {
		out.Action = sapi.Action_DENY
	}
	for _, rule := range p.Rules {
		g := &sapi.Group{}
		for _, clause := range rule {
			r := &sapi.Rules{}
			for _, m := range clause {
				r.Matches = append(r.Matches, matchToProto(m))
			}
			g.Rules = append(g.Rules, r)
		}
		out.Groups = append(out.Groups, g)
	}
	return out
}

// PolicyFromProto reads an Authorization resource.
func PolicyFromProto(p *sapi.Authorization) (*authz.Policy, error) {
	if p.GetName() == "" || p.GetNamespace() == "" {
		return nil, errors.New("authorization: name and namespace are required")
	}
	out := &authz.Policy{Name: p.Name, Namespace: p.Namespace, DryRun: p.DryRun, Action: authz.ActionAllow}
	for k, v := range scopes {
		if v == p.Scope {
			out.Scope = k
		}
	}
	if out.Scope == "" {
		return nil, fmt.Errorf("authorization %s/%s: scope %v", p.Namespace, p.Name, p.Scope)
	}
	switch p.Action {
	case sapi.Action_ALLOW:
	case sapi.Action_DENY:
		out.Action = authz.ActionDeny
	default:
		return nil, fmt.Errorf("authorization %s/%s: action %v is not supported", p.Namespace, p.Name, p.Action)
	}
	for _, g := range p.Groups {
		var rule [][]authz.Match
		for _, r := range g.Rules {
			var clause []authz.Match
			for _, m := range r.Matches {
				am, err := matchFromProto(m)
				if err != nil {
					return nil, fmt.Errorf("authorization %s/%s: %w", p.Namespace, p.Name, err)
				}
				clause = append(clause, am)
			}
			rule = append(rule, clause)
		}
		out.Rules = append(out.Rules, rule)
	}
	return out, nil
}

func matchToProto(m authz.Match) *sapi.Match {
	sm := func(in []authz.StringMatch) []*sapi.StringMatch {
		var out []*sapi.StringMatch
		for _, s := range in {
			x := &sapi.StringMatch{}
			switch s.Kind {
			case authz.Exact:
				x.MatchType = &sapi.StringMatch_Exact{Exact: s.Value}
			case authz.Prefix:
				x.MatchType = &sapi.StringMatch_Prefix{Prefix: s.Value}
			case authz.Suffix:
				x.MatchType = &sapi.StringMatch_Suffix{Suffix: s.Value}
			case authz.Presence:
				x.MatchType = &sapi.StringMatch_Presence{Presence: &emptypb.Empty{}}
			}
			out = append(out, x)
		}
		return out
	}
	sa := func(in []authz.ServiceAccountMatch) []*sapi.ServiceAccountMatch {
		var out []*sapi.ServiceAccountMatch
		for _, s := range in {
			out = append(out, &sapi.ServiceAccountMatch{Namespace: s.Namespace, ServiceAccount: s.ServiceAccount})
		}
		return out
	}
	ad := func(in []netip.Prefix) []*sapi.Address {
		var out []*sapi.Address
		for _, p := range in {
			out = append(out, &sapi.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())})
		}
		return out
	}
	pt := func(in []uint16) []uint32 {
		var out []uint32
		for _, p := range in {
			out = append(out, uint32(p))
		}
		return out
	}
	return &sapi.Match{
		Namespaces: sm(m.Namespaces), NotNamespaces: sm(m.NotNamespaces),
		ServiceAccounts: sa(m.ServiceAccounts), NotServiceAccounts: sa(m.NotServiceAccounts),
		Principals: sm(m.Principals), NotPrincipals: sm(m.NotPrincipals),
		SourceIps: ad(m.SourceIPs), NotSourceIps: ad(m.NotSourceIPs),
		DestinationIps: ad(m.DestinationIPs), NotDestinationIps: ad(m.NotDestinationIPs),
		DestinationPorts: pt(m.DestinationPorts), NotDestinationPorts: pt(m.NotDestinationPorts),
	}
}

func matchFromProto(m *sapi.Match) (authz.Match, error) {
	var err error
	sm := func(in []*sapi.StringMatch) []authz.StringMatch {
		var out []authz.StringMatch
		for _, s := range in {
			switch t := s.GetMatchType().(type) {
			case *sapi.StringMatch_Exact:
				out = append(out, authz.StringMatch{Kind: authz.Exact, Value: t.Exact})
			case *sapi.StringMatch_Prefix:
				out = append(out, authz.StringMatch{Kind: authz.Prefix, Value: t.Prefix})
			case *sapi.StringMatch_Suffix:
				out = append(out, authz.StringMatch{Kind: authz.Suffix, Value: t.Suffix})
			case *sapi.StringMatch_Presence:
				out = append(out, authz.StringMatch{Kind: authz.Presence})
			default:
				err = errors.New("string match with no type")
			}
		}
		return out
	}
	sa := func(in []*sapi.ServiceAccountMatch) []authz.ServiceAccountMatch {
		var out []authz.ServiceAccountMatch
		for _, s := range in {
			out = append(out, authz.ServiceAccountMatch{Namespace: s.Namespace, ServiceAccount: s.ServiceAccount})
		}
		return out
	}
	ad := func(in []*sapi.Address) []netip.Prefix {
		var out []netip.Prefix
		for _, a := range in {
			ip, ok := netip.AddrFromSlice(a.Address)
			if !ok || int(a.Length) > ip.BitLen() {
				err = fmt.Errorf("address of %d bytes /%d", len(a.Address), a.Length)
				continue
			}
			bits := int(a.Length)
			if ip.Is4In6() && bits >= 96 { // an IPv4 prefix written in IPv6 form
				ip, bits = ip.Unmap(), bits-96
			}
			out = append(out, netip.PrefixFrom(ip, bits).Masked())
		}
		return out
	}
	pt := func(in []uint32) []uint16 {
		var out []uint16
		for _, p := range in {
			if p > 65535 {
				err = fmt.Errorf("port %d out of range", p)
				continue
			}
			out = append(out, uint16(p))
		}
		return out
	}
	out := authz.Match{
		Namespaces: sm(m.Namespaces), NotNamespaces: sm(m.NotNamespaces),
		ServiceAccounts: sa(m.ServiceAccounts), NotServiceAccounts: sa(m.NotServiceAccounts),
		Principals: sm(m.Principals), NotPrincipals: sm(m.NotPrincipals),
		SourceIPs: ad(m.SourceIps), NotSourceIPs: ad(m.NotSourceIps),
		DestinationIPs: ad(m.DestinationIps), NotDestinationIPs: ad(m.NotDestinationIps),
		DestinationPorts: pt(m.DestinationPorts), NotDestinationPorts: pt(m.NotDestinationPorts),
	}
	return out, err
}

// ipFamilies spells istiod's IP families as ztunnel's dump does.
var ipFamilies = map[wapi.IPFamilies]string{wapi.IPFamilies_IPV4_ONLY: "IPv4", wapi.IPFamilies_IPV6_ONLY: "IPv6", wapi.IPFamilies_DUAL: "Dual"}

// gatewayDest writes a gateway's destination as ztunnel's dump does:
// "namespace/hostname" or "network/ip" ("" for none or a bad address).
func gatewayDest(g *wapi.GatewayAddress) string {
	if h := g.GetHostname(); h != nil {
		return h.Namespace + "/" + h.Hostname
	}
	if a := g.GetAddress(); a != nil {
		if ip, ok := netip.AddrFromSlice(a.Address); ok {
			return a.Network + "/" + ip.Unmap().String()
		}
	}
	return ""
}
