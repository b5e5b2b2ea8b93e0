package kubenode

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// TestFindNetns: a /proc laid out as the host's (the entries point at real
// namespaces): the pod's process is found by its cgroup path, in the
// cgroupfs driver's form and the systemd driver's, and the runtime's
// pinned file for its namespace is preferred to the process's entry; a
// process of the pod in the host's namespace (host network) is passed
// over; an unknown pod is an error that says so.
func TestFindNetns(t *testing.T) {
	_, name := testutil.Netns(t)
	proc := t.TempDir()
	mk := func(pid, cgroup, netnsTarget string) {
		dir := filepath.Join(proc, pid, "ns")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(netnsTarget, filepath.Join(dir, "net")); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(proc, pid, "cgroup"), []byte(cgroup), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mk("self", "0::/\n", "/proc/self/ns/net")
	mk("100", "4:memory:/ambit-k8s-e2e-worker1/pods/kubepods/besteffort/pod1111-2222/abc\n", "/proc/self/ns/net") // host network
	mk("101", "4:memory:/ambit-k8s-e2e-worker1/pods/kubepods/besteffort/pod1111-2222/def\n", "/run/netns/"+name)
	mk("102", "1:name=systemd:/kubepods.slice/kubepods-besteffort-pod3333_4444.slice/cri-x.scope\n", "/run/netns/"+name)

	got, err := findNetns(proc, "/run/netns", "1111-2222")
	if err != nil || got != "/run/netns/"+name {
		t.Errorf("cgroupfs form: %q, %v; want the pinned /run/netns/%s", got, err, name)
	}
	got, err = findNetns(proc, t.TempDir(), "3333-4444")
	if err != nil || got != filepath.Join(proc, "102", "ns", "net") {
		t.Errorf("systemd form, nothing pinned: %q, %v; want the process's entry", got, err)
	}
	if _, err := findNetns(proc, "/run/netns", "5555"); err == nil || !strings.Contains(err.Error(), "no process of pod 5555") {
		t.Errorf("an unknown pod: %v", err)
	}
	if _, err := findNetns(proc, "/run/netns", ""); err == nil {
		t.Error("an empty UID matched something")
	}
}
