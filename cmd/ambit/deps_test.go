package main

import (
	"bufio"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/ambitmesh/ambit/"

// allowed is the README's map of the packages, checked: for each package,
// the packages of this module it may import and the modules outside the
// standard library it may use (import-path prefixes), its tests apart. A
// new package, or a new import, is a change here first, and a reviewer
// sees it. The layers, bottom up: leaves (no mesh knowledge) → the mesh's
// model → the protocols → the proxy and the node agent → start-up and
// tools → cmd/ambit.
var allowed = map[string]struct{ internal, external []string }{
	// Leaves: no other package of this module, or only other leaves.
	"internal/backoff":  {},
	"internal/memtrim":  {},
	"internal/socks5":   {},
	"internal/identity": {internal: []string{"backoff"}},
	"internal/relay":    {external: []string{"golang.org/x/sys/unix"}},
	"internal/sockopt":  {external: []string{"golang.org/x/sys/unix"}},
	"internal/listener": {internal: []string{"backoff"}},
	"internal/nsutil":   {internal: []string{"sockopt"}, external: []string{"github.com/vishvananda/netns", "golang.org/x/sys/unix"}},
	"internal/ambient":  {internal: []string{"identity"}},
	// The Kubernetes API, read by hand: client-go costs every process of
	// the binary (the node proxy too) 5 MB of RSS (docs/kubernetes-linking.md).
	"internal/kube": {internal: []string{"backoff"}, external: []string{"go.yaml.in/yaml/v3"}},
	// HBONE knows TLS, HTTP/2 and identities, not the mesh.
	"internal/hbone": {internal: []string{"identity", "listener", "relay"},
		external: []string{"golang.org/x/net/http2", "golang.org/x/sys/unix"}},
	// The mesh's model: pure, no I/O.
	"internal/authz":    {internal: []string{"identity"}},
	"internal/workload": {internal: []string{"authz", "identity"}},
	// Sources and protocols.
	"internal/config":    {internal: []string{"authz", "identity", "workload"}, external: []string{"go.yaml.in/yaml/v3"}},
	"internal/xds":       {internal: []string{"authz", "backoff", "workload"}, external: []string{"google.golang.org/grpc", "google.golang.org/protobuf", "istio.io/istio/pkg/workloadapi"}},
	"internal/zds":       {internal: []string{"backoff"}, external: []string{"github.com/vishvananda/netns", "golang.org/x/sys/unix", "google.golang.org/protobuf", "istio.io/istio/pkg/zdsapi"}},
	"internal/caclient":  {internal: []string{"ambient", "identity"}, external: []string{"google.golang.org/grpc", "google.golang.org/protobuf", "istio.io/api/security"}},
	"internal/telemetry": {internal: []string{"identity", "workload"}, external: []string{"github.com/prometheus/client_golang"}},
	"internal/capture":   {internal: []string{"ambient", "nsutil"}, external: []string{"github.com/google/nftables", "github.com/vishvananda/netlink", "github.com/vishvananda/netns", "golang.org/x/sys/unix"}},
	// The node proxy: the data path. No gRPC, no config parsing, no capture.
	"internal/proxy": {internal: []string{"ambient", "authz", "hbone", "identity", "listener", "nsutil", "relay", "sockopt", "socks5", "telemetry", "workload", "zds"},
		external: []string{"github.com/vishvananda/netns", "golang.org/x/sys/unix", "istio.io/istio/pkg/zdsapi"}},
	"internal/nodeagent": {internal: []string{"capture", "listener", "zds"}, external: []string{"github.com/vishvananda/netns", "golang.org/x/sys/unix", "istio.io/istio/pkg/zdsapi"}},
	// The CNI plugin (the ambit binary as ambit-cni) and its installation.
	"internal/cni": {internal: []string{"ambient", "kube"}, external: []string{"github.com/containernetworking/cni"}},
	// The node agent on Kubernetes: its node's pods, the plugin's events.
	"internal/kubenode": {internal: []string{"ambient", "cni", "kube", "nodeagent"}, external: []string{"istio.io/istio/pkg/zdsapi"}},
	"internal/control": {internal: []string{"ambient", "identity", "workload", "xds"},
		external: []string{"golang.org/x/sync/errgroup", "google.golang.org/grpc", "istio.io/api/security"}},
	// The control plane's Kubernetes source and TokenReview authenticator.
	"internal/kubesource": {internal: []string{"ambient", "authz", "control", "kube", "workload"},
		external: []string{"github.com/prometheus/client_golang", "golang.org/x/sync/errgroup"}},
	// Start-up: the one place that joins a source, an issuer and a proxy.
	"internal/startup": {internal: []string{"ambient", "caclient", "config", "hbone", "identity", "memtrim", "proxy", "telemetry", "workload", "xds", "zds"},
		external: []string{"golang.org/x/sync/errgroup", "google.golang.org/grpc"}},
	// Tools over the lab.
	"internal/lab":   {internal: []string{"ambient", "capture", "config", "identity", "nodeagent", "nsutil"}, external: []string{"github.com/vishvananda/netlink", "github.com/vishvananda/netns", "go.yaml.in/yaml/v3"}},
	"internal/trace": {internal: []string{"nsutil"}, external: []string{"github.com/vishvananda/netns", "golang.org/x/sys/unix"}},
	"internal/bench": {internal: []string{"ambient", "identity", "lab", "nsutil"}, external: []string{"github.com/vishvananda/netns"}},
	"internal/demo":  {internal: []string{"ambient", "capture", "hbone", "identity", "kube", "kubenode", "lab", "nsutil", "relay", "trace"}, external: []string{"github.com/vishvananda/netns"}},
	// A real etcd and kube-apiserver for tests, with client-go's clients
	// as the reference writer: linked by tests only.
	// and the seed's two-node cluster on the lab's network.
	"internal/kubetest": {internal: []string{"lab", "nsutil"}, external: []string{"github.com/vishvananda/netns", "istio.io/client-go", "k8s.io/", "sigs.k8s.io/yaml"}},
	"internal/testutil": {internal: []string{"identity", "nsutil"}, external: []string{"github.com/google/nftables", "github.com/vishvananda/netlink", "github.com/vishvananda/netns", "go.uber.org/goleak"}},
	// Build tools, not the mesh: the container image's writer.
	// The chart and its rendering; tests only.
	"deploy": {},
	// Ambit on the real two-node cluster, installed by its chart; tests only.
	"e2e":           {},
	"tools/mkimage": {external: []string{"github.com/google/go-containerregistry"}},
	// The test cluster's command (make k8s-up) and its pods' program.
	"tools/k8scluster": {internal: []string{"kubetest"}},
	"tools/testapp":    {},
	"cmd/ambit": {internal: []string{"bench", "cni", "config", "control", "demo", "hbone", "identity", "kube", "kubenode", "kubesource", "lab", "nodeagent", "nsutil", "startup", "telemetry", "zds"},
		external: []string{"github.com/spf13/cobra"}},
}

// neverLinked are modules a binary or the data path must not pull in, even
// through another package: gopacket is for the trace tests' cross-check
// only, go-control-plane for the xDS tests, and the proxy's data path
// links no gRPC (its config comes through a workload.Source). The typed
// Kubernetes clients' init functions alone cost every process of the binary
// ~17 MB, the node proxy included: 10,000 idle connections then take 55 MB
// instead of 38-39 (docs/kubernetes-linking.md).
var neverLinked = map[string][]string{
	"cmd/ambit": {"github.com/google/gopacket", "github.com/envoyproxy/go-control-plane",
		"k8s.io/client-go/kubernetes", "istio.io/client-go", "sigs.k8s.io/controller-runtime", "github.com/google/go-containerregistry"},
	"internal/proxy": {"google.golang.org/grpc", "github.com/google/gopacket", "github.com/envoyproxy/go-control-plane", "go.yaml.in/yaml"},
	"internal/hbone": {"google.golang.org/grpc", "google.golang.org/protobuf", "istio.io/"},
	"internal/relay": {"google.golang.org/grpc", "golang.org/x/net"},
}

type listed struct {
	ImportPath string
	Imports    []string
	Deps       []string
	Standard   bool
}

func goList(t *testing.T) []listed {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-deps=false", "-json=ImportPath,Imports,Deps,Standard", "./...")
	cmd.Dir = root
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []listed
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p listed
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// isStd is the standard library: no dot in the first element.
func isStd(path string) bool { return !strings.Contains(strings.Split(path, "/")[0], ".") }

func TestPackageDependencies(t *testing.T) {
	pkgs := goList(t)
	seen := map[string]bool{}
	for _, p := range pkgs {
		name := strings.TrimPrefix(p.ImportPath, module)
		rule, ok := allowed[name]
		if !ok {
			t.Errorf("%s is not in the dependency map (cmd/ambit/deps_test.go, and the README's): say what it may import", name)
			continue
		}
		seen[name] = true
		for _, imp := range p.Imports {
			switch {
			case strings.HasPrefix(imp, module):
				dep := strings.TrimPrefix(strings.TrimPrefix(imp, module), "internal/")
				if !slices.Contains(rule.internal, dep) {
					t.Errorf("%s imports %s, which the map does not allow (allowed: %v)", name, dep, rule.internal)
				}
			case isStd(imp):
			default:
				if !slices.ContainsFunc(rule.external, func(pre string) bool { return strings.HasPrefix(imp, pre) }) {
					t.Errorf("%s imports %s, which the map does not allow (allowed: %v)", name, imp, rule.external)
				}
			}
		}
		for _, bad := range neverLinked[name] {
			for _, d := range p.Deps {
				if strings.HasPrefix(d, bad) {
					t.Errorf("%s links %s (through its imports): it must not", name, d)
					break
				}
			}
		}
	}
	for name := range allowed {
		if !seen[name] {
			t.Errorf("the dependency map names %s, which does not exist", name)
		}
	}
}

// The README's map has a row for every package, and none for a package
// that is gone: it is what a newcomer reads first.
func TestReadmeMapNamesEveryPackage(t *testing.T) {
	f, err := os.Open("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows := map[string]bool{}
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "## ") {
			in = line == "## Map of the packages"
			continue
		}
		if in && strings.HasPrefix(line, "| `") {
			name, _, _ := strings.Cut(strings.TrimPrefix(line, "| `"), "`")
			rows[name] = true
		}
	}
	if len(rows) == 0 {
		t.Fatal(`README.md has no "## Map of the packages" table`)
	}
	for name := range allowed {
		if !rows[name] {
			t.Errorf("README.md's map has no row for %s", name)
		}
	}
	for name := range rows {
		if _, ok := allowed[name]; !ok {
			t.Errorf("README.md's map has a row for %s, which the dependency map does not know", name)
		}
	}
}

// Files that fit their jobs, and a cmd that is flags → options: no non-test
// file in internal/ over 600 lines, no function of cmd/ambit over 60.
func TestFilesAndFunctionsFitTheirJobs(t *testing.T) {
	const maxFileLines, maxCmdFuncLines = 600, 60
	err := filepath.WalkDir("../../internal", func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if n := strings.Count(string(data), "\n"); n > maxFileLines {
			t.Errorf("%s: %d lines, over %d: split it by concern", strings.TrimPrefix(path, "../../"), n, maxFileLines)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				continue
			}
			lines := fset.Position(fn.End()).Line - fset.Position(fn.Pos()).Line + 1
			if lines > maxCmdFuncLines {
				t.Errorf("cmd/ambit/%s: %s is %d lines, over %d: move the work into a package", name, fn.Name.Name, lines, maxCmdFuncLines)
			}
		}
	}
}
