package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/identity"
)

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestVersion(t *testing.T) {
	out, err := run(t, "version")
	if err != nil || !strings.HasPrefix(out, "ambit dev (go1.") {
		t.Fatalf("version: %q, %v", out, err)
	}
}

func TestCAInitAndIssue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := run(t, "ca", "init", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, "ca", "init", "--dir", dir); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second init: %v", err)
	}
	out := filepath.Join(t.TempDir(), "client")
	if _, err := run(t, "ca", "issue", "--dir", dir, "--id", "spiffe://cluster.local/ns/default/sa/client", "--out", out, "--ttl", "1h"); err != nil {
		t.Fatal(err)
	}
	chainPEM, _ := os.ReadFile(filepath.Join(out, "cert-chain.pem"))
	keyPEM, _ := os.ReadFile(filepath.Join(out, "key.pem"))
	rootPEM, _ := os.ReadFile(filepath.Join(out, "root-cert.pem"))
	chain, err := identity.ParseCertificates(chainPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := identity.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := identity.ParseCertificates(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	id := identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	c, err := identity.NewCertificate(id, chain, key, roots)
	if err != nil {
		t.Fatalf("issued files do not fit together: %v", err)
	}
	if _, err := identity.VerifyChain(c.Chain, c.RootPool(), c.Leaf().NotBefore.Add(2*60e9)); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(out, "key.pem")); st.Mode().Perm() != 0o600 {
		t.Errorf("key.pem mode %v", st.Mode().Perm())
	}
	for _, bad := range [][]string{
		{"ca", "issue", "--dir", dir, "--id", "spiffe://cluster.local/ns/default", "--out", out},
		{"ca", "issue", "--dir", t.TempDir(), "--id", "spiffe://cluster.local/ns/a/sa/b", "--out", out},
		{"ca", "issue", "--dir", dir},
	} {
		if _, err := run(t, bad...); err == nil {
			t.Errorf("%v succeeded", bad)
		}
	}
}

// The proxy does not start on a bad config, and says where the problem is.
func TestProxyRefusesBadConfig(t *testing.T) {
	ca := filepath.Join(t.TempDir(), "ca")
	if _, err := run(t, "ca", "init", "--dir", ca); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "mesh.yaml")
	os.WriteFile(cfg, []byte("workloads:\n- name: a\n  namespace: default\n  workloadIps: [\"10.0.0.300\"]\n"), 0o644)
	_, err := run(t, "proxy", "--config", cfg, "--ca-dir", ca, "--workload", "default/a")
	if err == nil || !strings.Contains(err.Error(), "mesh.yaml:4:17: workloads[0].workloadIps[0]: \"10.0.0.300\" is not an IP address") {
		t.Fatalf("bad config: %v", err)
	}
	os.WriteFile(cfg, []byte("workloads:\n- {name: a, namespace: default, workloadIps: [\"127.0.0.1\"]}\n"), 0o644)
	if _, err := run(t, "proxy", "--config", cfg, "--ca-dir", ca, "--workload", "default/b"); err == nil || !strings.Contains(err.Error(), "workload default/b is not in the config") {
		t.Fatalf("unknown workload: %v", err)
	}
	for _, args := range [][]string{
		{"proxy", "--config", cfg, "--ca-dir", ca},
		{"proxy", "--config", cfg, "--ca-dir", ca, "--workload", "default/a", "--node", "n"},
		{"proxy", "--config", cfg, "--ca-dir", ca, "--workload", "default/a", "--log-format", "xml"},
		{"proxy", "--config", cfg, "--ca-dir", t.TempDir(), "--workload", "default/a"},
	} {
		if _, err := run(t, args...); err == nil {
			t.Errorf("%v started", args)
		}
	}
	if _, err := run(t, "proxy", "--config", cfg, "--ca-dir", ca, "--workload", "default/a", "--drain-timeout", "0s"); err == nil || !strings.Contains(err.Error(), "--drain-timeout 0s: want a positive duration") {
		t.Errorf("a drain of 0: %v", err)
	}
}

// TestControlFlagErrors: each wrong combination of the control plane's
// sources is refused with a message that names the flags.
func TestControlFlagErrors(t *testing.T) {
	ca := filepath.Join(t.TempDir(), "ca")
	if _, err := run(t, "ca", "init", "--dir", ca); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"control"}, "--ca-dir is required"},
		{[]string{"control", "--ca-dir", ca, "--config", "m.yaml", "--kubeconfig", "k"}, "--config and --kubeconfig are two sources of the mesh"},
		{[]string{"control", "--ca-dir", ca, "--config", "m.yaml"}, "--config needs --tokens"},
		{[]string{"control", "--ca-dir", ca, "--tokens", "t"}, "--tokens is for --config"},
		{[]string{"control", "--ca-dir", ca, "--trusted-node-accounts", "ambit-node"}, `--trusted-node-accounts: "ambit-node": want namespace/serviceaccount`},
		{[]string{"control", "--ca-dir", ca}, "no --config or --kubeconfig, and not in a pod"},
		{[]string{"control", "--ca-dir", ca, "--kubeconfig", filepath.Join(t.TempDir(), "absent")}, "absent"},
	} {
		if _, err := run(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ambit %s: %v; want %q", strings.Join(c.args, " "), err, c.want)
		}
	}
}

// TestNodeAgentFlagErrors: the agent takes its pods from one place, the
// lab's API or Kubernetes, and says so; the CNI plugin's name runs the
// plugin, which refuses a call with no CNI environment.
func TestNodeAgentFlagErrors(t *testing.T) {
	for _, args := range [][]string{
		{"node-agent"},
		{"node-agent", "--control", filepath.Join(t.TempDir(), "c.sock"), "--kubernetes"},
	} {
		if _, err := run(t, args...); err == nil || !strings.Contains(err.Error(), "give one of --control") {
			t.Errorf("%v: %v, want an error naming the two ways", args, err)
		}
	}
	// Under the plugin's name the binary speaks CNI (this test binary
	// stands in for ambit: TestMain runs main for AMBIT_TEST_AS_MAIN).
	plugin := filepath.Join(t.TempDir(), "ambit-cni")
	if err := os.Symlink(os.Args[0], plugin); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(plugin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION")
	cmd.Stdin = strings.NewReader(`{"cniVersion": "1.0.0"}`)
	if out, err := cmd.Output(); err != nil || !strings.Contains(string(out), `"supportedVersions"`) || !strings.Contains(string(out), `"1.0.0"`) {
		t.Errorf("ambit-cni VERSION: %s, %v", out, err)
	}
	// Run by a person (no CNI_COMMAND), it says what it is.
	if out, err := exec.Command(plugin).CombinedOutput(); err != nil || !strings.Contains(string(out), "ambit-cni: enrolls pods in Ambit's mesh") {
		t.Errorf("ambit-cni without a CNI environment: %s, %v", out, err)
	}
	cmd = exec.Command(plugin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD")
	cmd.Stdin = strings.NewReader(`{"cniVersion": "1.0.0", "name": "k8s", "type": "ambit-cni"}`)
	if out, err := cmd.Output(); err == nil || !strings.Contains(string(out), "CNI_") {
		t.Errorf("ambit-cni ADD without its variables: %s, %v; want the CNI error naming the one missing", out, err)
	}
	if os.Geteuid() == 0 {
		// Not in a pod and no --kubeconfig: said, before anything is touched.
		t.Setenv("KUBERNETES_SERVICE_HOST", "")
		if _, err := run(t, "node-agent", "--kubernetes", "--node-name", "n1"); err == nil || !strings.Contains(err.Error(), "not in a pod") {
			t.Errorf("--kubernetes outside a pod: %v", err)
		}
	}
}
