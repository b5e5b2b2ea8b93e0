package kubetest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ambitmesh/ambit/internal/lab"
)

// A test cluster is the seed's: nodes master and worker1, each a kubelet
// with its own containerd, and a control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler). It is built on the lab's
// network (internal/lab): every node is a network namespace on the lab's
// wire, and the control plane runs in the wire's namespace, where the API
// server listens on the lab's control address. Nothing of it is in the
// host's network namespace.
//
// Two kubelets on one machine need two filesystems' worth of the paths a
// kubelet and containerd take for their own (/var/lib/kubelet,
// /run/containerd, /etc/cni/net.d, /opt/cni/bin, /var/lib/cni,
// /run/netns, the pod logs): each node also gets a mount namespace,
// pinned to a file, in which those paths are bind mounts of the node's
// directory. So the node's own pods (the node agent's DaemonSet pod with
// its hostPath volumes among them) see the standard paths, as on a real
// node. Each node's processes (containerd, its shims, kubelet, the pods)
// live in a cgroup of the node's, in every hierarchy; Down kills what is
// in them and removes them.
//
// There is no kube-proxy: a ClusterIP is routed only where the mesh
// routes it. There is no DNS either (issue "Names and IPv6").

// ClusterSpec is what UpCluster builds.
type ClusterSpec struct {
	Name   string   // default "ambit"; a DNS label of at most 8 characters
	Nodes  []string // default the seed's: master and worker1
	Images []string // OCI layout tars imported into every node's containerd, besides the pause and test images
	Log    io.Writer
}

// Cluster is a running test cluster. It is written to its directory as
// cluster.json, so another process (`make k8s-down`, a test) can find it.
type Cluster struct {
	Name       string        `json:"name"`
	Dir        string        `json:"dir"`
	WireNS     string        `json:"wireNetns"` // the namespace the control plane and kubectl run in
	APIServer  string        `json:"apiServer"` // https://172.30.255.254:6443, reachable in WireNS and from the nodes and pods
	Kubeconfig string        `json:"kubeconfig"`
	CA         []byte        `json:"ca"`
	Nodes      []ClusterNode `json:"nodes"`
	// CreatedDirs are mount points made on the host's filesystem for the
	// nodes' bind mounts (empty directories); Down removes them.
	CreatedDirs []string `json:"createdDirs"`

	AdminCert []byte `json:"adminCert"`
	AdminKey  []byte `json:"adminKey"`
}

// ClusterNode is one kubelet.
type ClusterNode struct {
	Name    string       `json:"name"`
	NetNS   string       `json:"netns"`
	Addr    netip.Addr   `json:"addr"` // the node's InternalIP, on the wire
	PodCIDR netip.Prefix `json:"podCIDR"`
	Dir     string       `json:"dir"`
	MountNS string       `json:"mountNS"` // the file its mount namespace is pinned to
	Cgroup  string       `json:"cgroup"`  // its cgroup, the same path in every hierarchy
	PIDNS   string       `json:"pidNS"`   // its PID namespace, for nsenter (see pidNS)
}

// ClusterRoot holds every test cluster's files: /var/lib/ambit-k8s/NAME.
const ClusterRoot = "/var/lib/ambit-k8s"

// apiPort is the API server's port on the wire.
const apiPort = 6443

// PauseImage is the sandbox image the nodes' containerd uses; TestImage
// runs the test pods (tools/testapp). Both are built from this module.
const (
	PauseImage = "registry.k8s.io/pause:3.10"
	TestImage  = "ambit.test/testapp:dev"
)

// the host paths each node's mount namespace replaces with its own.
var nodePaths = []struct{ path, sub string }{
	{"/etc/cni/net.d", "cni/net.d"},
	{"/opt/cni/bin", "cni/bin"},
	{"/var/lib/cni", "cni/state"},
	{"/var/lib/kubelet", "kubelet"},
	{"/var/lib/containerd", "containerd"},
	{"/run/containerd", "run/containerd"},
	{"/run/netns", "run/netns"},
	{"/var/run/ztunnel", "run/ztunnel"},     // the ZDS socket's directory (zds.DefaultSocket)
	{"/var/run/ambit", "run/ambit"},         // the CNI plugin's socket to the agent (cni.DefaultAgentSocket)
	{"/var/run/istio-cni", "run/istio-cni"}, // istio-cni's: its plugin's socket to its agent, its logs
	{"/var/log/pods", "log/pods"},
	{"/var/log/containers", "log/containers"},
}

func (s *ClusterSpec) fill() error {
	if s.Name == "" {
		s.Name = "ambit"
	}
	if len(s.Name) > 8 || strings.Trim(s.Name, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return fmt.Errorf("cluster name %q: want at most 8 of a-z, 0-9", s.Name)
	}
	if len(s.Nodes) == 0 {
		s.Nodes = []string{"master", "worker1"}
	}
	if s.Log == nil {
		s.Log = io.Discard
	}
	return nil
}

func labName(cluster string) string { return "k8s" + cluster }

// UpCluster builds and starts a cluster, after removing what an earlier
// one of the same name left. On error it removes what it made. It returns
// once every node is Ready and the default namespace's service account
// exists (pods can be created).
func UpCluster(ctx context.Context, spec ClusterSpec) (c *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("kubetest: a cluster needs root (namespaces, mounts, cgroups)")
	}
	if err := spec.fill(); err != nil {
		return nil, err
	}
	if err := lockMachine(ctx); err != nil {
		return nil, err
	}
	bins := BinDir()
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"} {
		if _, err := os.Stat(filepath.Join(bins, b)); err != nil {
			return nil, fmt.Errorf("kubetest: %s not in %s (run `make k8s-bins`, or set K8S_BIN): %w", b, bins, err)
		}
	}
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "mount", "umount"} {
		if _, err := exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("kubetest: %s is not installed (`make deps` installs containerd, runc and the CNI plugins): %w", b, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return nil, fmt.Errorf("kubetest: the CNI plugins are not installed (apt-get install containernetworking-plugins): %w", err)
	}
	if err := DownCluster(spec.Name); err != nil {
		return nil, fmt.Errorf("kubetest: removing the earlier cluster %s: %w", spec.Name, err)
	}
	c = &Cluster{Name: spec.Name, Dir: filepath.Join(ClusterRoot, spec.Name)}
	defer func() {
		if err != nil {
			if derr := DownCluster(spec.Name); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}()
	for _, d := range []string{"pids", "logs", "images"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	log := spec.Log
	fmt.Fprintf(log, "cluster %s: network (lab %s)\n", c.Name, labName(c.Name))
	if err := c.network(spec.Nodes); err != nil {
		return nil, err
	}
	if err := c.save(); err != nil {
		return nil, err
	}
	images, err := buildTestImages(ctx, filepath.Join(c.Dir, "images"))
	if err != nil {
		return nil, err
	}
	images = append(images, spec.Images...)
	fmt.Fprintf(log, "cluster %s: certificates and control plane on %s\n", c.Name, c.APIServer)
	if err := c.controlPlane(ctx, bins); err != nil {
		return nil, err
	}
	if err := c.save(); err != nil {
		return nil, err
	}
	for i := range c.Nodes {
		fmt.Fprintf(log, "cluster %s: node %s (%s, pods %s)\n", c.Name, c.Nodes[i].Name, c.Nodes[i].Addr, c.Nodes[i].PodCIDR)
		if err := c.startNode(ctx, &c.Nodes[i], bins, images); err != nil {
			return nil, fmt.Errorf("kubetest: node %s: %w", c.Nodes[i].Name, err)
		}
		if err := c.save(); err != nil {
			return nil, err
		}
	}
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "cluster %s: %d nodes ready\n", c.Name, len(c.Nodes))
	return c, nil
}

// network is the lab's: the wire, a namespace per node with its pod
// bridge, routes between the nodes' pod networks. The wire routes each
// node's pods to it too, so the API server can answer a pod.
func (c *Cluster) network(nodes []string) error {
	var doc strings.Builder
	fmt.Fprintf(&doc, "name: %s\nnodes:\n", labName(c.Name))
	for i, n := range nodes {
		fmt.Fprintf(&doc, "- {name: %s, podCIDR: 10.244.%d.0/24}\n", n, i)
	}
	t, err := lab.ParseTopology("cluster "+c.Name, []byte(doc.String()))
	if err != nil {
		return fmt.Errorf("kubetest: %w", err)
	}
	if err := lab.Up(t); err != nil {
		return fmt.Errorf("kubetest: %w", err)
	}
	c.WireNS = t.WireNamespace()
	c.APIServer = "https://" + net.JoinHostPort(t.WireAddr().String(), strconv.Itoa(apiPort))
	for _, n := range t.Nodes {
		node := ClusterNode{
			Name: n.Name, NetNS: t.NodeNamespace(n.Name), Addr: t.NodeAddr(n.Name),
			PodCIDR: netip.MustParsePrefix(n.PodCIDR), Dir: filepath.Join(c.Dir, "nodes", n.Name),
			Cgroup: "/ambit-k8s-" + c.Name + "-" + n.Name,
		}
		node.MountNS = filepath.Join(c.Dir, "mnt", n.Name)
		if out, err := exec.Command("ip", "-n", c.WireNS, "route", "add", node.PodCIDR.String(), "via", node.Addr.String()).CombinedOutput(); err != nil {
			return fmt.Errorf("kubetest: route to %s's pods on the wire: %v: %s", n.Name, err, out)
		}
		c.Nodes = append(c.Nodes, node)
	}
	return nil
}

func (c *Cluster) save() error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(c.Dir, "cluster.json"), b, 0o600)
}

// LoadCluster finds a running cluster by name.
func LoadCluster(name string) (*Cluster, error) {
	b, err := os.ReadFile(filepath.Join(ClusterRoot, name, "cluster.json"))
	if err != nil {
		return nil, fmt.Errorf("kubetest: cluster %s: %w (is it up? `make k8s-up`)", name, err)
	}
	var c Cluster
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("kubetest: cluster %s: %w", name, err)
	}
	return &c, nil
}

// controlPlane writes the certificates and kubeconfigs and starts etcd,
// the API server, the controller-manager and the scheduler in the wire's
// namespace, and waits for the API server.
func (c *Cluster) controlPlane(ctx context.Context, bins string) error {
	pki := filepath.Join(c.Dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return err
	}
	ca, err := newClusterCA("ambit-k8s-" + c.Name)
	if err != nil {
		return err
	}
	c.CA = ca.certPEM
	host, _, _ := net.SplitHostPort(strings.TrimPrefix(c.APIServer, "https://"))
	serving, err := ca.issue("kube-apiserver", nil,
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP(host), net.ParseIP("10.96.0.1")}, true)
	if err != nil {
		return err
	}
	// The API server's identity to the kubelets (exec, logs).
	kubeletClient, err := ca.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil, false)
	if err != nil {
		return err
	}
	admin, err := ca.issue("kubernetes-admin", []string{"system:masters"}, nil, nil, false)
	if err != nil {
		return err
	}
	c.AdminCert, c.AdminKey = admin.cert, admin.key
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	saDER, _ := x509.MarshalPKCS8PrivateKey(saKey)
	files := map[string][]byte{
		"ca.crt": ca.certPEM, "apiserver.crt": serving.cert, "apiserver.key": serving.key,
		"kubelet-client.crt": kubeletClient.cert, "kubelet-client.key": kubeletClient.key,
		"sa.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saDER}),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(pki, name), data, 0o600); err != nil {
			return err
		}
	}
	c.Kubeconfig = filepath.Join(c.Dir, "admin.kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, c.kubeconfig("kubernetes-admin", admin), 0o600); err != nil {
		return err
	}
	for _, comp := range []struct{ file, cn string }{
		{"controller-manager", "system:kube-controller-manager"},
		{"scheduler", "system:kube-scheduler"},
	} {
		l, err := ca.issue(comp.cn, nil, nil, nil, false)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(c.Dir, comp.file+".kubeconfig"), c.kubeconfig(comp.cn, l), 0o600); err != nil {
			return err
		}
	}
	for i := range c.Nodes {
		n := &c.Nodes[i]
		l, err := ca.issue("system:node:"+n.Name, []string{"system:nodes"}, nil, nil, false)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(n.Dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(n.Dir, "kubelet.kubeconfig"), c.kubeconfig("system:node:"+n.Name, l), 0o600); err != nil {
			return err
		}
	}

	wire := []string{"--net=/run/netns/" + c.WireNS}
	etcdURL := "http://127.0.0.1:2379"
	if err := c.start("etcd", wire, "", filepath.Join(bins, "etcd"),
		"--name=default", "--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=default=http://127.0.0.1:2380", "--log-level=warn"); err != nil {
		return err
	}
	p := func(name string) string { return filepath.Join(pki, name) }
	if err := c.start("kube-apiserver", wire, "", filepath.Join(bins, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address="+host, "--advertise-address="+host, "--secure-port="+strconv.Itoa(apiPort),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--kubelet-client-certificate="+p("kubelet-client.crt"), "--kubelet-client-key="+p("kubelet-client.key"),
		// The nodes have no names in DNS; the API server reaches a kubelet
		// by its InternalIP. (It does not verify the kubelet's self-signed
		// serving certificate: no --kubelet-certificate-authority, as
		// kubeadm's default.)
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.key"), "--service-account-signing-key-file="+p("sa.key"),
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--allow-privileged=true", "--v=0"); err != nil {
		return err
	}
	if err := c.waitAPI(ctx); err != nil {
		return err
	}
	kcm := filepath.Join(c.Dir, "controller-manager.kubeconfig")
	if err := c.start("kube-controller-manager", wire, "", filepath.Join(bins, "kube-controller-manager"),
		"--kubeconfig="+kcm, "--authentication-kubeconfig="+kcm, "--authorization-kubeconfig="+kcm,
		"--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
		"--use-service-account-credentials", "--leader-elect=false",
		"--bind-address=127.0.0.1", "--v=0"); err != nil {
		return err
	}
	sched := filepath.Join(c.Dir, "scheduler.kubeconfig")
	return c.start("kube-scheduler", wire, "", filepath.Join(bins, "kube-scheduler"),
		"--kubeconfig="+sched, "--authentication-kubeconfig="+sched, "--authorization-kubeconfig="+sched,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--v=0")
}

func (c *Cluster) kubeconfig(user string, l leaf) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: %[1]s
  cluster:
    server: %[2]s
    certificate-authority-data: %[3]s
users:
- name: %[4]s
  user:
    client-certificate-data: %[5]s
    client-key-data: %[6]s
contexts:
- name: %[1]s
  context: {cluster: %[1]s, user: %[4]s}
current-context: %[1]s
`, "ambit-"+c.Name, c.APIServer, b64(c.CA), user, b64(l.cert), b64(l.key))
}
