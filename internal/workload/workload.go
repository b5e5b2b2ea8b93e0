// Package workload is the mesh as a node proxy knows it: workloads,
// services and policies, in an immutable Index that every source (the local
// file, xDS, later Kubernetes) builds and the data path only reads. It does
// no I/O.
package workload

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/ambitmesh/ambit/internal/identity"
)

// Protocol is how a workload accepts mesh traffic.
type Protocol string

// Protocols.
const (
	ProtocolTCP   Protocol = "TCP"   // plain TCP: not in the mesh (or not captured)
	ProtocolHBONE Protocol = "HBONE" // HBONE on 15008
)

// Health is a workload's health as the control plane reports it.
type Health string

// Health states.
const (
	Healthy   Health = "Healthy"
	Unhealthy Health = "Unhealthy"
)

// NetworkAddr is an IP on a network; "" is the default network. Written
// "network/ip".
type NetworkAddr struct {
	Network string
	IP      netip.Addr
}

func (a NetworkAddr) String() string { return a.Network + "/" + a.IP.String() }

// ParseNetworkAddr reads "network/ip" (the network may be empty: "/10.0.0.1").
func ParseNetworkAddr(s string) (NetworkAddr, error) {
	netw, ip, ok := strings.Cut(s, "/")
	if !ok {
		return NetworkAddr{}, fmt.Errorf("%q: want network/ip (e.g. \"/10.96.0.10\")", s)
	}
	addr, err := netip.ParseAddr(ip)
	if err != nil || addr.Zone() != "" {
		return NetworkAddr{}, fmt.Errorf("%q: %q is not an IP address", s, ip)
	}
	return NetworkAddr{Network: netw, IP: addr.Unmap()}, nil
}

// NamespacedHost names a service: "namespace/hostname".
type NamespacedHost struct {
	Namespace string
	Hostname  string
}

func (n NamespacedHost) String() string { return n.Namespace + "/" + n.Hostname }

// ParseNamespacedHost reads "namespace/hostname".
func ParseNamespacedHost(s string) (NamespacedHost, error) {
	ns, host, ok := strings.Cut(s, "/")
	if !ok || ns == "" || host == "" || strings.Contains(host, "/") {
		return NamespacedHost{}, fmt.Errorf("%q: want namespace/hostname", s)
	}
	return NamespacedHost{Namespace: ns, Hostname: host}, nil
}

// Locality places a workload for load balancing.
type Locality struct {
	Region  string `json:"region,omitempty"`
	Zone    string `json:"zone,omitempty"`
	Subzone string `json:"subzone,omitempty"`
}

// Workload is one pod (or VM) of the mesh.
type Workload struct {
	UID                   string                               `json:"uid"`
	Name                  string                               `json:"name"`
	Namespace             string                               `json:"namespace"`
	ServiceAccount        string                               `json:"serviceAccount"`
	TrustDomain           string                               `json:"trustDomain"`
	IPs                   []netip.Addr                         `json:"workloadIps"`
	Protocol              Protocol                             `json:"protocol"`
	Node                  string                               `json:"node,omitempty"`
	Network               string                               `json:"network,omitempty"`
	Hostname              string                               `json:"hostname,omitempty"`
	CanonicalName         string                               `json:"canonicalName,omitempty"`
	CanonicalRevision     string                               `json:"canonicalRevision,omitempty"`
	WorkloadName          string                               `json:"workloadName,omitempty"`
	WorkloadType          string                               `json:"workloadType,omitempty"`
	ClusterID             string                               `json:"clusterId,omitempty"`
	Status                Health                               `json:"status"`
	AuthorizationPolicies []string                             `json:"authorizationPolicies,omitempty"`
	Services              map[NamespacedHost]map[uint16]uint16 `json:"-"` // service → service port → target port
	Capacity              uint32                               `json:"capacity"`
	Locality              Locality                             `json:"locality,omitempty"`
	// HostNetwork: the workload shares its node's address with others
	// (istiod's HOST_NETWORK mode), so it is never looked up by address;
	// it is still an endpoint, dialled at its address.
	HostNetwork bool `json:"hostNetwork,omitempty"`
	// Unsupported, if set, names what the workload needs that Ambit does
	// not implement yet (a waypoint, a network gateway, ...): traffic to
	// it is refused (fail closed) rather than sent around it.
	Unsupported string `json:"unsupported,omitempty"`
	// Waypoint is the waypoint istiod assigned, as ztunnel writes it
	// ("namespace/hostname" or "network/ip"); shown, not used (with it,
	// Unsupported is set).
	Waypoint string `json:"-"`
}

// FillDefaults sets what Istio leaves empty to ztunnel's defaults: trust
// domain cluster.local, service account default, cluster Kubernetes, and
// the workload type deployment (the zero of Istio's enum). Every source (the
// local file, xDS) calls it, so they build the same index.
func (w *Workload) FillDefaults() {
	if w.TrustDomain == "" {
		w.TrustDomain = "cluster.local"
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = "default"
	}
	if w.ClusterID == "" {
		w.ClusterID = "Kubernetes"
	}
	if w.WorkloadType == "" {
		w.WorkloadType = "deployment"
	}
}

// Identity is the workload's SPIFFE ID.
func (w *Workload) Identity() identity.ID {
	return identity.ID{TrustDomain: w.TrustDomain, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}
}

// HasIP reports whether ip is one of the workload's addresses.
func (w *Workload) HasIP(ip netip.Addr) bool {
	for _, a := range w.IPs {
		if a == ip.Unmap() {
			return true
		}
	}
	return false
}

// Service is a virtual address in front of workloads.
type Service struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace"`
	Hostname        string            `json:"hostname"`
	VIPs            []NetworkAddr     `json:"-"`
	Ports           map[uint16]uint16 `json:"ports"` // service port → target port (0: the endpoint's own mapping)
	SubjectAltNames []string          `json:"subjectAltNames,omitempty"`
	LoadBalancer    *LoadBalancer     `json:"loadBalancer,omitempty"`
	// Prefixes are addresses given as CIDR ranges (a ServiceEntry's); they
	// go with Unsupported: traffic into them is refused.
	Prefixes []NetworkPrefix `json:"-"`
	// Unsupported: as for a Workload; traffic to the service is refused.
	Unsupported string `json:"unsupported,omitempty"`
	// Waypoint as for a Workload. IPFamilies is istiod's "IPv4", "IPv6"
	// or "Dual" ("" when unset), as ztunnel writes it.
	Waypoint   string `json:"-"`
	IPFamilies string `json:"-"`
}

// NetworkPrefix is a range of addresses on a network.
type NetworkPrefix struct {
	Network string
	Prefix  netip.Prefix
}

// Key names the service as workloads and xDS refer to it.
func (s *Service) Key() NamespacedHost {
	return NamespacedHost{Namespace: s.Namespace, Hostname: s.Hostname}
}

// LoadBalancer says how a service picks endpoints.
type LoadBalancer struct {
	RoutingPreferences []Scope      `json:"routingPreferences,omitempty"`
	Mode               LBMode       `json:"mode,omitempty"`
	HealthPolicy       HealthPolicy `json:"healthPolicy,omitempty"`
}

// Scope is a locality dimension endpoints are ranked by.
type Scope string

// Scopes.
const (
	ScopeRegion  Scope = "Region"
	ScopeZone    Scope = "Zone"
	ScopeSubzone Scope = "Subzone"
	ScopeNode    Scope = "Node"
	ScopeCluster Scope = "Cluster"
	ScopeNetwork Scope = "Network"
)

// LBMode: Standard ignores locality; Strict takes only endpoints matching
// every preference; Failover prefers the best match.
type LBMode string

// Load-balancing modes.
const (
	LBStandard LBMode = "Standard"
	LBStrict   LBMode = "Strict"
	LBFailover LBMode = "Failover"
)

// HealthPolicy says whether unhealthy endpoints may be picked.
type HealthPolicy string

// Health policies.
const (
	OnlyHealthy HealthPolicy = "OnlyHealthy"
	AllowAll    HealthPolicy = "AllowAll"
)
