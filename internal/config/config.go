// Package config reads ztunnel's local configuration (LOCAL_XDS_PATH): the
// workloads, services and policies of the mesh in one YAML file, and turns
// it into a workload.Index. It rejects what it does not understand, and says
// where: file, line, column and field.
package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"strings"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"go.yaml.in/yaml/v3"
)

// File is the YAML document, camelCase as ztunnel writes it.
type File struct {
	Workloads []Workload `yaml:"workloads"`
	Policies  []Policy   `yaml:"policies"`
	Services  []Service  `yaml:"services"`
}

// Workload is one entry of workloads:.
type Workload struct {
	UID                   string                       `yaml:"uid"`
	Name                  string                       `yaml:"name"`
	Namespace             string                       `yaml:"namespace"`
	ServiceAccount        string                       `yaml:"serviceAccount"`
	TrustDomain           string                       `yaml:"trustDomain"`
	WorkloadIPs           []ipAddr                     `yaml:"workloadIps"`
	Protocol              string                       `yaml:"protocol"`
	NetworkMode           string                       `yaml:"networkMode"`
	Node                  string                       `yaml:"node"`
	Network               string                       `yaml:"network"`
	Hostname              string                       `yaml:"hostname"`
	CanonicalName         string                       `yaml:"canonicalName"`
	CanonicalRevision     string                       `yaml:"canonicalRevision"`
	WorkloadName          string                       `yaml:"workloadName"`
	WorkloadType          string                       `yaml:"workloadType"`
	ClusterID             string                       `yaml:"clusterId"`
	Status                string                       `yaml:"status"`
	AuthorizationPolicies []string                     `yaml:"authorizationPolicies"`
	Services              map[string]map[uint16]uint16 `yaml:"services"`
	Capacity              *uint32                      `yaml:"capacity"`
	Locality              *workloadLocality            `yaml:"locality"`
	Waypoint              *unsupported                 `yaml:"waypoint"`
	NetworkGateway        *unsupported                 `yaml:"networkGateway"`
	ApplicationTunnel     *unsupported                 `yaml:"applicationTunnel"`
	NativeTunnel          bool                         `yaml:"nativeTunnel"`
}

type workloadLocality struct {
	Region  string `yaml:"region"`
	Zone    string `yaml:"zone"`
	Subzone string `yaml:"subzone"`
}

// Service is one entry of services:.
type Service struct {
	Name            string            `yaml:"name"`
	Namespace       string            `yaml:"namespace"`
	Hostname        string            `yaml:"hostname"`
	VIPs            []networkAddr     `yaml:"vips"`
	Ports           map[uint16]uint16 `yaml:"ports"`
	SubjectAltNames []string          `yaml:"subjectAltNames"`
	LoadBalancer    *loadBalancer     `yaml:"loadBalancer"`
	IPFamilies      string            `yaml:"ipFamilies"`
	Canonical       bool              `yaml:"canonical"`
	Waypoint        *unsupported      `yaml:"waypoint"`
}

type loadBalancer struct {
	RoutingPreferences []string `yaml:"routingPreferences"`
	Mode               string   `yaml:"mode"`
	HealthPolicy       string   `yaml:"healthPolicy"`
}

// Policy is one entry of policies:; rules are rules > clauses > matches.
type Policy struct {
	Name      string      `yaml:"name"`
	Namespace string      `yaml:"namespace"`
	Scope     string      `yaml:"scope"`
	Action    string      `yaml:"action"`
	Rules     [][][]match `yaml:"rules"`
	DryRun    bool        `yaml:"dryRun"`
}

type match struct {
	Namespaces          []stringMatch `yaml:"namespaces"`
	NotNamespaces       []stringMatch `yaml:"notNamespaces"`
	ServiceAccounts     []saMatch     `yaml:"serviceAccounts"`
	NotServiceAccounts  []saMatch     `yaml:"notServiceAccounts"`
	Principals          []stringMatch `yaml:"principals"`
	NotPrincipals       []stringMatch `yaml:"notPrincipals"`
	SourceIPs           []prefix      `yaml:"sourceIps"`
	NotSourceIPs        []prefix      `yaml:"notSourceIps"`
	DestinationIPs      []prefix      `yaml:"destinationIps"`
	NotDestinationIPs   []prefix      `yaml:"notDestinationIps"`
	DestinationPorts    []uint16      `yaml:"destinationPorts"`
	NotDestinationPorts []uint16      `yaml:"notDestinationPorts"`
}

type saMatch struct {
	Namespace      string `yaml:"namespace"`
	ServiceAccount string `yaml:"serviceAccount"`
}

// ipAddr is an IP address written as a string.
type ipAddr struct{ netip.Addr }

func (a *ipAddr) decodeNode(n *yaml.Node) error {
	ip, err := netip.ParseAddr(n.Value)
	if n.Kind != yaml.ScalarNode || err != nil || ip.Zone() != "" {
		return fmt.Errorf("%q is not an IP address", n.Value)
	}
	a.Addr = ip.Unmap()
	return nil
}

// networkAddr is "network/ip".
type networkAddr struct{ workload.NetworkAddr }

func (a *networkAddr) decodeNode(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want \"network/ip\", got %s", describe(n))
	}
	na, err := workload.ParseNetworkAddr(n.Value)
	a.NetworkAddr = na
	return err
}

// prefix is a CIDR or a single IP (a /32 or /128).
type prefix struct{ netip.Prefix }

func (p *prefix) decodeNode(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want an IP or CIDR, got %s", describe(n))
	}
	if pf, err := netip.ParsePrefix(n.Value); err == nil {
		p.Prefix = pf.Masked()
		return nil
	}
	ip, err := netip.ParseAddr(n.Value)
	if err != nil {
		return fmt.Errorf("%q is not an IP address or CIDR", n.Value)
	}
	p.Prefix = netip.PrefixFrom(ip, ip.BitLen())
	return nil
}

// stringMatch is ztunnel's tagged form (!Exact "x", !Prefix "x", !Suffix
// "x", !Presence) or the map form ({Exact: "x"}).
type stringMatch struct{ authz.StringMatch }

func (s *stringMatch) decodeNode(n *yaml.Node) error {
	kind, val := "", n
	switch {
	case strings.HasPrefix(n.Tag, "!") && !strings.HasPrefix(n.Tag, "!!"):
		kind = n.Tag[1:]
	case n.Kind == yaml.MappingNode && len(n.Content) == 2:
		kind, val = n.Content[0].Value, n.Content[1]
	default:
		return fmt.Errorf("want a string match such as !Exact \"value\", !Prefix, !Suffix or !Presence")
	}
	switch authz.MatchKind(kind) {
	case authz.Exact, authz.Prefix, authz.Suffix:
		if val.Kind != yaml.ScalarNode {
			return fmt.Errorf("!%s takes a string", kind)
		}
		s.StringMatch = authz.StringMatch{Kind: authz.MatchKind(kind), Value: val.Value}
	case authz.Presence:
		s.StringMatch = authz.StringMatch{Kind: authz.Presence}
	default:
		return fmt.Errorf("unknown string match %q (want Exact, Prefix, Suffix or Presence)", kind)
	}
	return nil
}

// unsupported marks ztunnel fields Ambit does not implement yet: present,
// they are an error rather than silently ignored.
type unsupported struct{}

func (u *unsupported) decodeNode(n *yaml.Node) error {
	if isNull(n) {
		return nil
	}
	return errors.New("not supported by Ambit yet")
}

// Load reads and checks a config file and builds its index.
func Load(path string) (*workload.Index, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse checks a config document (name is used in errors) and builds its index.
func Parse(name string, data []byte) (*workload.Index, error) {
	doc, err := parseDocument(name, data)
	if err != nil {
		return nil, err
	}
	if doc == nil {
		return workload.Empty(), nil // an empty file is an empty mesh
	}
	var f File
	d := &decoder{file: name}
	if err := d.decode(doc, reflect.ValueOf(&f).Elem(), ""); err != nil {
		return nil, err
	}
	c := converter{d: d, doc: doc}
	ix, err := c.build(&f)
	if err != nil {
		return nil, err
	}
	return ix, nil
}

// converter turns the decoded file into index types, pointing errors at
// the node they came from.
type converter struct {
	d   *decoder
	doc *yaml.Node
}

// at finds the node of list[item].field (or list[item]) for an error.
func (c *converter) at(list string, item int, field string) (*yaml.Node, string) {
	path := fmt.Sprintf("%s[%d]", list, item)
	n := child(c.doc, list)
	if n == nil || n.Kind != yaml.SequenceNode || item >= len(n.Content) {
		return c.doc, path
	}
	n = n.Content[item]
	if field == "" {
		return n, path
	}
	path += "." + field
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == field {
			return n.Content[i+1], path
		}
	}
	return n, path
}

func child(m *yaml.Node, key string) *yaml.Node {
	for i := 0; m.Kind == yaml.MappingNode && i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

func (c *converter) errorf(list string, item int, field, format string, args ...any) error {
	n, path := c.at(list, item, field)
	return c.d.errorf(n, path, format, args...)
}

func oneOf[T ~string](v string, def T, allowed ...T) (T, error) {
	if v == "" {
		return def, nil
	}
	for _, a := range allowed {
		if string(a) == v {
			return a, nil
		}
	}
	names := make([]string, len(allowed))
	for i, a := range allowed {
		names[i] = string(a)
	}
	return "", fmt.Errorf("%q is not one of %s", v, strings.Join(names, ", "))
}

func (c *converter) build(f *File) (*workload.Index, error) {
	var ws []*workload.Workload
	for i := range f.Workloads {
		w, err := c.workload(i, &f.Workloads[i])
		if err != nil {
			return nil, err
		}
		ws = append(ws, w)
	}
	var ss []*workload.Service
	for i := range f.Services {
		s, err := c.service(i, &f.Services[i])
		if err != nil {
			return nil, err
		}
		ss = append(ss, s)
	}
	var ps []*authz.Policy
	for i := range f.Policies {
		p, err := c.policy(i, &f.Policies[i])
		if err != nil {
			return nil, err
		}
		ps = append(ps, p)
	}
	ix, err := workload.NewIndex(ws, ss, ps)
	var ie *workload.IndexError
	if errors.As(err, &ie) {
		return nil, c.errorf(ie.Kind+"s", ie.Item, ie.Field, "%s", ie.Msg)
	}
	return ix, err
}

func (c *converter) workload(i int, in *Workload) (*workload.Workload, error) {
	const list = "workloads"
	if in.Name == "" {
		return nil, c.errorf(list, i, "name", "required")
	}
	if in.Namespace == "" {
		return nil, c.errorf(list, i, "namespace", "required")
	}
	if len(in.WorkloadIPs) == 0 {
		return nil, c.errorf(list, i, "workloadIps", "required: at least one IP")
	}
	w := &workload.Workload{
		UID: in.UID, Name: in.Name, Namespace: in.Namespace,
		ServiceAccount: in.ServiceAccount, TrustDomain: in.TrustDomain,
		Node: in.Node, Network: in.Network, Hostname: in.Hostname,
		CanonicalName: in.CanonicalName, CanonicalRevision: in.CanonicalRevision,
		WorkloadName: in.WorkloadName, WorkloadType: in.WorkloadType, ClusterID: in.ClusterID,
		AuthorizationPolicies: in.AuthorizationPolicies, Capacity: 1,
	}
	// ztunnel's defaults for what Istio's control plane leaves empty.
	if w.UID == "" {
		w.UID = "Kubernetes//Pod/" + in.Namespace + "/" + in.Name
	}
	w.FillDefaults()
	if _, err := identity.New(w.TrustDomain, w.Namespace, w.ServiceAccount); err != nil {
		return nil, c.errorf(list, i, "serviceAccount", "the workload's identity is not valid: %v", err)
	}
	for _, ip := range in.WorkloadIPs {
		w.IPs = append(w.IPs, ip.Addr)
	}
	var err error
	if w.Protocol, err = oneOf(in.Protocol, workload.ProtocolTCP, workload.ProtocolTCP, workload.ProtocolHBONE); err != nil {
		return nil, c.errorf(list, i, "protocol", "%v", err)
	}
	if w.Status, err = oneOf(in.Status, workload.Healthy, workload.Healthy, workload.Unhealthy); err != nil {
		return nil, c.errorf(list, i, "status", "%v", err)
	}
	if _, err := oneOf(in.NetworkMode, "Standard", "Standard", "HostNetwork"); err != nil {
		return nil, c.errorf(list, i, "networkMode", "%v", err)
	}
	if in.Capacity != nil {
		w.Capacity = *in.Capacity
	}
	if in.Locality != nil {
		w.Locality = workload.Locality{Region: in.Locality.Region, Zone: in.Locality.Zone, Subzone: in.Locality.Subzone}
	}
	for _, key := range in.AuthorizationPolicies {
		if ns, name, ok := strings.Cut(key, "/"); !ok || ns == "" || name == "" {
			return nil, c.errorf(list, i, "authorizationPolicies", "%q: want namespace/name", key)
		}
	}
	if len(in.Services) > 0 {
		w.Services = map[workload.NamespacedHost]map[uint16]uint16{}
		for key, ports := range in.Services {
			nh, err := workload.ParseNamespacedHost(key)
			if err != nil {
				return nil, c.errorf(list, i, "services", "%v", err)
			}
			w.Services[nh] = ports
		}
	}
	return w, nil
}

func (c *converter) service(i int, in *Service) (*workload.Service, error) {
	const list = "services"
	for _, f := range []struct{ name, v string }{{"name", in.Name}, {"namespace", in.Namespace}, {"hostname", in.Hostname}} {
		if f.v == "" {
			return nil, c.errorf(list, i, f.name, "required")
		}
	}
	s := &workload.Service{
		Name: in.Name, Namespace: in.Namespace, Hostname: in.Hostname,
		Ports: in.Ports, SubjectAltNames: in.SubjectAltNames,
	}
	if s.Ports == nil {
		s.Ports = map[uint16]uint16{}
	}
	for p := range s.Ports {
		if p == 0 {
			return nil, c.errorf(list, i, "ports", "service port 0")
		}
	}
	for _, v := range in.VIPs {
		s.VIPs = append(s.VIPs, v.NetworkAddr)
	}
	for _, san := range in.SubjectAltNames {
		if _, err := identity.Parse(san); err != nil {
			return nil, c.errorf(list, i, "subjectAltNames", "%v", err)
		}
	}
	if _, err := oneOf(in.IPFamilies, "Automatic", "Automatic", "IPv4Only", "IPv6Only", "Dual"); err != nil {
		return nil, c.errorf(list, i, "ipFamilies", "%v", err)
	}
	if lb := in.LoadBalancer; lb != nil {
		out := &workload.LoadBalancer{}
		var err error
		if out.Mode, err = oneOf(lb.Mode, workload.LBStandard, workload.LBStandard, workload.LBStrict, workload.LBFailover); err != nil {
			return nil, c.errorf(list, i, "loadBalancer", "mode: %v", err)
		}
		if out.HealthPolicy, err = oneOf(lb.HealthPolicy, workload.OnlyHealthy, workload.OnlyHealthy, workload.AllowAll); err != nil {
			return nil, c.errorf(list, i, "loadBalancer", "healthPolicy: %v", err)
		}
		for _, r := range lb.RoutingPreferences {
			sc, err := oneOf(r, "", workload.ScopeRegion, workload.ScopeZone, workload.ScopeSubzone, workload.ScopeNode, workload.ScopeCluster, workload.ScopeNetwork)
			if err != nil || sc == "" {
				return nil, c.errorf(list, i, "loadBalancer", "routingPreferences: %q is not a scope", r)
			}
			out.RoutingPreferences = append(out.RoutingPreferences, sc)
		}
		s.LoadBalancer = out
	}
	return s, nil
}

func (c *converter) policy(i int, in *Policy) (*authz.Policy, error) {
	const list = "policies"
	if in.Name == "" {
		return nil, c.errorf(list, i, "name", "required")
	}
	if in.Namespace == "" {
		return nil, c.errorf(list, i, "namespace", "required")
	}
	p := &authz.Policy{Name: in.Name, Namespace: in.Namespace, DryRun: in.DryRun}
	var err error
	if p.Scope, err = oneOf[authz.Scope](in.Scope, "", authz.ScopeGlobal, authz.ScopeNamespace, authz.ScopeWorkloadSelector); err != nil || p.Scope == "" {
		return nil, c.errorf(list, i, "scope", "%s", orRequired(err))
	}
	if p.Action, err = oneOf[authz.Action](in.Action, "", authz.ActionAllow, authz.ActionDeny); err != nil || p.Action == "" {
		return nil, c.errorf(list, i, "action", "%s", orRequired(err))
	}
	for _, rule := range in.Rules {
		var r [][]authz.Match
		for _, clause := range rule {
			var cl []authz.Match
			for _, m := range clause {
				cl = append(cl, m.toAuthz())
			}
			r = append(r, cl)
		}
		p.Rules = append(p.Rules, r)
	}
	return p, nil
}

func orRequired(err error) string {
	if err == nil {
		return "required"
	}
	return err.Error()
}

func (m match) toAuthz() authz.Match {
	sm := func(in []stringMatch) []authz.StringMatch {
		var out []authz.StringMatch
		for _, s := range in {
			out = append(out, s.StringMatch)
		}
		return out
	}
	sa := func(in []saMatch) []authz.ServiceAccountMatch {
		var out []authz.ServiceAccountMatch
		for _, s := range in {
			out = append(out, authz.ServiceAccountMatch{Namespace: s.Namespace, ServiceAccount: s.ServiceAccount})
		}
		return out
	}
	pf := func(in []prefix) []netip.Prefix {
		var out []netip.Prefix
		for _, p := range in {
			out = append(out, p.Prefix)
		}
		return out
	}
	return authz.Match{
		Namespaces: sm(m.Namespaces), NotNamespaces: sm(m.NotNamespaces),
		ServiceAccounts: sa(m.ServiceAccounts), NotServiceAccounts: sa(m.NotServiceAccounts),
		Principals: sm(m.Principals), NotPrincipals: sm(m.NotPrincipals),
		SourceIPs: pf(m.SourceIPs), NotSourceIPs: pf(m.NotSourceIPs),
		DestinationIPs: pf(m.DestinationIPs), NotDestinationIPs: pf(m.NotDestinationIPs),
		DestinationPorts: m.DestinationPorts, NotDestinationPorts: m.NotDestinationPorts,
	}
}
