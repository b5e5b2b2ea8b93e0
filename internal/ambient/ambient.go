// Package ambient holds Istio ambient's wire constants: the node proxy's
// ports, the mark on its sockets, istiod's TLS server name and the node
// proxy's own identity. A ztunnel or istiod on the other end expects these
// exact values; names are Istio's (istio-cni's cni/pkg/config, ztunnel's
// config.rs) where it has them. Values only: no I/O.
package ambient

import "github.com/ambitmesh/ambit/internal/identity"

// The node proxy's ports, inside each pod's namespace in in-pod mode.
const (
	ZtunnelInboundPort          = 15008 // HBONE in; the only port meshed pods need between each other
	ZtunnelOutboundPort         = 15001 // captured outbound; original destination from SO_ORIGINAL_DST
	ZtunnelInboundPlaintextPort = 15006 // plaintext in, from clients outside the mesh
	SOCKS5Port                  = 15080 // SOCKS5 (no auth), the way out without capture
	AdminPort                   = 15000 // config dump, log level, pprof
	StatsPort                   = 15020 // Prometheus: /metrics, /stats/prometheus
	ReadinessPort               = 15021 // /healthz/ready
)

// InpodMark (1337) is SO_MARK on every socket the node proxy opens in a
// pod's namespace; capture's rules let packets so marked pass.
const InpodMark = 0x539

// IstiodServerName is the DNS SAN of istiod's serving certificate: the TLS
// server name when the control plane is dialled by IP.
const IstiodServerName = "istiod.istio-system.svc"

// The node proxy's own identity, istio-system/ztunnel: the account Istio's
// charts make istiod trust as a node proxy (CA_TRUSTED_NODE_ACCOUNTS).
const (
	DefaultTrustDomain      = "cluster.local"
	NodeProxyNamespace      = "istio-system"
	NodeProxyServiceAccount = "ztunnel"
)

// NodeProxyID is the node proxy's SPIFFE ID in the default trust domain. A
// function, not a variable, so no caller can change it for the others.
func NodeProxyID() identity.ID {
	return identity.ID{TrustDomain: DefaultTrustDomain, Namespace: NodeProxyNamespace, ServiceAccount: NodeProxyServiceAccount}
}

// Istio's Kubernetes vocabulary for ambient: who is in the mesh, and
// which pods a node has captured.
const (
	// DataplaneModeLabel on a namespace or pod: "ambient" puts it in the
	// mesh; on a pod, "none" keeps it out whatever its namespace says.
	DataplaneModeLabel = "istio.io/dataplane-mode"
	// RedirectionAnnotation is written on a pod by its node's agent once
	// its traffic is captured ("enabled"), as istio-cni does; only then is
	// the pod reachable over HBONE.
	RedirectionAnnotation = "ambient.istio.io/redirection"
)

// InMesh is Istio's rule for a pod, from its labels and its namespace's:
// the pod's own label decides when it has one ("ambient" in, "none" out),
// else the namespace's "ambient" puts it in.
func InMesh(namespaceLabels, podLabels map[string]string) bool {
	switch podLabels[DataplaneModeLabel] {
	case "ambient":
		return true
	case "none":
		return false
	}
	return namespaceLabels[DataplaneModeLabel] == "ambient"
}

// PodWorkloadUID is istiod's uid for a pod's workload:
// <cluster>//Pod/<namespace>/<name>. The control plane sends it in xDS and
// the node agent names the pod by it over ZDS.
func PodWorkloadUID(clusterID, namespace, name string) string {
	return clusterID + "//Pod/" + namespace + "/" + name
}

// ZtunnelNodeID is a node proxy's xDS node id in ztunnel's form, the only
// one istiod takes from a node proxy:
// ztunnel~<instance IP>~<pod>.<namespace>~<namespace>.svc.cluster.local
// (ztunnel writes cluster.local whatever the cluster's domain is).
func ZtunnelNodeID(instanceIP, podName, podNamespace string) string {
	return "ztunnel~" + instanceIP + "~" + podName + "." + podNamespace + "~" + podNamespace + ".svc.cluster.local"
}

// ClusterIDHeader carries the proxy's cluster on every call to the CA and
// to xDS; DefaultClusterID is Istio's default cluster name.
const (
	ClusterIDHeader  = "clusterid"
	DefaultClusterID = "Kubernetes"
)
