// Package lab builds a small cluster on one Linux machine out of network
// namespaces: a namespace per node and per pod, pods joined to their node
// by veth and a bridge, nodes joined by an underlay "wire". Every address
// lives inside the lab's own namespaces; nothing in the host's namespace
// changes, and Down removes all of it.
package lab

import (
	_ "embed"
	"fmt"
	"net/netip"
	"os"
	"regexp"

	"github.com/ambitmesh/ambit/internal/config"
	"go.yaml.in/yaml/v3"
)

// Topology is what the lab file describes.
type Topology struct {
	Name     string          `yaml:"name"`  // prefix of every namespace; default "seed"
	Nodes    []Node          `yaml:"nodes"` // at least one
	Pods     []Pod           `yaml:"pods"`
	Services []Service       `yaml:"services"`
	Policies []config.Policy `yaml:"policies"` // ztunnel's local-config form, copied into the mesh config

	data []byte // the file, for copying its policies verbatim
}

// Service is a virtual IP in front of the pods its selector matches.
type Service struct {
	Name      string            `yaml:"name"`
	Namespace string            `yaml:"namespace"` // default "default"
	VIP       string            `yaml:"vip"`
	Ports     map[uint16]uint16 `yaml:"ports"` // service port -> pod port
	Selector  map[string]string `yaml:"selector"`

	vip netip.Addr
}

// Hostname is the service's cluster DNS name.
func (s *Service) Hostname() string { return s.Name + "." + s.Namespace + ".svc.cluster.local" }

// Selects reports whether the service's selector matches the pod.
func (s *Service) Selects(p *Pod) bool {
	if len(s.Selector) == 0 || p.Namespace != s.Namespace {
		return false
	}
	for k, v := range s.Selector {
		if p.Labels[k] != v {
			return false
		}
	}
	return true
}

// Node is a machine of the cluster.
type Node struct {
	Name    string `yaml:"name"`
	PodCIDR string `yaml:"podCIDR"` // e.g. 10.244.0.0/24; the node takes its first address

	cidr netip.Prefix
}

// Pod is a workload's network namespace on a node.
type Pod struct {
	Name           string            `yaml:"name"`
	Node           string            `yaml:"node"`
	IP             string            `yaml:"ip"`
	Namespace      string            `yaml:"namespace"`      // default "default"
	ServiceAccount string            `yaml:"serviceAccount"` // default "default"
	Labels         map[string]string `yaml:"labels"`
	Mesh           *bool             `yaml:"mesh"` // in the mesh (captured); default true
	Serve          *Server           `yaml:"serve"`

	ip netip.Addr
}

// Server is a built-in server the lab runs in a pod.
type Server struct {
	Protocol string `yaml:"protocol"` // http or tcp-echo
	Port     uint16 `yaml:"port"`
}

// InMesh reports whether the pod is captured.
func (p *Pod) InMesh() bool { return p.Mesh == nil || *p.Mesh }

// Addr is the pod's IP.
func (p *Pod) Addr() netip.Addr { return p.ip }

// Gateway is the node's address in its pod CIDR (the pods' default route).
func (n *Node) Gateway() netip.Addr { return n.cidr.Addr().Next() }

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

// LoadTopology reads a topology file.
func LoadTopology(path string) (*Topology, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	return ParseTopology(path, data)
}

// ParseTopology checks a topology document.
func ParseTopology(name string, data []byte) (*Topology, error) {
	var t Topology
	if err := config.Decode(name, data, &t); err != nil {
		return nil, err
	}
	t.data = data
	if err := t.validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &t, nil
}

func (t *Topology) validate() error {
	if t.Name == "" {
		t.Name = "seed"
	}
	if !dnsLabel.MatchString(t.Name) || len(t.Name) > 12 {
		return fmt.Errorf("name %q: want a short lower-case name (at most 12 of a-z, 0-9, -)", t.Name)
	}
	if len(t.Nodes) == 0 {
		return fmt.Errorf("nodes: at least one node")
	}
	if len(t.Nodes) > 200 {
		return fmt.Errorf("nodes: at most 200")
	}
	nodes := map[string]*Node{}
	for i := range t.Nodes {
		n := &t.Nodes[i]
		if !dnsLabel.MatchString(n.Name) {
			return fmt.Errorf("nodes[%d].name %q: want a DNS label", i, n.Name)
		}
		if nodes[n.Name] != nil {
			return fmt.Errorf("nodes[%d].name: node %q defined twice", i, n.Name)
		}
		p, err := netip.ParsePrefix(n.PodCIDR)
		if err != nil || !p.Addr().Is4() || p.Bits() > 30 || p.Masked() != p {
			return fmt.Errorf("nodes[%d].podCIDR %q: want an IPv4 network such as 10.244.0.0/24", i, n.PodCIDR)
		}
		for _, o := range t.Nodes[:i] {
			if o.cidr.Overlaps(p) {
				return fmt.Errorf("nodes[%d].podCIDR %s overlaps node %s's %s", i, p, o.Name, o.cidr)
			}
		}
		n.cidr = p
		nodes[n.Name] = n
	}
	pods := map[string]bool{}
	ips := map[netip.Addr]string{}
	for i := range t.Pods {
		p := &t.Pods[i]
		if !dnsLabel.MatchString(p.Name) || len(p.Name) > 20 {
			return fmt.Errorf("pods[%d].name %q: want a DNS label of at most 20 characters", i, p.Name)
		}
		if pods[p.Name] {
			return fmt.Errorf("pods[%d].name: pod %q defined twice", i, p.Name)
		}
		pods[p.Name] = true
		n := nodes[p.Node]
		if n == nil {
			return fmt.Errorf("pods[%d].node: no node %q", i, p.Node)
		}
		ip, err := netip.ParseAddr(p.IP)
		if err != nil || !n.cidr.Contains(ip) || ip == n.cidr.Addr() || ip == n.Gateway() {
			return fmt.Errorf("pods[%d].ip %q: want an address in node %s's %s other than the network and gateway", i, p.IP, n.Name, n.cidr)
		}
		if other, dup := ips[ip]; dup {
			return fmt.Errorf("pods[%d].ip %s: already pod %s's", i, ip, other)
		}
		ips[ip] = p.Name
		p.ip = ip
		if p.Namespace == "" {
			p.Namespace = "default"
		}
		if p.ServiceAccount == "" {
			p.ServiceAccount = "default"
		}
		if s := p.Serve; s != nil {
			if s.Protocol != "http" && s.Protocol != "tcp-echo" {
				return fmt.Errorf("pods[%d].serve.protocol %q: want http or tcp-echo", i, s.Protocol)
			}
			if s.Port == 0 {
				return fmt.Errorf("pods[%d].serve.port: required", i)
			}
		}
	}
	svcs := map[string]bool{}
	for i := range t.Services {
		s := &t.Services[i]
		if s.Namespace == "" {
			s.Namespace = "default"
		}
		if !dnsLabel.MatchString(s.Name) {
			return fmt.Errorf("services[%d].name %q: want a DNS label", i, s.Name)
		}
		if svcs[s.Namespace+"/"+s.Name] {
			return fmt.Errorf("services[%d].name: service %s/%s defined twice", i, s.Namespace, s.Name)
		}
		svcs[s.Namespace+"/"+s.Name] = true
		vip, err := netip.ParseAddr(s.VIP)
		if err != nil || !vip.Is4() {
			return fmt.Errorf("services[%d].vip %q: want an IPv4 address", i, s.VIP)
		}
		if other, dup := ips[vip]; dup {
			return fmt.Errorf("services[%d].vip %s: already pod %s's", i, vip, other)
		}
		if len(s.Ports) == 0 {
			return fmt.Errorf("services[%d].ports: at least one", i)
		}
		s.vip = vip
	}
	// The policies must stand in a mesh config on their own.
	if _, err := config.Parse("policies of the topology", t.policyYAML()); err != nil {
		return err
	}
	return nil
}

// Pod finds a pod by name.
func (t *Topology) Pod(name string) *Pod {
	for i := range t.Pods {
		if t.Pods[i].Name == name {
			return &t.Pods[i]
		}
	}
	return nil
}

// PodAt finds the pod at ip, or the first pod behind the service whose VIP is ip.
func (t *Topology) PodAt(ip netip.Addr) *Pod {
	for i := range t.Pods {
		if t.Pods[i].ip == ip {
			return &t.Pods[i]
		}
	}
	for i := range t.Services {
		if s := &t.Services[i]; s.vip == ip {
			for j := range t.Pods {
				if s.Selects(&t.Pods[j]) {
					return &t.Pods[j]
				}
			}
		}
	}
	return nil
}

// NodeIndex is a node's position in the topology (its wire port is n<i>).
func (t *Topology) NodeIndex(name string) int {
	for i := range t.Nodes {
		if t.Nodes[i].Name == name {
			return i
		}
	}
	return -1
}

// Node finds a node by name.
func (t *Topology) Node(name string) *Node {
	for i := range t.Nodes {
		if t.Nodes[i].Name == name {
			return &t.Nodes[i]
		}
	}
	return nil
}

// Namespace names, all under the lab's prefix so Down finds them.
func (t *Topology) prefix() string         { return "ambit-" + t.Name + "-" }
func (t *Topology) wireNS() string         { return t.prefix() + "wire" }
func (t *Topology) nodeNS(n string) string { return t.prefix() + "node-" + n }
func (t *Topology) podNS(p string) string  { return t.prefix() + "pod-" + p }

// NodeNamespace and PodNamespace are the names of the namespaces, for
// `ip netns exec` and the like.
func (t *Topology) NodeNamespace(node string) string { return t.nodeNS(node) }
func (t *Topology) PodNamespace(pod string) string   { return t.podNS(pod) }

// WireNamespace is the wire's namespace, where the lab's control plane runs.
func (t *Topology) WireNamespace() string { return t.wireNS() }

// WireAddr is the control plane's address on the wire.
func (t *Topology) WireAddr() netip.Addr { return wireAddr.Addr() }

// NodeAddr is a node's address on the wire; invalid for no such node.
func (t *Topology) NodeAddr(node string) netip.Addr {
	i := t.NodeIndex(node)
	if i < 0 {
		return netip.Addr{}
	}
	return underlay(i).Addr()
}

// wireAddr is the wire's own address (the control plane's; see ControlAddr).
var wireAddr = netip.MustParsePrefix("172.30.255.254/16")

// underlay is node i's address on the wire (the nodes' own network).
func underlay(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 30, byte((i + 1) >> 8), byte((i + 1) & 0xff)}), 16)
}

// policyYAML is the topology file's policies: section, verbatim (tags and all).
func (t *Topology) policyYAML() []byte {
	var root yaml.Node
	if yaml.Unmarshal(t.data, &root) != nil || len(root.Content) == 0 {
		return nil
	}
	m := root.Content[0]
	for i := 0; m.Kind == yaml.MappingNode && i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == "policies" {
			out, err := yaml.Marshal(&yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{m.Content[i], m.Content[i+1]}})
			if err == nil {
				return out
			}
		}
	}
	return nil
}

// DefaultTopology is the seed's cluster, the same as examples/seed-lab.yaml.
//
//go:embed seed.yaml
var DefaultTopology []byte
