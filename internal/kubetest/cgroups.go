package kubetest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupRoot is where the cgroup hierarchies are mounted. The machines
// this runs on are cgroup v1 (a hierarchy per controller, plus the
// unified one beside them); the kubelets use the cgroupfs driver (no
// systemd), so a node's cgroup is one path made in every hierarchy.
const cgroupRoot = "/sys/fs/cgroup"

// hierarchies lists the mounted cgroup hierarchies' directories.
func hierarchies() []string {
	entries, err := os.ReadDir(cgroupRoot)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, filepath.Join(cgroupRoot, e.Name()))
		}
	}
	return out
}

// makeCgroup makes path (and its parents) in every hierarchy. In the v1
// cpuset hierarchy a new group has no CPUs or memory nodes until given
// its parent's; a process cannot join it before.
func makeCgroup(path string) error {
	for _, h := range hierarchies() {
		dir := h
		for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
			parent := dir
			dir = filepath.Join(dir, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return fmt.Errorf("cgroup %s: %w", dir, err)
			}
			if filepath.Base(h) == "cpuset" {
				for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
					v, err := os.ReadFile(filepath.Join(parent, f))
					if err != nil {
						return fmt.Errorf("cgroup %s: %w", parent, err)
					}
					if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
						return fmt.Errorf("cgroup %s: %w", dir, err)
					}
				}
			}
		}
	}
	return nil
}

// joinCgroup moves pid into path in every hierarchy.
func joinCgroup(path string, pid int) error {
	for _, h := range hierarchies() {
		if err := os.WriteFile(filepath.Join(h, path, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			return fmt.Errorf("cgroup %s: %w", filepath.Join(h, path), err)
		}
	}
	return nil
}

// killCgroup kills every process in path and below it (in the pids
// hierarchy, which every process is in), until none is left. A process
// forking as it is killed is caught by the next round.
func killCgroup(path string) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		var pids []int
		for _, pid := range cgroupProcs(filepath.Join(cgroupRoot, "pids", path)) {
			if alive(pid) {
				pids = append(pids, pid)
			}
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v still there after 20 s of SIGKILL", path, pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func cgroupProcs(dir string) []int {
	var pids []int
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// removeCgroupDir removes a cgroup and everything below it, deepest
// first (a cgroup directory goes with rmdir only, once empty of
// processes and children).
func removeCgroupDir(dir string) error {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		var err error
		// A cgroup whose last process just died can be busy a moment.
		for try := 0; try < 50; try++ {
			if err = syscall.Rmdir(dirs[i]); err == nil || errors.Is(err, syscall.ENOENT) || !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
		}
	}
	return errors.Join(errs...)
}
