package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

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
	if err := c.pidNS(n); err != nil {
		return err
	}
	ns := n.nsenterArgs()
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

// nsenterArgs are nsenter's flags that put a process on the node: its
// mount, network and PID namespaces.
func (n *ClusterNode) nsenterArgs() []string {
	args := []string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS}
	if n.PIDNS != "" {
		args = append(args, "--pid="+n.PIDNS)
	}
	return args
}

// pidNS gives the node a PID namespace of its own, as a real node (or a
// kind node) has: its init is PID 1, in the node's network namespace, and
// the node's /proc is that namespace's. Node agents read /proc/1/ns/net as
// the node's network namespace (istio-cni does); in the machine's PID
// namespace PID 1 is the machine's init, in another network namespace, and
// this sandbox does not even let root read it. The init is `unshare
// --pid --fork`'s child, which mounts the node's /proc and sleeps; it is in
// the node's cgroup, so Down ends it, and with it every process of the
// namespace.
func (c *Cluster) pidNS(n *ClusterNode) error {
	ns := []string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS}
	if err := c.start(n.Name+"-init", ns, n.Cgroup+"/runtime", "unshare", "--pid", "--fork", "--kill-child", "--",
		"sh", "-c", "mount -t proc proc /proc && exec sleep infinity"); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(c.Dir, "pids", n.Name+"-init.pid"))
	if err != nil {
		return err
	}
	parent := strings.TrimSpace(string(b))
	deadline := time.Now().Add(30 * time.Second) // a stuck machine, not a speed check
	for {
		// Ready once the node's /proc is the new namespace's: its PID 1,
		// seen from unshare's child, is the child's sleep.
		kids, _ := os.ReadFile("/proc/" + parent + "/task/" + parent + "/children")
		if child := strings.Fields(string(kids)); len(child) == 1 {
			if comm, _ := os.ReadFile("/proc/" + child[0] + "/root/proc/1/comm"); strings.TrimSpace(string(comm)) == "sleep" {
				// Forked maybe before unshare was moved into the cgroup:
				// moved too, so that Down's kill of the cgroup ends it.
				pid, err := strconv.Atoi(child[0])
				if err != nil {
					return err
				}
				if err := joinCgroup(n.Cgroup+"/runtime", pid); err != nil {
					return fmt.Errorf("kubetest: node %s's init into its cgroup: %w", n.Name, err)
				}
				// Down kills it first: the namespace's processes die with
				// it while their parents (nsenter, unshare) still reap them.
				if err := os.WriteFile(filepath.Join(c.Dir, "pids", n.Name+"-pidns.pid"), []byte(child[0]), 0o644); err != nil {
					return err
				}
				n.PIDNS = "/proc/" + parent + "/ns/pid_for_children"
				return c.save()
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubetest: node %s: its PID namespace's init did not start (see its log)", n.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
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
	return c.startIn(tag, nsArgs, cgroup, nil, "", bin, args...)
}

// startIn is start with more variables in the environment and a working
// directory ("" : the test's).
func (c *Cluster) startIn(tag string, nsArgs []string, cgroup string, env []string, dir, bin string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(c.Dir, "logs", tag+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", append(append(nsArgs, "--", bin), args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Dir = dir
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
