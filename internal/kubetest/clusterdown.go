package kubetest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/lab"
)

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
	// The nodes' PID namespaces first: killing a namespace's init kills
	// every process in it at once, while the processes outside that
	// started them are still there to reap them (orphans would wait for
	// the machine's init, which here takes its time).
	inits, _ := filepath.Glob(filepath.Join(dir, "pids", "*-pidns.pid"))
	signalPidFiles(inits, syscall.SIGKILL, 10*time.Second)
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
func stopPidFiles(files []string) { signalPidFiles(files, syscall.SIGTERM, 2*time.Second) }

// signalPidFiles sends sig to the processes the files name, removes the
// files, gives the processes wait to end and KILLs what is left.
func signalPidFiles(files []string, sig syscall.Signal, wait time.Duration) {
	var pids []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		os.Remove(f)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 && syscall.Kill(pid, sig) == nil {
			pids = append(pids, pid)
		}
	}
	deadline := time.Now().Add(wait)
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
			cmd, _ := os.ReadFile(filepath.Join(filepath.Dir(f), "cmdline"))
			out = append(out, fmt.Sprintf("process %d (%s)", pid, bytes.ReplaceAll(bytes.TrimRight(cmd, "\x00"), []byte{0}, []byte(" "))))
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
