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
