package kubesource

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/workload"
)

// Istio's names for mesh membership and capture.
const (
	// Istio's labels and annotation for ambient (internal/ambient holds
	// them, for the node agent too).
	DataplaneModeLabel    = ambient.DataplaneModeLabel
	RedirectionAnnotation = ambient.RedirectionAnnotation
	// DryRunAnnotation marks an AuthorizationPolicy as dry-run.
	DryRunAnnotation = "istio.io/dry-run"
)

// The Node labels a workload's locality comes from.
const (
	regionLabel  = "topology.kubernetes.io/region"
	zoneLabel    = "topology.kubernetes.io/zone"
	subzoneLabel = "topology.istio.io/subzone"
)

// Options are the cluster's names, as istiod's flags and mesh config give
// them.
type Options struct {
	ClusterID     string // Kubernetes
	TrustDomain   string // cluster.local
	DomainSuffix  string // cluster.local: services are name.ns.svc.SUFFIX
	RootNamespace string // istio-system: its selector-less policies are mesh-wide
	Network       string // the cluster's network, "" for none
}

func (o *Options) fill() {
	if o.ClusterID == "" {
		o.ClusterID = "Kubernetes"
	}
	if o.TrustDomain == "" {
		o.TrustDomain = "cluster.local"
	}
	if o.DomainSuffix == "" {
		o.DomainSuffix = "cluster.local"
	}
	if o.RootNamespace == "" {
		o.RootNamespace = "istio-system"
	}
}

// State is the objects a view is built from, as the informers hold them.
type State struct {
	Namespaces     []*kube.Namespace
	Nodes          []*kube.Node
	Pods           []*kube.Pod
	Services       []*kube.Service
	EndpointSlices []*kube.EndpointSlice
	Policies       []*kube.AuthorizationPolicy
}

// Skip is an object left out of a view, or (Kept) in it only in part,
// and why.
type Skip struct {
	Kind, Key string
	Reason    string
	Kept      bool
}

func (s Skip) String() string { return fmt.Sprintf("%s %s: %s", s.Kind, s.Key, s.Reason) }

// Translate builds the mesh from the cluster's objects, as istiod's ambient
// index does for ztunnel: a workload per running pod with an address (the
// host-network ones excepted: their address is the node's), a service per
// Service with a cluster IP or none (headless), a policy per
// AuthorizationPolicy ztunnel can enforce. What cannot be translated is
// skipped and reported; it never fails the rest. The result fits together:
// what NewIndex would refuse (two pods claiming one address, ...) is skipped
// too, so the index is built from what is left.
func Translate(st State, o Options) (*workload.Index, []Skip) {
	o.fill()
	t := translator{o: o, st: st}
	t.index()
	policies := t.policies()
	services := t.services()
	workloads := t.workloads()
	ix, more := build(workloads, services, policies)
	return ix, append(t.skips, more...)
}

type translator struct {
	o     Options
	st    State
	skips []Skip

	namespaces map[string]*kube.Namespace
	nodes      map[string]*kube.Node
	svcByKey   map[string]*kube.Service // by ns/name
	// endpoints: pod ns/name → the services it serves ("ns/name" keys).
	endpoints map[string][]string
	selectors []*kube.AuthorizationPolicy // selector policies that translated
}

func (t *translator) skip(kind, key, format string, args ...any) {
	t.skips = append(t.skips, Skip{Kind: kind, Key: key, Reason: fmt.Sprintf(format, args...)})
}

func (t *translator) index() {
	t.namespaces = map[string]*kube.Namespace{}
	for _, n := range t.st.Namespaces {
		t.namespaces[n.Metadata.Name] = n
	}
	t.nodes = map[string]*kube.Node{}
	for _, n := range t.st.Nodes {
		t.nodes[n.Metadata.Name] = n
	}
	t.svcByKey = map[string]*kube.Service{}
	for _, s := range t.st.Services {
		t.svcByKey[s.Metadata.Key()] = s
	}
	t.endpoints = map[string][]string{}
	for _, es := range t.st.EndpointSlices {
		svc := es.Metadata.Labels["kubernetes.io/service-name"]
		if svc == "" {
			continue // not a Service's slice
		}
		key := es.Metadata.Namespace + "/" + svc
		for _, ep := range es.Endpoints {
			// Serving, as Kubernetes reads it: unset is true. A pod that
			// is serving but not ready is still an endpoint; its workload
			// is Unhealthy and load balancing skips it.
			if ep.Conditions.Serving != nil && !*ep.Conditions.Serving {
				continue
			}
			if ep.Conditions.Serving == nil && ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
				continue
			}
			ns := ep.TargetRef.Namespace
			if ns == "" {
				ns = es.Metadata.Namespace
			}
			pod := ns + "/" + ep.TargetRef.Name
			if !slices.Contains(t.endpoints[pod], key) {
				t.endpoints[pod] = append(t.endpoints[pod], key)
			}
		}
	}
}

// InMesh is Istio's membership rule: the pod's label, else its namespace's.
func InMesh(ns *kube.Namespace, pod *kube.Pod) bool {
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Metadata.Labels
	}
	return ambient.InMesh(nsLabels, pod.Metadata.Labels)
}

// UID is a pod's workload uid: <cluster>//Pod/<ns>/<name>.
func UID(clusterID, ns, name string) string { return ambient.PodWorkloadUID(clusterID, ns, name) }

func (t *translator) workloads() []*workload.Workload {
	pods := slices.Clone(t.st.Pods)
	sort.Slice(pods, func(a, b int) bool { return pods[a].Metadata.Key() < pods[b].Metadata.Key() })
	var out []*workload.Workload
	for _, p := range pods {
		if w := t.workload(p); w != nil {
			out = append(out, w)
		}
	}
	return out
}

func (t *translator) workload(p *kube.Pod) *workload.Workload {
	key := p.Metadata.Key()
	if p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed" {
		return nil // its address may be another pod's already
	}
	if p.Spec.HostNetwork {
		return nil // the node's address, not the pod's: not capturable
	}
	ips, err := podIPs(p)
	if err != nil {
		t.skip("Pod", key, "%v", err)
		return nil
	}
	if len(ips) == 0 {
		return nil // not started yet: it comes with its address
	}
	w := &workload.Workload{
		UID:            UID(t.o.ClusterID, p.Metadata.Namespace, p.Metadata.Name),
		Name:           p.Metadata.Name,
		Namespace:      p.Metadata.Namespace,
		ServiceAccount: p.Spec.ServiceAccountName,
		TrustDomain:    t.o.TrustDomain,
		IPs:            ips,
		Protocol:       workload.ProtocolTCP,
		Node:           p.Spec.NodeName,
		Network:        t.o.Network,
		ClusterID:      t.o.ClusterID,
		WorkloadName:   workloadName(p),
		WorkloadType:   "pod", // what istiod sends for every pod
		Status:         workload.Unhealthy,
		Capacity:       1,
	}
	w.CanonicalName = firstLabel(p.Metadata.Labels, w.WorkloadName, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
	w.CanonicalRevision = firstLabel(p.Metadata.Labels, "latest", "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
	if podReady(p) && p.Metadata.DeletionTimestamp == nil {
		w.Status = workload.Healthy
	}
	if p.Metadata.Annotations[RedirectionAnnotation] == "enabled" && InMesh(t.namespaces[p.Metadata.Namespace], p) {
		w.Protocol = workload.ProtocolHBONE
	}
	if n := t.nodes[p.Spec.NodeName]; n != nil {
		w.Locality = workload.Locality{Region: n.Metadata.Labels[regionLabel], Zone: n.Metadata.Labels[zoneLabel], Subzone: n.Metadata.Labels[subzoneLabel]}
	}
	for _, pol := range t.selectors {
		if (pol.Metadata.Namespace == p.Metadata.Namespace || pol.Metadata.Namespace == t.o.RootNamespace) && selects(pol.Spec.Selector.MatchLabels, p.Metadata.Labels) {
			w.AuthorizationPolicies = append(w.AuthorizationPolicies, pol.Metadata.Key())
		}
	}
	sort.Strings(w.AuthorizationPolicies)
	for _, skey := range t.endpoints[key] {
		svc := t.svcByKey[skey]
		if svc == nil || !t.translatable(svc) {
			continue
		}
		ports := map[uint16]uint16{}
		for _, sp := range svc.Spec.Ports {
			port, target, ok := portOf(sp)
			if !ok {
				continue
			}
			if sp.TargetPort.Str != "" {
				if target, ok = findPort(p, sp.TargetPort.Str); !ok {
					continue // this pod does not serve that port, as istiod reads it
				}
			}
			ports[port] = target
		}
		if w.Services == nil {
			w.Services = map[workload.NamespacedHost]map[uint16]uint16{}
		}
		w.Services[workload.NamespacedHost{Namespace: svc.Metadata.Namespace, Hostname: t.hostname(svc)}] = ports
	}
	w.FillDefaults()
	return w
}

func podIPs(p *kube.Pod) ([]netip.Addr, error) {
	raw := make([]string, 0, len(p.Status.PodIPs)+1)
	for _, ip := range p.Status.PodIPs {
		raw = append(raw, ip.IP)
	}
	if len(raw) == 0 && p.Status.PodIP != "" {
		raw = append(raw, p.Status.PodIP)
	}
	var out []netip.Addr
	for _, s := range raw {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("status.podIPs: %q is not an address", s)
		}
		if !slices.Contains(out, a.Unmap()) {
			out = append(out, a.Unmap())
		}
	}
	return out, nil
}

func podReady(p *kube.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == "Ready" {
			return c.Status == "True"
		}
	}
	return false
}

// firstLabel is the value of the first of keys present, else def.
func firstLabel(labels map[string]string, def string, keys ...string) string {
	for _, k := range keys {
		if v, ok := labels[k]; ok {
			return v
		}
	}
	return def
}

// jobSuffix is the time a CronJob's Jobs carry: name-<minutes since epoch>.
var jobSuffix = regexp.MustCompile(`-\d+$`)

// workloadName is the pod's controller, as istiod names it: a
// Deployment's name (its ReplicaSet's less the template hash), a CronJob's
// (its Job's less the schedule suffix), another controller's, or the pod.
func workloadName(p *kube.Pod) string {
	for _, o := range p.Metadata.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		switch o.Kind {
		case "ReplicaSet":
			if h := p.Metadata.Labels["pod-template-hash"]; h != "" {
				if n, ok := strings.CutSuffix(o.Name, "-"+h); ok {
					return n
				}
			}
		case "Job":
			if _, cron := p.Metadata.Labels["batch.kubernetes.io/cronjob-name"]; cron {
				return jobSuffix.ReplaceAllString(o.Name, "")
			}
		}
		return o.Name
	}
	return p.Metadata.Name
}

// findPort resolves a named targetPort against the pod's containers.
func findPort(p *kube.Pod, name string) (uint16, bool) {
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == name && tcp(cp.Protocol) && cp.ContainerPort > 0 && cp.ContainerPort < 65536 {
				return uint16(cp.ContainerPort), true
			}
		}
	}
	return 0, false
}

// portOf reads a service port the mesh carries (TCP, in range): the port
// and its target, 0 for a named targetPort (each endpoint's own, resolved
// per pod); an unset target is the port itself.
func portOf(sp kube.ServicePort) (port, target uint16, ok bool) {
	if !tcp(sp.Protocol) || sp.Port <= 0 || sp.Port > 65535 {
		return 0, 0, false
	}
	if sp.TargetPort.Str != "" {
		return uint16(sp.Port), 0, true
	}
	t := sp.TargetPort.Int
	if t == 0 {
		t = sp.Port
	}
	if t < 0 || t > 65535 {
		return 0, 0, false
	}
	return uint16(sp.Port), uint16(t), true
}

// tcp: the mesh carries TCP only (unset means TCP).
func tcp(proto string) bool { return proto == "" || proto == "TCP" }

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if l, ok := labels[k]; !ok || l != v {
			return false
		}
	}
	return true
}

func (t *translator) hostname(s *kube.Service) string {
	return s.Metadata.Name + "." + s.Metadata.Namespace + ".svc." + t.o.DomainSuffix
}

// translatable: an ExternalName service is a DNS alias, not addresses the
// mesh can route; istiod leaves it to DNS too.
func (t *translator) translatable(s *kube.Service) bool {
	return s.Spec.Type != "ExternalName"
}

func (t *translator) services() []*workload.Service {
	svcs := slices.Clone(t.st.Services)
	sort.Slice(svcs, func(a, b int) bool { return svcs[a].Metadata.Key() < svcs[b].Metadata.Key() })
	var out []*workload.Service
	for _, s := range svcs {
		if !t.translatable(s) {
			continue
		}
		key := s.Metadata.Key()
		ws := &workload.Service{
			Name:      s.Metadata.Name,
			Namespace: s.Metadata.Namespace,
			Hostname:  t.hostname(s),
			Ports:     map[uint16]uint16{},
		}
		ips := s.Spec.ClusterIPs
		if len(ips) == 0 && s.Spec.ClusterIP != "" {
			ips = []string{s.Spec.ClusterIP}
		}
		bad := false
		for _, ip := range ips {
			if ip == "None" || ip == "" {
				continue // headless: endpoints only
			}
			a, err := netip.ParseAddr(ip)
			if err != nil {
				t.skip("Service", key, "spec.clusterIPs: %q is not an address", ip)
				bad = true
				break
			}
			ws.VIPs = append(ws.VIPs, workload.NetworkAddr{Network: t.o.Network, IP: a.Unmap()})
		}
		if bad {
			continue
		}
		for _, p := range s.Spec.Ports {
			if port, target, ok := portOf(p); ok {
				ws.Ports[port] = target
			}
		}
		if td := s.Spec.TrafficDistribution; td != nil {
			switch *td {
			case "PreferClose", "PreferSameZone":
				ws.LoadBalancer = &workload.LoadBalancer{Mode: workload.LBFailover, RoutingPreferences: []workload.Scope{workload.ScopeNetwork, workload.ScopeRegion, workload.ScopeZone}}
			case "PreferSameNode":
				ws.LoadBalancer = &workload.LoadBalancer{Mode: workload.LBFailover, RoutingPreferences: []workload.Scope{workload.ScopeNetwork, workload.ScopeRegion, workload.ScopeZone, workload.ScopeSubzone, workload.ScopeNode}}
			}
		}
		out = append(out, ws)
	}
	return out
}

// build makes the index, leaving out each item NewIndex refuses (a second
// pod on an address, a VIP two services claim) until the rest fits.
func build(workloads []*workload.Workload, services []*workload.Service, policies []*authz.Policy) (*workload.Index, []Skip) {
	var skips []Skip
	for {
		ix, err := workload.NewIndex(workloads, services, policies, workload.AllowDangling())
		if err == nil {
			return ix, skips
		}
		ie, ok := err.(*workload.IndexError)
		if !ok {
			return workload.Empty(), append(skips, Skip{Kind: "index", Reason: err.Error()})
		}
		switch ie.Kind {
		case "workload":
			w := workloads[ie.Item]
			skips = append(skips, Skip{Kind: "Pod", Key: w.Namespace + "/" + w.Name, Reason: ie.Field + ": " + ie.Msg})
			workloads = slices.Delete(slices.Clone(workloads), ie.Item, ie.Item+1)
		case "service":
			s := services[ie.Item]
			skips = append(skips, Skip{Kind: "Service", Key: s.Namespace + "/" + s.Name, Reason: ie.Field + ": " + ie.Msg})
			services = slices.Delete(slices.Clone(services), ie.Item, ie.Item+1)
		case "policy":
			p := policies[ie.Item]
			skips = append(skips, Skip{Kind: "AuthorizationPolicy", Key: p.Key(), Reason: ie.Field + ": " + ie.Msg})
			policies = slices.Delete(slices.Clone(policies), ie.Item, ie.Item+1)
		default:
			return workload.Empty(), append(skips, Skip{Kind: "index", Reason: err.Error()})
		}
	}
}
