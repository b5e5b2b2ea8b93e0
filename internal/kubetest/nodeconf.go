package kubetest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// bridgeConflist is the node's CNI network: the standard bridge plugin on
// the lab's pod bridge (cni0, which already holds the gateway address) and
// host-local addresses from the node's pod CIDR. No masquerade: a pod's
// address is what its peers see, across nodes too.
func bridgeConflist(cidr netip.Prefix) []byte {
	return fmt.Appendf(nil, `{
  "cniVersion": "1.0.0",
  "name": "ambit-k8s",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
    }
  ]
}
`, cidr.String())
}

// containerdConfig is each node's containerd (1.6, config version 2), all
// its paths the standard ones inside the node's mount namespace. The
// sandbox drops CAP_SYS_RESOURCE, so containerd must not try to lower an
// OOM score below its own (restrict_oom_score_adj). Plugins that would
// make directories on the host (opt) or need what is not here (the
// snapshotters but overlayfs and native) are off.
const containerdConfig = `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "` + PauseImage + `"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
`

// kubeletConfig: the cgroupfs driver (no systemd here), cgroup v1 allowed
// (failCgroupV1: false: the VM's cgroups are v1), the node's own cgroup
// root, client certificates checked against the cluster's CA and requests
// authorized by the API server. Image garbage collection and eviction on
// disk are off: the images were imported, not pulled, and cannot come
// back.
func kubeletConfig(n *ClusterNode, c *Cluster) []byte {
	return fmt.Appendf(nil, `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupRoot: %s/pods
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: ""
staticPodPath: ""
podLogsDir: /var/log/pods
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi"}
localStorageCapacityIsolation: false
serializeImagePulls: false
`, n.Cgroup, filepath.Join(c.Dir, "pki", "ca.crt"))
}

// buildTestImages builds tools/testapp and writes it as the pause image
// and the test pods' image, OCI layout tars in dir.
func buildTestImages(ctx context.Context, dir string) ([]string, error) {
	var tars []string
	for _, ref := range []string{PauseImage, TestImage} {
		tar, err := buildImage(ctx, dir, "./tools/testapp", "testapp", "ambit-testapp", ref)
		if err != nil {
			return nil, err
		}
		tars = append(tars, tar)
	}
	return tars, nil
}

// AmbitImage builds this module's ambit binary and its image (as `make
// image` does) named ref, an OCI layout tar in dir, for a cluster to run.
func AmbitImage(ctx context.Context, dir, ref string) (string, error) {
	return buildImage(ctx, dir, "./cmd/ambit", "usr/local/bin/ambit", "ambit", ref)
}

// IstioCNIImage is istio-cni's image as Istio's istio-cni chart runs it,
// named ref, an OCI layout tar in dir: install-cni (its node agent, the
// entrypoint) at /usr/local/bin, its CNI plugin at /opt/cni/bin (the agent
// copies it to the node), both from istioBin (`make istio-bins`), and the
// host's nft with its shared libraries: in nftables mode the agent runs
// nft inside each pod's namespace. Istio's image is a distroless one with
// iptables and nft; this one carries only what the agent runs.
func IstioCNIImage(ctx context.Context, dir, ref, istioBin string) (string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", err
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		return "", fmt.Errorf("kubetest: istio-cni's image needs the host's nft (apt-get install nftables): %w", err)
	}
	libs, err := sharedLibs(ctx, nft)
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(ref)+".tar")
	args := []string{"run", "./tools/mkimage", "-binary", filepath.Join(istioBin, "install-cni"), "-path", "usr/local/bin/install-cni",
		"-title", "install-cni", "-ref", ref, "-out", out,
		"-add", filepath.Join(istioBin, "istio-cni") + "=opt/cni/bin/istio-cni", "-add", nft + "=usr/sbin/nft"}
	for _, l := range libs {
		args = append(args, "-add", l+"="+l)
	}
	mk := exec.CommandContext(ctx, "go", args...)
	mk.Dir = root
	if b, err := mk.CombinedOutput(); err != nil {
		return "", fmt.Errorf("kubetest: image %s: %v: %s", ref, err, b)
	}
	return out, nil
}

// sharedLibs are the libraries bin loads, the loader included, as ldd
// lists them.
func sharedLibs(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("kubetest: ldd %s: %w", bin, err)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0]) // the loader
		}
	}
	return libs, nil
}

// buildImage builds pkg, static, and writes its image: the binary at path.
func buildImage(ctx context.Context, dir, pkg, path, title, ref string) (string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, pkg)
	build.Dir, build.Env = root, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("kubetest: building %s: %v: %s", pkg, err, out)
	}
	out := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(ref)+".tar")
	mk := exec.CommandContext(ctx, "go", "run", "./tools/mkimage", "-binary", bin, "-path", path, "-title", title, "-ref", ref, "-out", out)
	mk.Dir = root
	if b, err := mk.CombinedOutput(); err != nil {
		return "", fmt.Errorf("kubetest: image %s: %v: %s", ref, err, b)
	}
	return out, nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", "github.com/ambitmesh/ambit").Output()
	if err != nil {
		return "", fmt.Errorf("kubetest: finding this module's directory: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}
