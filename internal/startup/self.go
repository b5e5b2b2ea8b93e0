package startup

import (
	"cmp"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/xds"
)

// Self is who the proxy is: its pod, node and cluster, as the DaemonSet's
// downward API gives them to ztunnel (POD_NAME, POD_NAMESPACE, INSTANCE_IP,
// NODE_NAME, SERVICE_ACCOUNT, CLUSTER_ID, ISTIO_META_*). It makes the xDS
// node istiod expects from a node proxy, and the proxy's own identity.
type Self struct {
	PodName, PodNamespace string
	InstanceIP            string // ztunnel sends 1.1.1.1 when it is not set; so does Ambit
	NodeName              string
	ServiceAccount        string
	ClusterID             string // default Kubernetes; also the "clusterid" header
	// Meta is the node metadata from ISTIO_META_<KEY> (as KEY, a string)
	// and ISTIO_METAJSON_<KEY> (as KEY, parsed JSON).
	Meta map[string]any
}

// ztunnelDefaultIP is what ztunnel puts in its node id without INSTANCE_IP.
const ztunnelDefaultIP = "1.1.1.1"

// SelfFromEnv reads the proxy's pod from ztunnel's variables; they describe
// the pod, not the mesh, so every mode reads them (flags or environment).
// An ISTIO_METAJSON_ value that is not JSON is an error that names it.
func SelfFromEnv(environ []string) (Self, error) {
	env := envMap(environ)
	s := Self{
		PodName: env["POD_NAME"], PodNamespace: env["POD_NAMESPACE"], InstanceIP: env["INSTANCE_IP"],
		NodeName: env["NODE_NAME"], ServiceAccount: env["SERVICE_ACCOUNT"],
		// ztunnel: ISTIO_META_CLUSTER_ID wins over CLUSTER_ID.
		ClusterID: cmp.Or(env["ISTIO_META_CLUSTER_ID"], env["CLUSTER_ID"]),
		Meta:      map[string]any{},
	}
	for k, v := range env {
		if key, ok := strings.CutPrefix(k, "ISTIO_META_"); ok && key != "" {
			s.Meta[key] = v
		}
	}
	var errs []string
	for k, v := range env {
		if key, ok := strings.CutPrefix(k, "ISTIO_METAJSON_"); ok && key != "" {
			var x any
			if err := json.Unmarshal([]byte(v), &x); err != nil {
				errs = append(errs, fmt.Sprintf("%s: not JSON: %v", k, err))
				continue
			}
			s.Meta[key] = x
		}
	}
	if len(errs) > 0 {
		sort.Strings(errs)
		return s, fmt.Errorf("environment: %s", strings.Join(errs, "; "))
	}
	return s, nil
}

// withDefaults fills what the environment left out from the mode: a
// dedicated proxy is its workload's pod; a shared one defaults to
// istio-system and a name after its node.
func (s Self) withDefaults(o *Options) Self {
	if ns, name, ok := strings.Cut(o.Workload, "/"); ok {
		s.PodNamespace = cmp.Or(s.PodNamespace, ns)
		s.PodName = cmp.Or(s.PodName, name)
	}
	s.PodNamespace = cmp.Or(s.PodNamespace, ambient.NodeProxyNamespace)
	if o.Node != "" {
		s.PodName = cmp.Or(s.PodName, "ambit-"+o.Node)
		s.NodeName = cmp.Or(s.NodeName, o.Node)
	}
	if s.InstanceIP == "" && o.ListenIP.IsValid() && !o.ListenIP.IsUnspecified() {
		s.InstanceIP = o.ListenIP.String()
	}
	s.InstanceIP = cmp.Or(s.InstanceIP, ztunnelDefaultIP)
	s.ClusterID = cmp.Or(s.ClusterID, ambient.DefaultClusterID)
	return s
}

// XDSNode is ztunnel's xDS node: id
// ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local and metadata NAME,
// NAMESPACE, INSTANCE_IPS, NODE_NAME and the ISTIO_META_ values (those
// win, as in ztunnel, where a key repeats).
func (s Self) XDSNode() xds.Node {
	fields := map[string]any{
		"NAME": s.PodName, "NAMESPACE": s.PodNamespace, "INSTANCE_IPS": s.InstanceIP, "NODE_NAME": s.NodeName,
	}
	for k, v := range s.Meta {
		fields[k] = v
	}
	return xds.Node{ID: ambient.ZtunnelNodeID(s.InstanceIP, s.PodName, s.PodNamespace), Metadata: fields}
}

// Identity is the proxy's own SPIFFE identity, asked of the CA without
// impersonation: its pod's account when the environment names it, else
// Istio's node proxy account (istio-system/ztunnel).
func (s Self) Identity() identity.ID {
	if s.ServiceAccount == "" {
		return ambient.NodeProxyID()
	}
	return identity.ID{TrustDomain: ambient.DefaultTrustDomain, Namespace: s.PodNamespace, ServiceAccount: s.ServiceAccount}
}

// envMap is environ (KEY=value lines) as a map; the first of a key wins,
// as os.Getenv sees it.
func envMap(environ []string) map[string]string {
	m := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			if _, seen := m[k]; !seen {
				m[k] = v
			}
		}
	}
	return m
}
