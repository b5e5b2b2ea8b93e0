package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// StateDir holds a lab's process ids and logs: /run/ambit/lab/<name>.
func StateDir(name string) string { return filepath.Join("/run/ambit/lab", name) }

// Start runs argv inside the namespace nsName as a background process of
// its own session, logging to the lab's state directory, and records its pid
// so Down can stop it. self is the ambit binary, used to enter the namespace.
func Start(labName, nsName, tag, self string, argv []string) (int, error) {
	dir := StateDir(labName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(filepath.Join(dir, tag+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(self, append([]string{"lab", "nsexec", nsName, "--"}, argv...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s in %s: %w", strings.Join(argv, " "), nsName, err)
	}
	pid := cmd.Process.Pid
	_ = cmd.Process.Release()
	if err := os.WriteFile(filepath.Join(dir, tag+".pid"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return pid, err
	}
	return pid, nil
}

// Stop ends one process Start ran under tag (TERM, then KILL after a second).
func Stop(labName, tag string) error { return stop(filepath.Join(StateDir(labName), tag+".pid")) }

// stopAll ends every process the lab started, then removes its state.
func stopAll(labName string) error {
	dir := StateDir(labName)
	pids, _ := filepath.Glob(filepath.Join(dir, "*.pid"))
	var errs []error
	for _, f := range pids {
		if err := stop(f); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stop ends the process recorded in a pid file (TERM, then KILL after a
// second) and removes the file.
func stop(pidFile string) error {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("no such lab process (%w)", err)
	}
	defer os.Remove(pidFile)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return fmt.Errorf("%s: bad pid %q", pidFile, b)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return fmt.Errorf("stop pid %d: %w", pid, err)
	}
	for i := 0; i < 50 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	return nil
}

// ExecIn replaces the current process with argv running inside the named
// namespace. It returns only on error.
func ExecIn(nsName string, argv []string) error {
	if len(argv) == 0 {
		return errors.New("no command")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return err
	}
	h, err := netns.GetFromName(nsName)
	if err != nil {
		return fmt.Errorf("netns %s: %w (is the lab up?)", nsName, err)
	}
	// The namespace is the thread's: enter and exec from the same locked
	// thread, which becomes the new program's only thread.
	runtime.LockOSThread()
	if err := netns.Set(h); err != nil {
		return fmt.Errorf("enter %s: %w", nsName, err)
	}
	return syscall.Exec(path, argv, os.Environ())
}
