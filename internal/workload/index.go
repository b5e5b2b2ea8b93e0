package workload

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"

	"github.com/ambitmesh/ambit/internal/authz"
)

// Index is an immutable snapshot of the mesh. Updates build a new Index
// and swap it in; readers never lock.
type Index struct {
	workloads []*Workload
	services  []*Service
	policies  []*authz.Policy

	byUID     map[string]*Workload
	byAddr    map[NetworkAddr]*Workload
	byNode    map[string][]*Workload
	byVIP     map[NetworkAddr]*Service
	byHost    map[string][]*Service
	byKey     map[NamespacedHost]*Service
	endpoints map[NamespacedHost][]Endpoint
	byPolicy  map[string]*authz.Policy
	prefixes  []prefixed // services' CIDR addresses, refused
}

type prefixed struct {
	p   NetworkPrefix
	svc *Service
}

// Endpoint is a workload behind a service, with its port mapping.
type Endpoint struct {
	Workload *Workload
	Ports    map[uint16]uint16 // service port → target port, from the workload's side
}

// IndexError says which item of which kind is wrong, so a source can point
// at where it came from (a line in a file, a resource name in xDS).
type IndexError struct {
	Kind  string // "workload", "service" or "policy"
	Item  int    // position in the list given to NewIndex
	Field string // the field at fault, in config spelling
	Msg   string
}

func (e *IndexError) Error() string {
	return fmt.Sprintf("%s %d: %s: %s", e.Kind, e.Item, e.Field, e.Msg)
}

// Option changes how NewIndex judges its input.
type Option func(*options)

type options struct {
	dangling bool
	// overlaps: who keeps an address two workloads (or a VIP two
	// services) claim; nil: an error.
	wrank    func(*Workload) uint64
	srank    func(*Service) uint64
	conflict func(string)
}

// AllowDangling accepts references to policies and services that are not
// (yet) there: over xDS, a workload may arrive before what it names. A
// missing policy then applies to nobody, a missing service has no VIP.
func AllowDangling() Option { return func(o *options) { o.dangling = true } }

// Overlaps accepts addresses claimed twice, as ztunnel does over xDS: of
// two workloads with one address (or two services with one VIP) the one of
// higher rank keeps it (a source ranks by arrival: the later wins), and a
// workload's address may be a service's VIP too (the VIP is looked up
// first). Each conflict is told to report, for a log line. Without it such
// input is an error (a local file's mistake).
func Overlaps(workloadRank func(*Workload) uint64, serviceRank func(*Service) uint64, report func(string)) Option {
	return func(o *options) { o.wrank, o.srank, o.conflict = workloadRank, serviceRank, report }
}

// NewIndex checks the parts fit together (unique UIDs, addresses, service
// keys and VIPs and policy keys; every reference resolves) and indexes them.
func NewIndex(workloads []*Workload, services []*Service, policies []*authz.Policy, opts ...Option) (*Index, error) {
	var o options
	for _, f := range opts {
		f(&o)
	}
	ix := &Index{
		workloads: workloads, services: services, policies: policies,
		byUID:     map[string]*Workload{},
		byAddr:    map[NetworkAddr]*Workload{},
		byNode:    map[string][]*Workload{},
		byVIP:     map[NetworkAddr]*Service{},
		byHost:    map[string][]*Service{},
		byKey:     map[NamespacedHost]*Service{},
		endpoints: map[NamespacedHost][]Endpoint{},
		byPolicy:  map[string]*authz.Policy{},
	}
	for i, p := range policies {
		if _, dup := ix.byPolicy[p.Key()]; dup {
			return nil, &IndexError{"policy", i, "name", fmt.Sprintf("policy %s is defined twice", p.Key())}
		}
		ix.byPolicy[p.Key()] = p
	}
	for i, s := range services {
		if _, dup := ix.byKey[s.Key()]; dup {
			return nil, &IndexError{"service", i, "hostname", fmt.Sprintf("service %s is defined twice", s.Key())}
		}
		ix.byKey[s.Key()] = s
		ix.byHost[s.Hostname] = append(ix.byHost[s.Hostname], s)
		for _, vip := range s.VIPs {
			if prev, dup := ix.byVIP[vip]; dup {
				if o.srank == nil {
					return nil, &IndexError{"service", i, "vips", fmt.Sprintf("VIP %s is already service %s's", vip, prev.Key())}
				}
				keep, lose := prev, s
				if o.srank(s) > o.srank(prev) {
					keep, lose = s, prev
				}
				o.conflict(fmt.Sprintf("VIP %s is claimed by services %s and %s; %s keeps it", vip, lose.Key(), keep.Key(), keep.Key()))
				ix.byVIP[vip] = keep
				continue
			}
			ix.byVIP[vip] = s
		}
		for _, p := range s.Prefixes {
			ix.prefixes = append(ix.prefixes, prefixed{p, s})
		}
	}
	for i, w := range workloads {
		if w.UID == "" {
			return nil, &IndexError{"workload", i, "uid", "empty"}
		}
		if _, dup := ix.byUID[w.UID]; dup {
			return nil, &IndexError{"workload", i, "uid", fmt.Sprintf("uid %q is used twice", w.UID)}
		}
		ix.byUID[w.UID] = w
		for _, ip := range w.IPs {
			if w.HostNetwork {
				break // shared with the node's other host-network workloads: no lookup by address
			}
			a := NetworkAddr{Network: w.Network, IP: ip}
			if prev, dup := ix.byAddr[a]; dup {
				if o.wrank == nil {
					return nil, &IndexError{"workload", i, "workloadIps", fmt.Sprintf("address %s is already workload %q's", a, prev.UID)}
				}
				keep, lose := prev, w
				if o.wrank(w) > o.wrank(prev) {
					keep, lose = w, prev
				}
				o.conflict(fmt.Sprintf("address %s is claimed by workloads %s and %s; %s keeps it", a, lose.UID, keep.UID, keep.UID))
				ix.byAddr[a] = keep
				continue
			}
			if s, clash := ix.byVIP[a]; clash && o.wrank == nil {
				return nil, &IndexError{"workload", i, "workloadIps", fmt.Sprintf("address %s is service %s's VIP", a, s.Key())}
			}
			ix.byAddr[a] = w
		}
		if w.Node != "" {
			ix.byNode[w.Node] = append(ix.byNode[w.Node], w)
		}
		for _, key := range w.AuthorizationPolicies {
			if _, ok := ix.byPolicy[key]; !ok && !o.dangling {
				return nil, &IndexError{"workload", i, "authorizationPolicies", fmt.Sprintf("no policy %s", key)}
			}
		}
		for key, ports := range w.Services {
			if _, ok := ix.byKey[key]; !ok {
				if o.dangling {
					continue
				}
				return nil, &IndexError{"workload", i, "services", fmt.Sprintf("no service %s", key)}
			}
			ix.endpoints[key] = append(ix.endpoints[key], Endpoint{Workload: w, Ports: ports})
		}
	}
	// Stable endpoint order, for dumps and tests; picking is random anyway.
	for _, eps := range ix.endpoints {
		sort.Slice(eps, func(a, b int) bool { return eps[a].Workload.UID < eps[b].Workload.UID })
	}
	return ix, nil
}

// Empty is an index with nothing in it.
func Empty() *Index {
	ix, _ := NewIndex(nil, nil, nil)
	return ix
}

// Workloads, Services and Policies list everything, in source order.
func (ix *Index) Workloads() []*Workload             { return ix.workloads }
func (ix *Index) Services() []*Service               { return ix.services }
func (ix *Index) Policies() []*authz.Policy          { return ix.policies }
func (ix *Index) WorkloadByUID(uid string) *Workload { return ix.byUID[uid] }

// WorkloadByAddr finds the workload that owns ip on network.
func (ix *Index) WorkloadByAddr(network string, ip netip.Addr) *Workload {
	return ix.byAddr[NetworkAddr{Network: network, IP: ip.Unmap()}]
}

// ServiceByVIP finds the service whose VIP is ip on network.
func (ix *Index) ServiceByVIP(network string, ip netip.Addr) *Service {
	return ix.byVIP[NetworkAddr{Network: network, IP: ip.Unmap()}]
}

// ServiceCovering finds a service with a CIDR address (refused: see
// Service.Prefixes) that holds ip on network.
func (ix *Index) ServiceCovering(network string, ip netip.Addr) *Service {
	ip = ip.Unmap()
	for _, p := range ix.prefixes {
		if p.p.Network == network && p.p.Prefix.Contains(ip) {
			return p.svc
		}
	}
	return nil
}

// ServicesByHost lists the services with a hostname (one per namespace).
func (ix *Index) ServicesByHost(host string) []*Service { return ix.byHost[host] }

// Service finds a service by namespace/hostname.
func (ix *Index) Service(key NamespacedHost) *Service { return ix.byKey[key] }

// Endpoints lists a service's workloads.
func (ix *Index) Endpoints(key NamespacedHost) []Endpoint { return ix.endpoints[key] }

// WorkloadsOnNode lists the workloads a node's proxy serves.
func (ix *Index) WorkloadsOnNode(node string) []*Workload { return ix.byNode[node] }

// Policy finds a policy by "namespace/name".
func (ix *Index) Policy(key string) *authz.Policy { return ix.byPolicy[key] }

// PoliciesFor lists the policies that apply to w, in source order.
func (ix *Index) PoliciesFor(w *Workload) []*authz.Policy {
	var out []*authz.Policy
	for _, p := range ix.policies {
		if p.Applies(w.Namespace, w.AuthorizationPolicies) {
			out = append(out, p)
		}
	}
	return out
}

// ErrNoEndpoint is returned when a service has no endpoint that can take a
// connection to the port.
type ErrNoEndpoint struct {
	Service NamespacedHost
	Port    uint16
	Why     string
}

func (e *ErrNoEndpoint) Error() string {
	return fmt.Sprintf("service %s port %d: no endpoint (%s)", e.Service, e.Port, e.Why)
}

// Pick chooses an endpoint of svc for a connection to its port from src
// (which may be nil): healthy (unless the service allows all), mapping the
// port, ranked by the service's routing preferences, then at random
// weighted by capacity. It returns the workload and its target port.
func (ix *Index) Pick(svc *Service, port uint16, src *Workload, rnd *rand.Rand) (*Workload, uint16, error) {
	svcTarget, ok := svc.Ports[port]
	if !ok {
		return nil, 0, &ErrNoEndpoint{svc.Key(), port, "the service has no such port"}
	}
	lb := svc.LoadBalancer
	allowAll := lb != nil && lb.HealthPolicy == AllowAll
	type cand struct {
		w      *Workload
		target uint16
		rank   int
	}
	var cands []cand
	best := -1
	for _, ep := range ix.endpoints[svc.Key()] {
		if ep.Workload.Status != Healthy && !allowAll {
			continue
		}
		target := svcTarget
		if t, ok := ep.Ports[port]; ok && t != 0 {
			target = t
		}
		if target == 0 {
			continue // a named port this endpoint does not map
		}
		r := rank(lb, src, ep.Workload)
		if lb != nil && lb.Mode == LBStrict && r < len(lb.RoutingPreferences) {
			continue
		}
		cands = append(cands, cand{ep.Workload, target, r})
		best = max(best, r)
	}
	if len(cands) == 0 {
		why := "no healthy endpoint maps the port"
		if len(ix.endpoints[svc.Key()]) == 0 {
			why = "the service has no endpoints"
		}
		return nil, 0, &ErrNoEndpoint{svc.Key(), port, why}
	}
	if lb != nil && lb.Mode == LBFailover {
		cands = slices.DeleteFunc(cands, func(c cand) bool { return c.rank < best })
	}
	total := 0
	for _, c := range cands {
		total += int(max(c.w.Capacity, 1))
	}
	n := rnd.IntN(total)
	for _, c := range cands {
		n -= int(max(c.w.Capacity, 1))
		if n < 0 {
			return c.w, c.target, nil
		}
	}
	return cands[len(cands)-1].w, cands[len(cands)-1].target, nil
}

// rank counts how many routing preferences, in order, dst shares with src.
func rank(lb *LoadBalancer, src, dst *Workload) int {
	if lb == nil || src == nil {
		return 0
	}
	n := 0
	for _, s := range lb.RoutingPreferences {
		var same bool
		switch s {
		case ScopeNetwork:
			same = src.Network == dst.Network
		case ScopeRegion:
			same = src.Locality.Region == dst.Locality.Region
		case ScopeZone:
			same = src.Locality.Zone == dst.Locality.Zone
		case ScopeSubzone:
			same = src.Locality.Subzone == dst.Locality.Subzone
		case ScopeNode:
			same = src.Node == dst.Node
		case ScopeCluster:
			same = src.ClusterID == dst.ClusterID
		}
		if !same {
			break
		}
		n++
	}
	return n
}
