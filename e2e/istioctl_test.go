package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// istioctl runs Istio's own istioctl (built by `make istio-bins` from the
// istio.io/istio version go.mod requires) on a ztunnel config dump file:
// `istioctl ztunnel-config <kind> --file dump`. It reads no cluster (HOME
// and KUBECONFIG point at nothing).
func istioctl(t *testing.T, dump string, kind ...string) string {
	t.Helper()
	bin := filepath.Join(os.Getenv("ISTIO_BIN"), "istioctl")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("istioctl: %v (`make istio-bins` builds it; ISTIO_BIN names the directory)", err)
	}
	home := t.TempDir()
	cmd := exec.Command(bin, append(append([]string{"ztunnel-config"}, kind...), "--file", dump)...)
	cmd.Env = []string{"HOME=" + home, "KUBECONFIG=" + filepath.Join(home, "none"), "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("istioctl ztunnel-config %s --file %s: %v\n%s", strings.Join(kind, " "), dump, err, out)
	}
	return string(out)
}

// rows splits istioctl's table output into the fields of each line.
func rows(out string) [][]string {
	var r [][]string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			r = append(r, f)
		}
	}
	return r
}

// hasRow reports whether a row of the table is exactly want.
func hasRow(table [][]string, want ...string) bool {
	return slices.ContainsFunc(table, func(r []string) bool { return slices.Equal(r, want) })
}

// ztunnelExample is ztunnel's example config dump in istioctl's tests, with
// what istioctl is expected to print for it.
func ztunnelExample(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/istio: %v", err)
	}
	return filepath.Join(strings.TrimSpace(string(out)), "istioctl", "pkg", "writer", "ztunnel", "configdump", "testdata")
}

// The reference: istioctl, run here on ztunnel's own example dump, prints
// what Istio's tests expect of it. Ambit's dump is then read by the same
// binary (TestUnderIstiod) and must print the same tables.
func TestIstioctlOnZtunnelExample(t *testing.T) {
	dir := ztunnelExample(t)
	dump := filepath.Join(dir, "dump.json")
	for _, c := range []struct{ kind, golden string }{
		{"policies", "policies.txt"},
		{"certificates", "secretsummary.txt"},
	} {
		want, err := os.ReadFile(filepath.Join(dir, c.golden))
		if err != nil {
			t.Fatal(err)
		}
		got := istioctl(t, dump, c.kind)
		if !slices.EqualFunc(rows(got), rows(string(want)), slices.Equal[[]string]) {
			t.Errorf("istioctl ztunnel-config %s on ztunnel's example dump:\n%s\nwant (%s):\n%s", c.kind, got, c.golden, want)
		}
	}
	// The workload golden is of a filtered run; every row of it is in the
	// full table, under the same header.
	want, err := os.ReadFile(filepath.Join(dir, "workloadsummary.txt"))
	if err != nil {
		t.Fatal(err)
	}
	got := rows(istioctl(t, dump, "workloads"))
	for _, r := range rows(string(want)) {
		if !hasRow(got, r...) {
			t.Errorf("istioctl ztunnel-config workloads on ztunnel's example lacks the row %q", r)
		}
	}
}

// checkIstioctl reads a node proxy's /config_dump with istioctl and checks
// that it shows the state TestUnderIstiod built: the server and client
// pods over HBONE, the server's service with its one healthy endpoint, the
// DENY policy, and the server's certificate from istiod (leaf and root,
// valid).
func (e *env) checkIstioctl(node, serverIP, clientIP, svcIP string) {
	t := e.t
	t.Helper()
	dump := filepath.Join(t.TempDir(), node+"-config_dump.json")
	if err := os.WriteFile(dump, []byte(e.adminGet(node, "/config_dump")), 0o644); err != nil {
		t.Fatal(err)
	}
	header := func(out string) []string { return rows(out)[0] }
	dir := ztunnelExample(t)
	example := filepath.Join(dir, "dump.json")
	for _, kind := range []string{"workloads", "services", "policies", "certificates"} {
		got, ref := istioctl(t, dump, kind), istioctl(t, example, kind)
		if !slices.Equal(header(got), header(ref)) {
			t.Errorf("istioctl ztunnel-config %s: header %q, ztunnel's example gives %q", kind, header(got), header(ref))
		}
		table := rows(got)
		var want [][]string
		switch kind {
		case "workloads":
			want = [][]string{{"demo", "server", serverIP, "worker1", "None", "HBONE"}, {"demo", "client", clientIP, "master", "None", "HBONE"}}
		case "services":
			want = [][]string{{"demo", "server", svcIP, "None", "1/1"}}
		case "policies":
			want = [][]string{{"demo", "deny-client", "Deny", "WorkloadSelector"}}
		case "certificates":
			id := "spiffe://cluster.local/ns/demo/sa/server"
			for _, typ := range []string{"Leaf", "Root"} {
				if !slices.ContainsFunc(table, func(r []string) bool {
					return len(r) == 7 && r[0] == id && r[1] == typ && r[2] == "Available" && r[3] == "true" && r[4] != "NA"
				}) {
					t.Errorf("istioctl ztunnel-config certificates shows no valid %s certificate of %s:\n%s", typ, id, got)
				}
			}
		}
		for _, r := range want {
			if !hasRow(table, r...) {
				t.Errorf("istioctl ztunnel-config %s on %s's dump lacks the row %q:\n%s", kind, node, r, got)
			}
		}
		t.Logf("istioctl ztunnel-config %s on %s's dump:\n%s", kind, node, got)
	}
}
