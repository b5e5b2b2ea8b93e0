package kubenode

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// findNetns finds a running pod's network namespace from the host's
// /proc, as istio-cni does for pods that started before it: a process
// whose cgroup path names the pod's UID is one of the pod's (the cgroupfs
// driver writes .../pod<uid>/<container>, the systemd driver
// ...-pod<uid with _ for ->.slice). The path returned is the runtime's
// pinned file for that namespace (in netnsDir) when there is one, which
// outlives any one container; else the process's /proc entry.
func findNetns(procDir, netnsDir, podUID string) (string, error) {
	return PodNetns(procDir, netnsDir, podUID)
}

// PodNetns is findNetns for other tools (ambit trace on a cluster).
func PodNetns(procDir, netnsDir, podUID string) (string, error) {
	if podUID == "" {
		return "", errors.New("the pod has no UID")
	}
	marks := []string{"pod" + podUID, "pod" + strings.ReplaceAll(podUID, "-", "_")}
	entries, err := os.ReadDir(procDir)
	if err != nil {
		return "", err
	}
	self, _ := inode(filepath.Join(procDir, "self", "ns", "net"))
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cg, err := os.ReadFile(filepath.Join(procDir, e.Name(), "cgroup"))
		if err != nil || !containsAny(string(cg), marks) {
			continue
		}
		nsPath := filepath.Join(procDir, e.Name(), "ns", "net")
		ino, err := inode(nsPath)
		if err != nil || ino == self {
			continue // gone, or a host-network process
		}
		if pinned := pinnedPath(netnsDir, ino); pinned != "" {
			return pinned, nil
		}
		return nsPath, nil
	}
	return "", fmt.Errorf("no process of pod %s in %s", podUID, procDir)
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

func inode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// pinnedPath is the file in dir that pins the namespace with inode ino.
func pinnedPath(dir string, ino uint64) string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return ""
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if i, err := inode(p); err == nil && i == ino {
			return p
		}
	}
	return ""
}
