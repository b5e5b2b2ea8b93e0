package kubetest

import (
	"bytes"
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
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
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
	{"/var/run/ztunnel", "run/ztunnel"}, // the ZDS socket's directory (zds.DefaultSocket)
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

// startNode gives the node its directories, mount namespace and cgroups,
// then starts its containerd, imports the images and starts its kubelet.
func (c *Cluster) startNode(ctx context.Context, n *ClusterNode, bins string, images []string) error {
	for _, p := range nodePaths {
		if err := os.MkdirAll(filepath.Join(n.Dir, p.sub), 0o755); err != nil {
			return err
		}
	}
	// The standard CNI plugins, copied: the node agent installs its own
	// plugin beside them, on this node only.
	plugins, err := filepath.Glob("/usr/lib/cni/*")
	if err != nil {
		return err
	}
	for _, src := range plugins {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(n.Dir, "cni/bin", filepath.Base(src)), data, 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(n.Dir, "cni/net.d", "10-bridge.conflist"), bridgeConflist(n.PodCIDR), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(n.Dir, "containerd.toml"), []byte(containerdConfig), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(n.Dir, "kubelet.yaml"), kubeletConfig(n, c), 0o644); err != nil {
		return err
	}
	if err := c.mountNS(n); err != nil {
		return err
	}
	for _, g := range []string{"/runtime", "/pods"} { // containerd and kubelet; the pods (the kubelet's cgroupRoot)
		if err := makeCgroup(n.Cgroup + g); err != nil {
			return err
		}
	}
	ns := []string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS}
	if err := c.start(n.Name+"-containerd", ns, n.Cgroup+"/runtime", "containerd", "--config", filepath.Join(n.Dir, "containerd.toml")); err != nil {
		return err
	}
	if err := c.waitContainerd(ctx, n); err != nil {
		return err
	}
	for _, img := range images {
		if err := c.ImportImage(ctx, n.Name, img); err != nil {
			return err
		}
	}
	return c.start(n.Name+"-kubelet", ns, n.Cgroup+"/runtime", filepath.Join(bins, "kubelet"),
		"--config="+filepath.Join(n.Dir, "kubelet.yaml"),
		"--kubeconfig="+filepath.Join(n.Dir, "kubelet.kubeconfig"),
		"--hostname-override="+n.Name, "--node-ip="+n.Addr.String(), "--v=1")
}

// mountNS makes the node's mount namespace: a slave of the host's (the
// host's mounts appear in it, none of its own leak out), with the node's
// directories over the standard paths, then made shared inside, so pods
// can ask for HostToContainer propagation (the node agent's view of
// /run/netns needs it). It is pinned to a bind mount on a file in a
// private directory, as `unshare --mount=FILE` requires.
func (c *Cluster) mountNS(n *ClusterNode) error {
	dir := filepath.Dir(n.MountNS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !isMountPoint(dir) {
		if err := command("mount", "--bind", dir, dir); err != nil {
			return err
		}
		if err := command("mount", "--make-private", dir); err != nil {
			return err
		}
	}
	if err := os.WriteFile(n.MountNS, nil, 0o600); err != nil {
		return err
	}
	if err := command("unshare", "--mount="+n.MountNS, "--propagation", "slave", "true"); err != nil {
		return err
	}
	for _, p := range nodePaths {
		made, err := mkdirAll(p.path)
		c.CreatedDirs = append(c.CreatedDirs, made...)
		if serr := c.save(); err != nil || serr != nil {
			return errors.Join(err, serr)
		}
		if err := command("nsenter", "--mount="+n.MountNS, "--", "mount", "--bind", filepath.Join(n.Dir, p.sub), p.path); err != nil {
			return err
		}
	}
	return command("nsenter", "--mount="+n.MountNS, "--", "mount", "--make-rshared", "/")
}

// mkdirAll makes dir and the parents it lacks, and returns those it made,
// the deepest last.
func mkdirAll(dir string) ([]string, error) {
	var missing []string
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		}
		missing = append([]string{d}, missing...)
	}
	for i, d := range missing {
		if err := os.Mkdir(d, 0o755); err != nil {
			return missing[:i], err
		}
	}
	return missing, nil
}

func isMountPoint(dir string) bool {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func command(argv ...string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// start runs argv under nsenter (entering the namespaces nsArgs names) as
// a process of its own session, its output in the cluster's logs, its pid
// recorded for Down, and (if cgroup is set) moved into that cgroup at once,
// before it starts anything of its own.
func (c *Cluster) start(tag string, nsArgs []string, cgroup, bin string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(c.Dir, "logs", tag+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", append(append(nsArgs, "--", bin), args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("kubetest: start %s: %w", tag, err)
	}
	pid := cmd.Process.Pid
	if err := os.WriteFile(filepath.Join(c.Dir, "pids", tag+".pid"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return err
	}
	// Reaped here, when it ends: a process of the test, not a zombie.
	go func() { _ = cmd.Wait() }()
	if cgroup != "" {
		if err := joinCgroup(cgroup, pid); err != nil {
			return fmt.Errorf("kubetest: %s into its cgroup: %w", tag, err)
		}
	}
	return nil
}

// Log is the tail of a component's log (etcd, kube-apiserver,
// master-kubelet, worker1-containerd, ...), for a failing test.
func (c *Cluster) Log(tag string, max int) string {
	b, err := os.ReadFile(filepath.Join(c.Dir, "logs", tag+".log"))
	if err != nil {
		return err.Error()
	}
	return string(tail(b, max))
}

// RestConfig is the admin's client-go configuration; its connections are
// made in the wire's namespace.
func (c *Cluster) RestConfig() *rest.Config {
	wire := c.WireNS
	return &rest.Config{
		Host:            c.APIServer,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.CA, CertData: c.AdminCert, KeyData: c.AdminKey},
		QPS:             100, Burst: 200,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ctx, wire, addr)
		},
	}
}

func dialIn(ctx context.Context, nsName, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("kubetest: dial %s: want an IP address and port", addr)
	}
	h, err := netns.GetFromName(nsName)
	if err != nil {
		return nil, fmt.Errorf("kubetest: netns %s: %w", nsName, err)
	}
	defer h.Close()
	return nsutil.DialTCP(ctx, h, netip.AddrPort{}, ap, nil)
}

// Client is client-go for the admin.
func (c *Cluster) Client() (*kubernetes.Clientset, error) {
	return kubernetes.NewForConfig(c.RestConfig())
}

// Kubectl runs the cluster's kubectl as the admin, in the wire's namespace.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return c.InWire(ctx, nil, filepath.Join(BinDir(), "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
}

// InWire runs a command in the wire's namespace (helm, say, with
// KUBECONFIG=c.Kubeconfig in env) and returns its combined output.
func (c *Cluster) InWire(ctx context.Context, env []string, bin string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + c.WireNS, "--", bin}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, bytes.TrimSpace(tail(out, 2048)))
	}
	return out, nil
}

// OnNode runs a command in a node's network and mount namespaces (as a
// process on that node would run).
func (c *Cluster) OnNode(ctx context.Context, node string, argv ...string) ([]byte, error) {
	n := c.Node(node)
	if n == nil {
		return nil, fmt.Errorf("kubetest: no node %q", node)
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS, "--"}, argv...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("on %s: %s: %w: %s", node, strings.Join(argv, " "), err, bytes.TrimSpace(tail(out, 2048)))
	}
	return out, nil
}

// Node finds a node by name.
func (c *Cluster) Node(name string) *ClusterNode {
	for i := range c.Nodes {
		if c.Nodes[i].Name == name {
			return &c.Nodes[i]
		}
	}
	return nil
}

// ImportImage loads an OCI layout tar into a node's containerd, where the
// kubelet finds it (the k8s.io namespace); pods use it with
// imagePullPolicy Never or IfNotPresent.
func (c *Cluster) ImportImage(ctx context.Context, node, tarFile string) error {
	abs, err := filepath.Abs(tarFile)
	if err != nil {
		return err
	}
	_, err = c.OnNode(ctx, node, "ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io", "images", "import", abs)
	return err
}

func (c *Cluster) waitAPI(ctx context.Context) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.CA)
	cfg := c.RestConfig()
	tr, err := rest.TransportFor(cfg)
	if err != nil {
		return err
	}
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	return poll(ctx, 2*time.Minute, "the API server's /readyz", func() error {
		resp, err := hc.Get(c.APIServer + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	}, c.Log("kube-apiserver", 2048))
}

func (c *Cluster) waitContainerd(ctx context.Context, n *ClusterNode) error {
	return poll(ctx, time.Minute, n.Name+"'s containerd", func() error {
		_, err := c.OnNode(ctx, n.Name, "ctr", "--address", "/run/containerd/containerd.sock", "version")
		return err
	}, "")
}

// waitReady waits for every node to be Ready and for the default
// namespace's service account (the controller-manager makes it).
func (c *Cluster) waitReady(ctx context.Context) error {
	kc, err := c.Client()
	if err != nil {
		return err
	}
	return poll(ctx, 3*time.Minute, "the nodes Ready", func() error {
		nodes, err := kc.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		ready := 0
		for _, n := range nodes.Items {
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					ready++
				}
			}
		}
		if ready < len(c.Nodes) {
			return fmt.Errorf("%d of %d nodes Ready", ready, len(c.Nodes))
		}
		if _, err := kc.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("the default service account: %w", err)
		}
		return nil
	}, "")
}

// poll calls f until it succeeds, ctx ends or limit passes (a bound for a
// stuck component, not a speed check: each wait ends at the first success).
func poll(ctx context.Context, limit time.Duration, what string, f func() error, logTail string) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("kubetest: waiting for %s: %v", what, err)
			if logTail != "" {
				msg += "\n" + logTail
			}
			return errors.New(msg)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// DownCluster stops everything a cluster of that name started and removes
// it all: processes (by pid and by cgroup, so pods and shims too),
// cgroups, the nodes' mount namespaces, the lab's network namespaces (and
// every link, route and rule in them), the directories it made on the
// host, its files. It is safe to call when nothing is there.
func DownCluster(name string) error {
	dir := filepath.Join(ClusterRoot, name)
	c, _ := LoadCluster(name)
	var errs []error
	// The kubelets first, so they do not restart what is being killed;
	// then the rest, all at once.
	pidFiles, _ := filepath.Glob(filepath.Join(dir, "pids", "*.pid"))
	var kubelets, others []string
	for _, f := range pidFiles {
		if strings.HasSuffix(f, "-kubelet.pid") {
			kubelets = append(kubelets, f)
		} else {
			others = append(others, f)
		}
	}
	stopPidFiles(kubelets)
	stopPidFiles(others)
	// Every cgroup of the cluster's nodes, found by name so that a cluster
	// whose state file is gone is still cleaned.
	groups, _ := filepath.Glob("/sys/fs/cgroup/pids/ambit-k8s-" + name + "-*")
	for _, g := range groups {
		cg := strings.TrimPrefix(g, "/sys/fs/cgroup/pids")
		if err := killCgroup(cg); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range hierarchies() {
		gs, _ := filepath.Glob(filepath.Join(h, "ambit-k8s-"+name+"-*"))
		for _, g := range gs {
			if err := removeCgroupDir(g); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// The mount namespaces: unmount their pins (the namespaces end with
	// their last process), then the private directory the pins were in.
	mnt := filepath.Join(dir, "mnt")
	pins, _ := filepath.Glob(filepath.Join(mnt, "*"))
	for _, p := range pins {
		if isMountPoint(p) {
			if err := command("umount", p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if isMountPoint(mnt) {
		if err := command("umount", mnt); err != nil {
			errs = append(errs, err)
		}
	}
	if err := lab.Down(labName(name)); err != nil {
		errs = append(errs, err)
	}
	if c != nil {
		for _, d := range slices.Backward(c.CreatedDirs) {
			if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove the mount point %s made for the nodes: %w", d, err))
			}
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kubetest: cluster %s down: %w", name, err)
	}
	return nil
}

// stopPidFiles sends TERM to the processes the files name, waits up to
// 2 s for them to end, KILLs the rest and removes the files. (The API
// server drains its watches for a minute when asked to stop; a test
// cluster's state is thrown away, so it is not waited for.)
func stopPidFiles(files []string) {
	var pids []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		os.Remove(f)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 && syscall.Kill(pid, syscall.SIGTERM) == nil {
			pids = append(pids, pid)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// alive: the process exists and is not a zombie. (A process whose parent
// is gone is reaped by init, which here may take a while: its zombie
// answers kill(pid, 0).)
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

// Leftovers lists what of the cluster named name is still on the machine
// (for tests of Down): network namespaces, cgroups, mounts, live processes
// in its cgroups, its directory.
func Leftovers(name string) []string {
	var out []string
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "ambit-"+labName(name)+"-") {
			out = append(out, "netns "+e.Name())
		}
	}
	for _, h := range hierarchies() {
		gs, _ := filepath.Glob(filepath.Join(h, "ambit-k8s-"+name+"-*"))
		for _, g := range gs {
			out = append(out, "cgroup "+g)
		}
	}
	dir := filepath.Join(ClusterRoot, name)
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for line := range strings.SplitSeq(string(mi), "\n") {
			if strings.Contains(line, dir) {
				out = append(out, "mount "+line)
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cgroup")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
		if err == nil && bytes.Contains(b, []byte("/ambit-k8s-"+name+"-")) && alive(pid) {
			out = append(out, fmt.Sprintf("process %d", pid))
		}
	}
	if _, err := os.Stat(dir); err == nil {
		out = append(out, "directory "+dir)
	}
	return out
}

// HostPaths reports which of the paths the nodes bind over exist on the
// host: Down must leave them as Up found them.
func HostPaths() map[string]bool {
	m := map[string]bool{}
	for _, p := range nodePaths {
		_, err := os.Lstat(p.path)
		m[p.path] = err == nil
	}
	return m
}
