package startup

import (
	"context"
	"encoding/pem"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/testutil"
)

const meshOne = `workloads:
- {uid: c/default/server, name: server, namespace: default, serviceAccount: server, workloadIps: ["127.0.95.1"], protocol: HBONE, node: n1}
`

// A proxy started from a Source and an Issuer (a watched file and a local
// CA, through the seam a Kubernetes source will use) becomes ready, takes a
// change, and ends with ctx: Run returns nil and leaves nothing running.
func TestRunFromSourceAndIssuer(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(cfg, []byte(meshOne), 0o644); err != nil {
		t.Fatal(err)
	}
	ca, err := identity.InitCA(filepath.Join(dir, "ca"), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var logs testutil.Buffer
	w := &config.Watcher{Path: cfg, Interval: 20 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() {
		ran <- Run(ctx, Options{Workload: "default/server", Source: w, Issuer: &identity.LocalIssuer{CA: ca},
			Log: slog.New(slog.NewTextHandler(&logs, nil)), Version: "test"})
	}()
	defer func() {
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("Run after cancel: %v", err)
		}
	}()
	testutil.WaitFor(t, "readiness on 127.0.95.1:15021", func() bool {
		resp, err := http.Get("http://127.0.95.1:15021/healthz/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	two := meshOne + `- {uid: c/default/client, name: client, namespace: default, serviceAccount: client, workloadIps: ["127.0.95.2"], protocol: HBONE, node: n1}
`
	if err := os.WriteFile(cfg, []byte(two), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the change in the config dump", func() bool {
		resp, err := http.Get("http://127.0.95.1:15000/config_dump")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, _ = io.Copy(&b, resp.Body)
		return strings.Contains(b.String(), "127.0.95.2")
	})
	if !strings.Contains(logs.String(), "ambit proxy starting") {
		t.Errorf("no start-up line in the log:\n%s", logs.String())
	}
}

// A first config that does not parse is Run's error, file and line named;
// no proxy starts.
func TestRunRefusesABadFirstConfig(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "mesh.yaml")
	os.WriteFile(cfg, []byte("workloads: 3\n"), 0o644)
	ca, err := identity.InitCA(filepath.Join(dir, "ca"), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	err = Run(context.Background(), Options{Workload: "default/server", Source: &config.Watcher{Path: cfg}, Issuer: &identity.LocalIssuer{CA: ca}})
	if err == nil || !strings.Contains(err.Error(), "mesh.yaml:1:12: workloads: want a list") {
		t.Fatalf("Run: %v", err)
	}
}

// A control plane that accepts and never answers: Run gives up after the
// sync timeout and names it.
func TestRunTimesOutOnASilentControlPlane(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() { // hold every connection, say nothing
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	dir := t.TempDir()
	ca, err := identity.InitCA(filepath.Join(dir, "ca"), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root-cert.pem")
	os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Roots()[0].Raw}), 0o644)
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("t0ken"), 0o600)
	addr := l.Addr().String()
	err = Run(context.Background(), Options{Node: "n1", SyncTimeout: 300 * time.Millisecond,
		ControlPlane: &ControlPlane{XDSAddress: addr, CAAddress: addr, TokenFile: token, RootCert: root}})
	if err == nil || err.Error() != "no complete configuration from the control plane at "+addr+" within 300ms" {
		t.Fatalf("Run: %v", err)
	}
}

func TestValidate(t *testing.T) {
	local := &Local{ConfigFile: "f", CADir: "d"}
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{Local: local}, "set exactly one of --workload NS/NAME or --node NAME"},
		{Options{Workload: "a/b", Node: "n", Local: local}, "set exactly one of --workload"},
		{Options{Node: "n"}, "set one mesh"},
		{Options{Node: "n", Local: local, ControlPlane: &ControlPlane{XDSAddress: "x", CAAddress: "c", TokenFile: "t", RootCert: "r"}}, "set one mesh"},
		{Options{Node: "n", Local: &Local{ConfigFile: "f"}}, "no certificates: set --ca-dir"},
		{Options{Node: "n", Local: &Local{CADir: "d"}}, "a local mesh needs --config"},
		{Options{Node: "n", ControlPlane: &ControlPlane{XDSAddress: "x"}}, "a control plane needs --root-cert"},
		{Options{Node: "n", ControlPlane: &ControlPlane{XDSAddress: "x", RootCert: "r"}}, "no certificates: set --ca-dir (a local CA) or --ca-address"},
		{Options{Node: "n", ControlPlane: &ControlPlane{CAAddress: "c", RootCert: "r"}}, "no config: set --config"},
		{Options{Node: "n", Source: &config.Watcher{}}, "Source and Issuer go together"},
		{Options{Workload: "a/b", Local: local, ZDSSocket: "s"}, "--zds-socket needs --node"},
	} {
		if err := c.o.Validate(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.o, err, c.want)
		}
	}
	for _, good := range []Options{
		{Node: "n", Local: local},
		{Node: "n", ControlPlane: &ControlPlane{XDSAddress: "x", CAAddress: "c", RootCert: "r"}}, // no token: ztunnel's AuthSource::None
		// ztunnel's LOCAL_XDS_PATH: the config from a file, the certificates from the CA.
		{Node: "n", Local: &Local{ConfigFile: "f"}, ControlPlane: &ControlPlane{CAAddress: "c", RootCert: "r"}},
	} {
		if err := good.Validate(); err != nil {
			t.Errorf("a good one, %+v: %v", good, err)
		}
	}
}
