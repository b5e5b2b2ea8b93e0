package proxy

import (
	"cmp"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/workload"
)

// The /config_dump JSON follows ztunnel's admin schema (its src/admin.rs
// and the proxy state it serialises), field by field, so `istioctl
// ztunnel-config` reads Ambit as it reads ztunnel. These are Ambit's own
// structs, not istioctl's: the schema is ztunnel's output, and istioctl's
// reader (which drops fields it does not print) is only one consumer.
// Keys and tokens never appear.

type zDump struct {
	Workloads     []zWorkload                `json:"workloads"`
	Services      []zService                 `json:"services"`
	Policies      []zPolicy                  `json:"policies"`
	Certificates  []zCerts                   `json:"certificates"`
	WorkloadState map[string]*zWorkloadState `json:"workloadState"`
	Version       zVersion                   `json:"version"`
	Config        zConfig                    `json:"config"`
}

type zVersion struct {
	Version string `json:"version"`
}

// zConfig is the part of ztunnel's config section that has a meaning in
// Ambit (ztunnel dumps its whole config struct).
type zConfig struct {
	ProxyMode string `json:"proxyMode"` // "Shared" or "Dedicated", as ztunnel's PROXY_MODE
	Node      string `json:"node,omitempty"`
	Workload  string `json:"workload,omitempty"` // dedicated mode: namespace/name
	Network   string `json:"network"`
}

type zGateway struct {
	Destination string `json:"destination"`
}

type zWorkload struct {
	WorkloadIPs           []string           `json:"workloadIps"`
	Waypoint              *zGateway          `json:"waypoint,omitempty"`
	Protocol              string             `json:"protocol"`
	NetworkMode           string             `json:"networkMode"`
	UID                   string             `json:"uid"`
	Name                  string             `json:"name"`
	Namespace             string             `json:"namespace"`
	TrustDomain           string             `json:"trustDomain"`
	ServiceAccount        string             `json:"serviceAccount"`
	Network               string             `json:"network"`
	WorkloadName          string             `json:"workloadName"`
	WorkloadType          string             `json:"workloadType"`
	CanonicalName         string             `json:"canonicalName"`
	CanonicalRevision     string             `json:"canonicalRevision"`
	Hostname              string             `json:"hostname"`
	Node                  string             `json:"node"`
	AuthorizationPolicies []string           `json:"authorizationPolicies"`
	Status                string             `json:"status"`
	ClusterID             string             `json:"clusterId"`
	Locality              *workload.Locality `json:"locality,omitempty"`
	Services              []string           `json:"services"`
	Capacity              uint32             `json:"capacity"`
	// Unsupported is Ambit's: what the workload needs that Ambit refuses
	// (fail closed) rather than serves around. Not in ztunnel's schema.
	Unsupported string `json:"unsupported,omitempty"`
}

type zEndpoint struct {
	WorkloadUID string            `json:"workloadUid"`
	Service     string            `json:"service"`
	Port        map[string]uint16 `json:"port"`
	Status      string            `json:"status"`
}

type zService struct {
	Name            string                 `json:"name"`
	Namespace       string                 `json:"namespace"`
	Hostname        string                 `json:"hostname"`
	VIPs            []string               `json:"vips"`
	CIDRVIPs        []string               `json:"cidrVips,omitempty"`
	Ports           map[string]uint16      `json:"ports"`
	Endpoints       map[string]zEndpoint   `json:"endpoints"`
	SubjectAltNames []string               `json:"subjectAltNames"`
	Waypoint        *zGateway              `json:"waypoint,omitempty"`
	LoadBalancer    *workload.LoadBalancer `json:"loadBalancer,omitempty"`
	IPFamilies      string                 `json:"ipFamilies,omitempty"`
	Unsupported     string                 `json:"unsupported,omitempty"` // Ambit's, as for a workload
}

type zPolicy struct {
	Name      string       `json:"name"`
	Namespace string       `json:"namespace"`
	Scope     string       `json:"scope"`
	Action    string       `json:"action"`
	Rules     [][][]zMatch `json:"rules"`
	DryRun    bool         `json:"dryRun"`
}

type zSA struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
}

// zString is ztunnel's StringMatch enum as serde writes it: one key,
// {"Exact": "v"}, {"Prefix": "v"}, {"Suffix": "v"} or {"Presence": []}.
type zString map[string]any

type zMatch struct {
	Namespaces          []zString `json:"namespaces,omitempty"`
	NotNamespaces       []zString `json:"notNamespaces,omitempty"`
	ServiceAccounts     []zSA     `json:"serviceAccounts,omitempty"`
	NotServiceAccounts  []zSA     `json:"notServiceAccounts,omitempty"`
	Principals          []zString `json:"principals,omitempty"`
	NotPrincipals       []zString `json:"notPrincipals,omitempty"`
	SourceIPs           []string  `json:"sourceIps,omitempty"`
	NotSourceIPs        []string  `json:"notSourceIps,omitempty"`
	DestinationIPs      []string  `json:"destinationIps,omitempty"`
	NotDestinationIPs   []string  `json:"notDestinationIps,omitempty"`
	DestinationPorts    []uint16  `json:"destinationPorts,omitempty"`
	NotDestinationPorts []uint16  `json:"notDestinationPorts,omitempty"`
}

type zCerts struct {
	Identity  string  `json:"identity"`
	State     string  `json:"state"`
	CertChain []zCert `json:"certChain"`
	RootCerts []zCert `json:"rootCerts"`
}

// zCert is one certificate as ztunnel shows it: the PEM text base64
// encoded, the serial number in decimal, the validity in RFC 3339 UTC.
type zCert struct {
	PEM            string `json:"pem"`
	SerialNumber   string `json:"serialNumber"`
	ValidFrom      string `json:"validFrom"`
	ExpirationTime string `json:"expirationTime"`
}

type zWorkloadState struct {
	State       string       `json:"state"`
	Info        zInfo        `json:"info"`
	Connections zConnections `json:"connections"`
}

type zInfo struct {
	Name           string `json:"name"`
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
}

type zConnections struct {
	Inbound  []zConn `json:"inbound"`
	Outbound []zConn `json:"outbound"`
}

type zConn struct {
	Src         string  `json:"src"`
	OriginalDst *string `json:"originalDst"`
	ActualDst   string  `json:"actualDst"`
	Protocol    string  `json:"protocol"`
}

func (p *Proxy) configDump(w http.ResponseWriter, r *http.Request) {
	d := p.buildDump()
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(d)
}

func (p *Proxy) buildDump() zDump {
	ix := p.index.Load()
	d := zDump{
		Workloads: []zWorkload{}, Services: []zService{}, Policies: []zPolicy{}, Certificates: []zCerts{},
		Version: zVersion{Version: p.opts.Version},
		Config:  zConfig{ProxyMode: "Shared", Node: p.opts.Node, Network: p.opts.Network},
	}
	if p.opts.Workload != "" {
		d.Config = zConfig{ProxyMode: "Dedicated", Workload: p.opts.Workload}
		if self := p.self.Load(); self != nil {
			d.Config.Network = self.Network
		}
	}
	for _, wl := range ix.Workloads() {
		d.Workloads = append(d.Workloads, dumpWorkload(wl))
	}
	slices.SortFunc(d.Workloads, func(a, b zWorkload) int { return cmp.Compare(a.UID, b.UID) })
	for _, s := range ix.Services() {
		d.Services = append(d.Services, dumpService(s, ix.Endpoints(s.Key())))
	}
	slices.SortFunc(d.Services, func(a, b zService) int {
		return cmp.Or(cmp.Compare(a.Hostname, b.Hostname), cmp.Compare(a.Namespace, b.Namespace))
	})
	for _, pol := range ix.Policies() {
		d.Policies = append(d.Policies, dumpPolicy(pol))
	}
	slices.SortFunc(d.Policies, func(a, b zPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, st := range p.opts.Certs.States() {
		d.Certificates = append(d.Certificates, dumpCerts(st))
	}
	slices.SortFunc(d.Certificates, func(a, b zCerts) int { return cmp.Compare(a.Identity, b.Identity) })
	d.WorkloadState = p.workloadState(ix)
	return d
}

func dumpWorkload(wl *workload.Workload) zWorkload {
	z := zWorkload{
		WorkloadIPs: make([]string, 0, len(wl.IPs)), Protocol: string(wl.Protocol), NetworkMode: "Standard",
		UID: wl.UID, Name: wl.Name, Namespace: wl.Namespace, TrustDomain: wl.TrustDomain,
		ServiceAccount: wl.ServiceAccount, Network: wl.Network, WorkloadName: wl.WorkloadName,
		WorkloadType: wl.WorkloadType, CanonicalName: wl.CanonicalName, CanonicalRevision: wl.CanonicalRevision,
		Hostname: wl.Hostname, Node: wl.Node, AuthorizationPolicies: wl.AuthorizationPolicies,
		Status: string(wl.Status), ClusterID: wl.ClusterID, Services: []string{}, Capacity: wl.Capacity,
		Unsupported: wl.Unsupported,
	}
	if z.AuthorizationPolicies == nil {
		z.AuthorizationPolicies = []string{}
	}
	for _, ip := range wl.IPs {
		z.WorkloadIPs = append(z.WorkloadIPs, ip.String())
	}
	if wl.HostNetwork {
		z.NetworkMode = "HostNetwork"
	}
	if wl.Waypoint != "" {
		z.Waypoint = &zGateway{Destination: wl.Waypoint}
	}
	if wl.Locality != (workload.Locality{}) {
		loc := wl.Locality
		z.Locality = &loc
	}
	for key := range wl.Services {
		z.Services = append(z.Services, key.String())
	}
	slices.Sort(z.Services)
	return z
}

func dumpService(s *workload.Service, eps []workload.Endpoint) zService {
	z := zService{
		Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname, VIPs: make([]string, 0, len(s.VIPs)),
		Ports: portMap(s.Ports), Endpoints: make(map[string]zEndpoint, len(eps)),
		SubjectAltNames: s.SubjectAltNames, LoadBalancer: s.LoadBalancer, IPFamilies: s.IPFamilies,
		Unsupported: s.Unsupported,
	}
	if z.SubjectAltNames == nil {
		z.SubjectAltNames = []string{}
	}
	for _, v := range s.VIPs {
		z.VIPs = append(z.VIPs, v.String())
	}
	for _, pr := range s.Prefixes {
		z.CIDRVIPs = append(z.CIDRVIPs, pr.Network+"/"+pr.Prefix.String())
	}
	if s.Waypoint != "" {
		z.Waypoint = &zGateway{Destination: s.Waypoint}
	}
	for _, ep := range eps {
		z.Endpoints[ep.Workload.UID] = zEndpoint{
			WorkloadUID: ep.Workload.UID, Service: s.Key().String(), Port: portMap(ep.Ports),
			Status: string(ep.Workload.Status),
		}
	}
	return z
}

// portMap writes port → port with string keys, as serde writes a map.
func portMap(m map[uint16]uint16) map[string]uint16 {
	out := make(map[string]uint16, len(m))
	for k, v := range m {
		out[strconv.Itoa(int(k))] = v
	}
	return out
}

func dumpPolicy(pol *authz.Policy) zPolicy {
	z := zPolicy{
		Name: pol.Name, Namespace: pol.Namespace, Scope: string(pol.Scope), Action: string(pol.Action),
		Rules: make([][][]zMatch, 0, len(pol.Rules)), DryRun: pol.DryRun,
	}
	for _, rule := range pol.Rules {
		zr := make([][]zMatch, 0, len(rule))
		for _, clause := range rule {
			zc := make([]zMatch, 0, len(clause))
			for _, m := range clause {
				zc = append(zc, dumpMatch(m))
			}
			zr = append(zr, zc)
		}
		z.Rules = append(z.Rules, zr)
	}
	return z
}

func dumpMatch(m authz.Match) zMatch {
	return zMatch{
		Namespaces: strMatches(m.Namespaces), NotNamespaces: strMatches(m.NotNamespaces),
		ServiceAccounts: saMatches(m.ServiceAccounts), NotServiceAccounts: saMatches(m.NotServiceAccounts),
		Principals: strMatches(m.Principals), NotPrincipals: strMatches(m.NotPrincipals),
		SourceIPs: prefixes(m.SourceIPs), NotSourceIPs: prefixes(m.NotSourceIPs),
		DestinationIPs: prefixes(m.DestinationIPs), NotDestinationIPs: prefixes(m.NotDestinationIPs),
		DestinationPorts: m.DestinationPorts, NotDestinationPorts: m.NotDestinationPorts,
	}
}

func strMatches(ms []authz.StringMatch) []zString {
	var out []zString
	for _, m := range ms {
		if m.Kind == authz.Presence {
			out = append(out, zString{"Presence": []any{}})
		} else {
			out = append(out, zString{string(m.Kind): m.Value})
		}
	}
	return out
}

func saMatches(ms []authz.ServiceAccountMatch) []zSA {
	var out []zSA
	for _, m := range ms {
		out = append(out, zSA{Namespace: m.Namespace, ServiceAccount: m.ServiceAccount})
	}
	return out
}

func prefixes(ps []netip.Prefix) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

// dumpCerts shows one identity's certificates, never its key. The state
// strings are ztunnel's: Available, Initializing, "Unavailable: <error>".
func dumpCerts(st identity.CertState) zCerts {
	z := zCerts{Identity: st.ID.String(), State: "Initializing", CertChain: []zCert{}, RootCerts: []zCert{}}
	switch {
	case st.Cert != nil:
		z.State = "Available"
		for _, c := range st.Cert.Chain {
			z.CertChain = append(z.CertChain, dumpCert(c))
		}
		for _, c := range st.Cert.Roots {
			z.RootCerts = append(z.RootCerts, dumpCert(c))
		}
	case st.Err != nil:
		z.State = "Unavailable: " + st.Err.Error()
	}
	return z
}

func dumpCert(c *x509.Certificate) zCert {
	text := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	return zCert{
		PEM: base64.StdEncoding.EncodeToString(text), SerialNumber: c.SerialNumber.String(),
		ValidFrom: c.NotBefore.UTC().Format(time.RFC3339), ExpirationTime: c.NotAfter.UTC().Format(time.RFC3339),
	}
}

// workloadState is ztunnel's per-pod section: the pods enrolled in this
// proxy (in dedicated mode, its one workload) and their live connections,
// inbound and outbound.
func (p *Proxy) workloadState(ix *workload.Index) map[string]*zWorkloadState {
	out := map[string]*zWorkloadState{}
	// Keyed by the workload's uid (a pod xDS does not have yet: the
	// agent's), which is what its connections name.
	add := func(wl *workload.Workload, uid string, info zInfo) {
		if wl != nil {
			uid, info = wl.UID, zInfo{Name: wl.Name, Namespace: wl.Namespace, ServiceAccount: wl.ServiceAccount}
		}
		out[uid] = &zWorkloadState{State: "Up", Info: info, Connections: zConnections{Inbound: []zConn{}, Outbound: []zConn{}}}
	}
	if self := p.self.Load(); self != nil {
		add(self, "", zInfo{})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pd := range p.pods {
		add(p.podWorkload(ix, pd.uid, pd.name, pd.namespace), pd.uid, zInfo{Name: pd.name, Namespace: pd.namespace})
	}
	// A connection goes under its local end's workload: the destination
	// inbound, the source outbound.
	state := func(w *workload.Workload) *zWorkloadState {
		if w == nil {
			return nil
		}
		return out[w.UID]
	}
	for c := range p.live {
		if st := state(c.tc.DstWorkload); st != nil {
			st.Connections.Inbound = append(st.Connections.Inbound, zConn{Src: c.tc.Src.String(), ActualDst: c.tc.Dst.String(), Protocol: protocolOf(&c.tc)})
		}
	}
	for c := range p.out {
		if st := state(c.tc.SrcWorkload); st != nil {
			orig, actual := c.tc.Dst.String(), c.tc.Dst.String()
			if c.tc.MTLS {
				actual = c.tc.DstHBONE.String()
			}
			st.Connections.Outbound = append(st.Connections.Outbound, zConn{Src: c.tc.Src.String(), OriginalDst: &orig, ActualDst: actual, Protocol: protocolOf(&c.tc)})
		}
	}
	for _, st := range out {
		slices.SortFunc(st.Connections.Inbound, func(a, b zConn) int { return cmp.Compare(a.Src, b.Src) })
		slices.SortFunc(st.Connections.Outbound, func(a, b zConn) int { return cmp.Compare(a.Src, b.Src) })
	}
	return out
}

// protocolOf is ztunnel's name for how a connection is carried.
func protocolOf(c *telemetry.Conn) string {
	if c.MTLS {
		return "HBONE"
	}
	return "TCP"
}
