package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// runCtx runs ambit's command line until ctx ends; it returns the error.
func runCtx(ctx context.Context, args ...string) error {
	root := newRoot()
	root.SetArgs(args)
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	return root.ExecuteContext(ctx)
}

// cpMesh is a control plane and two dedicated proxies (client on .10 for
// node-a, server on .20 for node-b, an echo app on .20:8080) in a
// 127.0.n.0/24 of the test's own.
type cpMesh struct {
	ip         func(int) string
	write      func(string)
	mesh       func(policy string) string
	start      func(args ...string)
	cfg, caDir string
	tokens     string
}

func newCPMesh(t *testing.T, n int, proxyArgs ...string) *cpMesh {
	m := &cpMesh{}
	m.ip = func(last int) string { return fmt.Sprintf("127.0.%d.%d", n, last) }
	dir := t.TempDir()
	m.caDir = filepath.Join(dir, "ca")
	if _, err := run(t, "ca", "init", "--dir", m.caDir); err != nil {
		t.Fatal(err)
	}
	m.tokens = filepath.Join(dir, "tokens")
	os.WriteFile(m.tokens, []byte("token-node-a-0123456789 node-a\ntoken-node-b-0123456789 node-b\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "a.token"), []byte("token-node-a-0123456789\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "b.token"), []byte("token-node-b-0123456789\n"), 0o600)
	m.mesh = func(policy string) string {
		return fmt.Sprintf(`workloads:
- {uid: t//client, name: client, namespace: default, serviceAccount: client, workloadIps: ["%s"], protocol: HBONE, node: node-a}
- {uid: t//server, name: server, namespace: default, serviceAccount: server, workloadIps: ["%s"], protocol: HBONE, node: node-b}
%s`, m.ip(10), m.ip(20), policy)
	}
	m.cfg = filepath.Join(dir, "mesh.yaml")
	m.write = func(s string) {
		os.WriteFile(m.cfg+".tmp", []byte(s), 0o644)
		os.Rename(m.cfg+".tmp", m.cfg)
	}
	m.write(m.mesh(""))
	testutil.Echo(t, m.ip(20)+":8080", nil)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	m.start = func(args ...string) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := runCtx(ctx, args...); err != nil && ctx.Err() == nil {
				t.Errorf("%v: %v", args[:2], err)
			}
		}()
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
	return m
}

// startProxies runs both proxies against the control plane at cp and waits
// until they are ready.
func (m *cpMesh) startProxies(t *testing.T, cp string, extra ...string) {
	root := filepath.Join(m.caDir, "root-cert.pem")
	dir := filepath.Dir(m.tokens)
	for _, p := range []struct{ wl, tok string }{{"default/client", "a.token"}, {"default/server", "b.token"}} {
		args := []string{"proxy", "--workload", p.wl, "--xds-address", cp, "--ca-address", cp, "--token-file", filepath.Join(dir, p.tok), "--root-cert", root}
		m.start(append(args, extra...)...)
	}
	m.waitReady(t)
}

// waitReady waits until both proxies say they are ready.
func (m *cpMesh) waitReady(t *testing.T) {
	for _, a := range []string{m.ip(10), m.ip(20)} {
		testutilWait(t, "proxy "+a+" ready", func() bool {
			resp, err := http.Get("http://" + a + ":15021/healthz/ready")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	}
}

// The proxies take their config over xDS and their certificates from the
// remote CA; a policy written on the control plane reaches them live.
func TestControlPlaneEndToEnd(t *testing.T) {
	m := newCPMesh(t, 200+os.Getpid()%25)
	ip, write, mesh, cfg, caDir, tokens := m.ip, m.write, m.mesh, m.cfg, m.caDir, m.tokens
	ctx, cancelAll := context.WithCancel(context.Background())
	t.Cleanup(cancelAll)
	cp := ip(1) + ":15012"
	cpCtx, stopCP := context.WithCancel(ctx)
	cpDone := make(chan struct{})
	go func() {
		defer close(cpDone)
		runCtx(cpCtx, "control", "--config", cfg, "--ca-dir", caDir, "--tokens", tokens, "--listen", cp)
	}()
	m.startProxies(t, cp)
	// Through the mesh, with certificates the proxies never saw a CA key for.
	c := socks(t, ip(10), ip(20)+":8080")
	defer c.Close()
	c.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through the mesh: %q %v", buf, err)
	}
	dump, _ := http.Get("http://" + ip(20) + ":15000/config_dump")
	b, _ := io.ReadAll(dump.Body)
	dump.Body.Close()
	if !strings.Contains(string(b), `"identity": "spiffe://cluster.local/ns/default/sa/server"`) {
		t.Errorf("the server proxy holds no certificate for its workload:\n%s", b)
	}
	// A workload (and a service in front of it) added on the control plane
	// is reachable at once, no restart.
	testutil.Echo(t, ip(30)+":8080", nil)
	if c3 := socksName(ip(10), "late.default.svc.cluster.local", 80); c3 != nil {
		c3.Close()
		t.Fatal("a service that does not exist yet was reachable")
	}
	write(mesh(fmt.Sprintf(`- {uid: t//late, name: late, namespace: default, workloadIps: ["%s"], protocol: TCP, node: node-c, services: {"default/late.default.svc.cluster.local": {80: 8080}}}
services:
- {name: late, namespace: default, hostname: late.default.svc.cluster.local, vips: ["/10.96.7.7"], ports: {80: 8080}}
`, ip(30))))
	testutilWait(t, "the new workload through its new service", func() bool {
		c3 := socksName(ip(10), "late.default.svc.cluster.local", 80)
		if c3 == nil {
			return false
		}
		defer c3.Close()
		c3.Write([]byte("new!"))
		b := make([]byte, 4)
		_, err := io.ReadFull(c3, b)
		return err == nil && string(b) == "new!"
	})
	// The control plane goes away: the data path goes on with what it has.
	stopCP()
	<-cpDone
	if c2 := socksMaybe(ip(10), ip(20)+":8080"); c2 == nil {
		t.Fatal("a new connection failed while the control plane was down")
	} else {
		c2.Close()
	}
	// It comes back; the proxies reconnect by themselves (backoff) and
	// take its changes again.
	cpCtx, stopCP = context.WithCancel(ctx)
	cpDone = make(chan struct{})
	go func() {
		defer close(cpDone)
		runCtx(cpCtx, "control", "--config", cfg, "--ca-dir", caDir, "--tokens", tokens, "--listen", cp)
	}()
	t.Cleanup(func() { stopCP(); <-cpDone })
	// The connection opened before the restart is still alive.
	c.Write([]byte("pong"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("the live connection did not survive the control plane's restart: %q %v", buf, err)
	}
	// A DENY policy written on the control plane closes the live connection.
	write(mesh("policies:\n- {name: deny-client, namespace: default, scope: Namespace, action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"))
	c.SetReadDeadline(time.Now().Add(20 * time.Second)) // includes the proxies' reconnect backoff
	if _, err := c.Read(buf); err == nil {
		t.Fatal("the live connection survived a policy that denies it")
	}
	// And a new one is refused.
	if c2 := socksMaybe(ip(10), ip(20)+":8080"); c2 != nil {
		c2.Close()
		t.Fatal("a new connection was allowed after the DENY policy")
	}
}

// socks opens a SOCKS5 CONNECT through the proxy at proxyIP:15080.
func socks(t *testing.T, proxyIP, target string) *net.TCPConn {
	t.Helper()
	c := socksMaybe(proxyIP, target)
	if c == nil {
		t.Fatalf("SOCKS to %s through %s refused", target, proxyIP)
	}
	return c
}

func socksMaybe(proxyIP, target string) *net.TCPConn {
	ap := netip.MustParseAddrPort(target)
	a := ap.Addr().As4()
	return socksRequest(proxyIP, binary.BigEndian.AppendUint16(append([]byte{1}, a[:]...), ap.Port()))
}

// Certificates of a few seconds are renewed through the remote CA again and
// again while one connection carries traffic without a break; new
// connections use the new certificates.
func TestCertificateRotationDuringATransfer(t *testing.T) {
	m := newCPMesh(t, 225+os.Getpid()%25)
	cp := m.ip(1) + ":15012"
	m.start("control", "--config", m.cfg, "--ca-dir", m.caDir, "--tokens", m.tokens, "--listen", cp)
	m.startProxies(t, cp, "--cert-ttl", "4s")
	serial := func() string {
		resp, err := http.Get("http://" + m.ip(20) + ":15000/config_dump")
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		_, rest, ok := strings.Cut(string(b), `"serialNumber": "`) // the leaf's comes first
		if !ok {
			return ""
		}
		serial, _, _ := strings.Cut(rest, `"`)
		return serial
	}
	c := socks(t, m.ip(10), m.ip(20)+":8080")
	defer c.Close()
	seen := map[string]bool{}
	buf := make([]byte, 32<<10)
	back := make([]byte, len(buf))
	for end := time.Now().Add(9 * time.Second); time.Now().Before(end); {
		for i := range buf {
			buf[i] = byte(i) ^ byte(time.Now().UnixNano())
		}
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("write during rotation: %v", err)
		}
		if _, err := io.ReadFull(c, back); err != nil || string(back) != string(buf) {
			t.Fatalf("echo during rotation: %v", err)
		}
		seen[serial()] = true
		time.Sleep(20 * time.Millisecond)
	}
	delete(seen, "")
	if len(seen) < 3 {
		t.Fatalf("saw %d certificates for the server in 9 s with a 4 s TTL, want renewals", len(seen))
	}
	c2 := socks(t, m.ip(10), m.ip(20)+":8080")
	c2.Close()
}

// socksName is socksMaybe to a host name (a mesh service's).
func socksName(proxyIP, host string, port uint16) *net.TCPConn {
	return socksRequest(proxyIP, binary.BigEndian.AppendUint16(append([]byte{3, byte(len(host))}, host...), port))
}

// socksRequest greets the SOCKS5 port of proxyIP, sends CONNECT to the
// destination dst (address type, address, port) and returns the connection
// if the proxy answered "succeeded".
func socksRequest(proxyIP string, dst []byte) *net.TCPConn {
	c, err := net.Dial("tcp", proxyIP+":15080")
	if err != nil {
		return nil
	}
	c.Write(append([]byte{5, 1, 0, 5, 1, 0}, dst...))
	resp := make([]byte, 12)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, resp); err != nil || resp[3] != 0 {
		c.Close()
		return nil
	}
	c.SetReadDeadline(time.Time{})
	return c.(*net.TCPConn)
}

// With no mesh flags the proxy runs from ztunnel's environment: here the
// client proxy, dedicated (PROXY_MODE, PROXY_WORKLOAD_INFO), on the control
// plane named by XDS_ADDRESS and CA_ADDRESS, trusting XDS_ROOT_CA, with the
// token of AUTH_TOKEN; the server proxy beside it runs from flags. The
// request crosses the mesh between them.
func TestProxyFromZtunnelEnvironment(t *testing.T) {
	m := newCPMesh(t, 175+os.Getpid()%25)
	cp := m.ip(1) + ":15012"
	m.start("control", "--config", m.cfg, "--ca-dir", m.caDir, "--tokens", m.tokens, "--listen", cp)
	dir := filepath.Dir(m.tokens)
	for k, v := range map[string]string{
		"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "default/client/client",
		"XDS_ADDRESS": "https://" + cp, "CA_ADDRESS": cp, "XDS_ROOT_CA": filepath.Join(m.caDir, "root-cert.pem"),
		"CA_ROOT_CA": filepath.Join(m.caDir, "root-cert.pem"), "AUTH_TOKEN": filepath.Join(dir, "a.token"),
		"INSTANCE_IP": m.ip(10), "RUST_LOG": "info", "RUST_BACKTRACE": "1", "NODE_NAME": "node-a",
	} {
		t.Setenv(k, v)
	}
	// --probe-ip still applies: readiness on every address would collide
	// with the other tests' proxies on this machine.
	m.start("proxy", "ztunnel", "--probe-ip", m.ip(10))
	m.start("proxy", "--workload", "default/server", "--xds-address", cp, "--ca-address", cp,
		"--token-file", filepath.Join(dir, "b.token"), "--root-cert", filepath.Join(m.caDir, "root-cert.pem"))
	m.waitReady(t)
	c := socks(t, m.ip(10), m.ip(20)+":8080")
	defer c.Close()
	c.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through the mesh from an environment-configured proxy: %q %v", buf, err)
	}
}

// The environment's errors name the variable; an argument other than
// ztunnel's role is refused; one mesh flag means flags mode.
func TestProxyEnvironmentErrors(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	t.Setenv("PROXY_MODE", "")
	for _, c := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{nil, []string{"proxy", "sidecar"}, `the only one taken is "ztunnel"`},
		{nil, []string{"proxy", "ztunnel"}, "NODE_NAME is not set"},
		{map[string]string{"NODE_NAME": "n", "CRL_PATH": "/crl"}, []string{"proxy"}, `CRL_PATH="/crl"`},
		{map[string]string{"NODE_NAME": "n", "XDS_ADDRESS": "http://istiod:15010"}, []string{"proxy"}, "the token must not travel in clear"},
		{map[string]string{"NODE_NAME": "n"}, []string{"proxy", "--node", "n"}, "or none of the mesh flags"},
	} {
		for k, v := range c.env {
			t.Setenv(k, v)
		}
		if _, err := run(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v with %v: %v, want %q", c.args, c.env, err, c.want)
		}
		for k := range c.env {
			t.Setenv(k, "")
		}
	}
}
