package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubenode"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netns"
)

// ClusterTrace is `ambit trace` on a Kubernetes cluster, run as root on a
// node. Pods and nodes whose namespaces are on this machine are watched
// (a test cluster's machine holds every node; a real node holds its own).
type ClusterTrace struct {
	Client *kube.Client
	From   string         // the source pod, namespace/name
	To     netip.AddrPort // a pod's IP and port
	OutDir string
	// MeshNamespace is where the ambit-node pods run (the proxies'
	// account is read from their logs); default ambit-system.
	MeshNamespace string
	ProcDir       string // default /proc
}

// TraceCluster sends an HTTP GET from a pod of the cluster to another
// pod and shows it hop by hop, as Trace does in the lab: packets at the
// source pod's loopback and eth0, on the source node's uplink (the
// interface holding its InternalIP), at the destination pod's eth0 and
// loopback, a pcap per hop, and what both nodes' proxies logged.
func TraceCluster(ctx context.Context, w io.Writer, ct ClusterTrace) (status, body string, problems []string, err error) {
	if ct.MeshNamespace == "" {
		ct.MeshNamespace = "ambit-system"
	}
	if ct.ProcDir == "" {
		ct.ProcDir = "/proc"
	}
	ns, name, ok := strings.Cut(ct.From, "/")
	if !ok || ns == "" || name == "" {
		return "", "", nil, fmt.Errorf("trace: --from %q: want namespace/name", ct.From)
	}
	src, err := ct.Client.GetPod(ctx, ns, name)
	if err != nil {
		return "", "", nil, fmt.Errorf("trace: %w", err)
	}
	dst, err := podAt(ctx, ct.Client, ct.To.Addr())
	if err != nil {
		return "", "", nil, err
	}
	srcNS, err := kubenode.PodNetns(ct.ProcDir, "/var/run/netns", src.Metadata.UID)
	if err != nil {
		return "", "", nil, fmt.Errorf("trace: pod %s is not on this machine (run the trace on its node): %w", ct.From, err)
	}
	dstNS, err := kubenode.PodNetns(ct.ProcDir, "/var/run/netns", dst.Metadata.UID)
	if err != nil {
		return "", "", nil, fmt.Errorf("trace: pod %s is not on this machine: %w", dst.Metadata.Key(), err)
	}
	hops := []hop{
		{fmt.Sprintf("1. %s pod, lo: the app's plain connection, captured to the proxy's 15001", src.Metadata.Name), srcNS, "lo", "1-" + src.Metadata.Name + "-pod-lo.pcap", srcNS},
		{fmt.Sprintf("2. %s pod, eth0: %s's proxy tunnels it, HBONE from the pod's own IP", src.Metadata.Name, src.Spec.NodeName), srcNS, "eth0", "2-" + src.Metadata.Name + "-pod-eth0.pcap", srcNS},
	}
	if src.Spec.NodeName != dst.Spec.NodeName {
		uplink, err := nodeUplink(ctx, ct.Client, ct.ProcDir, src.Spec.NodeName)
		if err != nil {
			return "", "", nil, err
		}
		uplink.title = fmt.Sprintf("3. node %s's uplink (%s): between the nodes", src.Spec.NodeName, uplink.iface)
		uplink.file = "3-" + src.Spec.NodeName + "-uplink.pcap"
		hops = append(hops, uplink)
	}
	n := len(hops) + 1
	hops = append(hops,
		hop{fmt.Sprintf("%d. %s pod, eth0: HBONE arrives at %s's proxy (15008, never redirected)", n, dst.Metadata.Name, dst.Spec.NodeName), dstNS, "eth0", fmt.Sprintf("%d-%s-pod-eth0.pcap", n, dst.Metadata.Name), dstNS},
		hop{fmt.Sprintf("%d. %s pod, lo: the proxy delivers to the app from the client's IP", n+1, dst.Metadata.Name), dstNS, "lo", fmt.Sprintf("%d-%s-pod-lo.pcap", n+1, dst.Metadata.Name), dstNS})
	nodes := []string{src.Spec.NodeName}
	if dst.Spec.NodeName != src.Spec.NodeName {
		nodes = append(nodes, dst.Spec.NodeName)
	}
	proxies := map[string]string{}
	for _, node := range nodes {
		if proxies[node], err = nodePod(ctx, ct.Client, ct.MeshNamespace, node); err != nil {
			return "", "", nil, err
		}
	}
	since := time.Now().Add(-time.Second)
	meshed := src.Metadata.Annotations[ambient.RedirectionAnnotation] == "enabled" && dst.Metadata.Annotations[ambient.RedirectionAnnotation] == "enabled"
	return runTrace(w, traceSpec{
		hops: hops, from: src.Metadata.Key(), fromNS: srcNS, dst: ct.To, outDir: ct.OutDir, meshOnly: meshed, nodes: nodes,
		proxyLog: func(node string) []string {
			lines, err := ct.Client.PodLog(ctx, ct.MeshNamespace, proxies[node], "proxy", since)
			if err != nil {
				return []string{"(the proxy's log: " + err.Error() + ")"}
			}
			return lines
		},
	})
}

// podAt is the running pod with that IP.
func podAt(ctx context.Context, c *kube.Client, ip netip.Addr) (*kube.Pod, error) {
	raw, _, err := c.List(ctx, kube.Pods, kube.Selector{Field: "status.podIP=" + ip.String()})
	if err != nil {
		return nil, fmt.Errorf("trace: pods at %s: %w", ip, err)
	}
	for _, r := range raw {
		var p kube.Pod
		if err := json.Unmarshal(r, &p); err == nil && p.Status.Phase == "Running" && !p.Spec.HostNetwork {
			return &p, nil
		}
	}
	return nil, fmt.Errorf("trace: no running pod has the IP %s (a Service's ClusterIP is not taken yet: give one of its pods)", ip)
}

// nodePod is the ambit-node pod on node.
func nodePod(ctx context.Context, c *kube.Client, ns, node string) (string, error) {
	raw, _, err := c.List(ctx, kube.Pods, kube.Selector{Field: "spec.nodeName=" + node, Label: "app=ambit-node"})
	if err != nil {
		return "", fmt.Errorf("trace: the node pod of %s: %w", node, err)
	}
	for _, r := range raw {
		var p kube.Pod
		if json.Unmarshal(r, &p) == nil && p.Metadata.Namespace == ns && p.Metadata.DeletionTimestamp == nil {
			return p.Metadata.Name, nil
		}
	}
	return "", fmt.Errorf("trace: no ambit-node pod in %s on node %s (is Ambit installed?)", ns, node)
}

// nodeUplink finds the network namespace and interface that hold the
// node's InternalIP on this machine (the host's on a real node).
func nodeUplink(ctx context.Context, c *kube.Client, procDir, node string) (hop, error) {
	var n struct {
		Status struct {
			Addresses []struct{ Type, Address string } `json:"addresses"`
		} `json:"status"`
	}
	if err := c.Get(ctx, kube.Nodes, "", node, &n); err != nil {
		return hop{}, fmt.Errorf("trace: node %s: %w", node, err)
	}
	var ip netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type == "InternalIP" {
			ip, _ = netip.ParseAddr(a.Address)
		}
	}
	if !ip.IsValid() {
		return hop{}, fmt.Errorf("trace: node %s has no InternalIP", node)
	}
	seen := map[uint64]bool{}
	entries, _ := os.ReadDir(procDir)
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		path := filepath.Join(procDir, e.Name(), "ns", "net")
		var st syscall.Stat_t
		if syscall.Stat(path, &st) != nil || seen[st.Ino] {
			continue
		}
		seen[st.Ino] = true
		if iface := interfaceWith(path, ip); iface != "" {
			return hop{ns: path, path: path, iface: iface}, nil
		}
	}
	return hop{}, fmt.Errorf("trace: no interface on this machine holds node %s's address %s (run the trace on that node)", node, ip)
}

func interfaceWith(nsPath string, ip netip.Addr) string {
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		return ""
	}
	defer h.Close()
	var found string
	_ = nsutil.Do(h, func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, i := range ifs {
			addrs, _ := i.Addrs()
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok {
					if x, ok := netip.AddrFromSlice(n.IP); ok && x.Unmap() == ip {
						found = i.Name
					}
				}
			}
		}
		return nil
	})
	return found
}
