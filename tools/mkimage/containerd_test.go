package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// TestImageRunsInContainerd: the image of the real `ambit` binary, imported
// into a real containerd (Debian's, as the cluster's nodes run it) and run
// by runc, answers `ambit version`; and it holds no shell. containerd runs
// with a root, state and socket of its own under the test's directory,
// all removed after.
func TestImageRunsInContainerd(t *testing.T) {
	testutil.NeedRoot(t)
	for _, b := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Fatalf("%s is not installed (make deps installs containerd and runc with apt-get): %v", b, err)
		}
	}
	dir, err := os.MkdirTemp("", "ambit-ctrd")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "ambit")
	build := exec.Command("go", "build", "-o", bin, "-ldflags", "-X main.version=imagetest", "./cmd/ambit")
	build.Dir = "../.."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	tarFile := filepath.Join(dir, "image.tar")
	if _, err := Write(Spec{Binary: bin, Arch: "amd64"}, tarFile, "ambitmesh/ambit:imagetest"); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	// restrict_oom_score_adj: the sandbox has no CAP_SYS_RESOURCE.
	if err := os.WriteFile(cfg, []byte(`version = 2
root = "`+dir+`/root"
state = "`+dir+`/state"
[grpc]
  address = "`+sock+`"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
`), 0o600); err != nil {
		t.Fatal(err)
	}
	var log testutil.Buffer
	ctrd := exec.Command("containerd", "--config", cfg)
	ctrd.Stdout, ctrd.Stderr = &log, &log
	ctrd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := ctrd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-ctrd.Process.Pid, syscall.SIGTERM)
		_ = ctrd.Wait()
		// The shims outlive containerd; the snapshots are mounts.
		_ = exec.Command("pkill", "-f", "containerd-shim.*"+dir).Run()
		if mounts, err := os.ReadFile("/proc/self/mounts"); err == nil {
			lines := strings.Split(string(mounts), "\n")
			for i := len(lines) - 1; i >= 0; i-- {
				if f := strings.Fields(lines[i]); len(f) > 1 && strings.HasPrefix(f[1], dir) {
					_ = syscall.Unmount(f[1], syscall.MNT_DETACH)
				}
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if t.Failed() {
			t.Logf("containerd's log:\n%s", &log)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctr := func(args ...string) (string, error) {
		var out bytes.Buffer
		c := exec.CommandContext(ctx, "ctr", append([]string{"--address", sock}, args...)...)
		c.Stdout, c.Stderr = &out, &out
		err := c.Run()
		return out.String(), err
	}
	testutil.WaitFor(t, "containerd serving", func() bool { _, err := ctr("version"); return err == nil })
	if out, err := ctr("images", "import", tarFile); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
	const ref = "docker.io/ambitmesh/ambit:imagetest"
	out, err := ctr("run", "--rm", ref, "ambit-version", "/usr/local/bin/ambit", "version")
	if err != nil || !strings.HasPrefix(out, "ambit imagetest (go1.") {
		t.Fatalf("ambit version in the image: %q, %v", out, err)
	}
	out, err = ctr("run", "--rm", ref, "ambit-shell", "/bin/sh", "-c", "true")
	if err == nil || !strings.Contains(out, "/bin/sh: no such file or directory") {
		t.Errorf("a shell in the image: %q, %v; want none", out, err)
	}
}
