package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/socks5"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
)

// Each test gets its own 127.0.N.0/24 so listeners never collide:
// client workload .10, server workload .20 (echo app on :8080), a plain
// TCP server outside the mesh on .30.
var subnet atomic.Int32

func init() { subnet.Store(100) }

type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

type node struct {
	p       *Proxy
	log     *logBuf
	metrics *telemetry.Metrics
	ip      netip.Addr
}

type mesh struct {
	t        testing.TB
	n        int32
	cfg      string
	client   *node
	server   *node
	clientIP netip.Addr
	serverIP netip.Addr
	plainIP  netip.Addr
	appPeers chan string // addresses the server app saw its clients at
	ca       *identity.CA
}

func (m *mesh) ip(last byte) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, byte(m.n), last}) }

// baseConfig is the mesh: client and server workloads, the echo service,
// and extra YAML (policies, more workloads) appended by the test.
func (m *mesh) config(serverExtra, extra string) string {
	return fmt.Sprintf(`workloads:
- uid: test//client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["%s"]
  protocol: HBONE
  node: node-a
  canonicalName: client
  canonicalRevision: v1
- uid: test//server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["%s"]
  protocol: HBONE
  node: node-b
  canonicalName: server
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
%s
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.%d.10"]
  ports: {80: 8080}
%s`, m.clientIP, m.serverIP, serverExtra, m.n, extra)
}

func (m *mesh) write(doc string) {
	m.t.Helper()
	tmp := m.cfg + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o644); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, m.cfg); err != nil {
		m.t.Fatal(err)
	}
}

// newMesh starts the echo app, a plain server and the two proxies.
func newMesh(t testing.TB, serverExtra, extra string) *mesh {
	t.Helper()
	m := &mesh{t: t, n: subnet.Add(1)}
	m.clientIP, m.serverIP, m.plainIP = m.ip(10), m.ip(20), m.ip(30)
	m.cfg = filepath.Join(t.TempDir(), "mesh.yaml")
	m.write(m.config(serverExtra, extra))
	m.appPeers = make(chan string, 100)
	testutil.Echo(t, netip.AddrPortFrom(m.serverIP, 8080).String(), m.appPeers)
	echoOn(t, netip.AddrPortFrom(m.plainIP, 9000))

	m.ca = testutil.CA(t)
	m.client = m.startProxy(Options{Workload: "default/client"}, m.clientIP)
	m.server = m.startProxy(Options{Workload: "default/server"}, m.serverIP)
	return m
}

// startProxy runs a proxy with opts (plus the mesh's CA, logs and metrics)
// and waits until it is ready on ip:15021.
func (m *mesh) startProxy(opts Options, ip netip.Addr) *node {
	ca := m.ca
	t := m.t
	lb := &logBuf{}
	log := slog.New(slog.NewTextHandler(lb, nil))
	certs := identity.NewManager(&identity.LocalIssuer{CA: ca}, log)
	t.Cleanup(certs.Close)
	n := &node{log: lb, metrics: telemetry.NewMetrics("test"), ip: ip}
	w := &config.Watcher{Path: m.cfg, Interval: 30 * time.Millisecond, Log: log}
	ctx, cancel := context.WithCancel(context.Background())
	var views workload.Handoff
	watched := make(chan error, 1)
	go func() { watched <- w.Run(ctx, views.Apply) }()
	select {
	case <-w.Synced():
	case err := <-watched:
		cancel()
		t.Fatal(err)
	}
	initial := views.Latest()
	opts.Certs, opts.Log, opts.Metrics, opts.Version, opts.LogLevel = certs, log, n.metrics, "test", new(slog.LevelVar)
	p, err := New(opts, initial)
	if err != nil {
		cancel()
		<-watched
		t.Fatal(err)
	}
	n.p = p
	_ = views.Attach(initial, func(ix *workload.Index) error {
		if err := p.SetIndex(ix); err != nil {
			t.Errorf("SetIndex: %v", err)
		}
		return nil
	})
	ran := make(chan struct{})
	go func() { _ = p.Run(ctx); close(ran) }()
	t.Cleanup(func() { cancel(); <-ran; <-watched })
	testutil.WaitFor(t, opts.Workload+opts.Node+" ready", func() bool {
		resp, err := http.Get("http://" + netip.AddrPortFrom(ip, ambient.ReadinessPort).String() + "/healthz/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return n
}

// echoOn serves TCP echo with half-close on addr until the test ends.
func echoOn(t testing.TB, addr netip.AddrPort) { testutil.Echo(t, addr.String(), nil) }

// socks connects through the client's SOCKS5 port to host:port (host an IP
// or a name) and returns the connection and the reply code.
func (m *mesh) socks(host string, port uint16) (*net.TCPConn, byte, error) {
	c, err := net.Dial("tcp", netip.AddrPortFrom(m.clientIP, ambient.SOCKS5Port).String())
	if err != nil {
		return nil, 0, err
	}
	req := []byte{5, 1, 0, 5, 1, 0}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() {
		a := ip.As4()
		req = append(append(req, 1), a[:]...)
	} else {
		req = append(append(req, 3, byte(len(host))), host...)
	}
	req = binary.BigEndian.AppendUint16(req, port)
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, 0, err
	}
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	resp := make([]byte, 2+10)
	if _, err := io.ReadFull(c, resp); err != nil {
		c.Close()
		return nil, 0, fmt.Errorf("socks reply: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	return c.(*net.TCPConn), resp[3], nil
}

// roundTrip sends msg, half-closes and reads everything back.
func roundTrip(c *net.TCPConn, msg []byte) ([]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	back, err := io.ReadAll(c)
	if werr := <-errc; err == nil {
		err = werr
	}
	return back, err
}

func (m *mesh) mustEcho(host string, port uint16) {
	m.t.Helper()
	c, code, err := m.socks(host, port)
	if err != nil || code != socks5.Succeeded {
		m.t.Fatalf("SOCKS to %s:%d: code %d, %v", host, port, code, err)
	}
	defer c.Close()
	msg := []byte("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n")
	back, err := roundTrip(c, msg)
	if err != nil || !bytes.Equal(back, msg) {
		m.t.Fatalf("echo via %s:%d: %q, %v", host, port, back, err)
	}
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestEchoThroughTheMesh(t *testing.T) {
	m := newMesh(t, "", "")
	m.mustEcho(m.serverIP.String(), 8080)
	// The app saw the connection come from the client workload's IP.
	if peer := <-m.appPeers; !strings.HasPrefix(peer, m.clientIP.String()+":") {
		t.Errorf("the server app saw its client at %s, want the client's IP %s", peer, m.clientIP)
	}

	// Both ends logged the connection with the right identities.
	testutil.WaitFor(t, "access logs", func() bool {
		return strings.Contains(m.client.log.String(), "connection complete") && strings.Contains(m.server.log.String(), "connection complete")
	})
	cl, sl := m.client.log.String(), m.server.log.String()
	for _, want := range []string{"direction=outbound", "src.identity=spiffe://cluster.local/ns/default/sa/client",
		"dst.identity=spiffe://cluster.local/ns/default/sa/server", "dst.hbone_addr=" + m.serverIP.String() + ":15008", "bytes_sent=", "dst.workload=server"} {
		if !strings.Contains(cl, want) {
			t.Errorf("client access log lacks %q:\n%s", want, cl)
		}
	}
	for _, want := range []string{"direction=inbound", "src.identity=spiffe://cluster.local/ns/default/sa/client",
		"dst.identity=spiffe://cluster.local/ns/default/sa/server", "src.addr=" + m.clientIP.String() + ":", "dst.addr=" + m.serverIP.String() + ":8080"} {
		if !strings.Contains(sl, want) {
			t.Errorf("server access log lacks %q:\n%s", want, sl)
		}
	}
	// Metrics at both ends.
	cm := get(t, "http://"+netip.AddrPortFrom(m.clientIP, ambient.StatsPort).String()+"/metrics")
	sm := get(t, "http://"+netip.AddrPortFrom(m.serverIP, ambient.StatsPort).String()+"/stats/prometheus")
	for _, want := range []string{`istio_tcp_connections_opened_total{`, `reporter="source"`, `connection_security_policy="mutual_tls"`,
		`destination_principal="spiffe://cluster.local/ns/default/sa/server"`, `source_canonical_service="client"`, `istio_build{component="ztunnel",tag="test"} 1`} {
		if !strings.Contains(cm, want) {
			t.Errorf("client metrics lack %s", want)
		}
	}
	if !strings.Contains(sm, `reporter="destination"`) || !strings.Contains(sm, "istio_tcp_received_bytes_total{") {
		t.Errorf("server metrics:\n%s", sm)
	}
}

func TestServiceByVIPAndByName(t *testing.T) {
	n := subnet.Load() + 1 // the subnet newMesh is about to take
	empty := fmt.Sprintf("- name: empty\n  namespace: default\n  hostname: empty.default.svc.cluster.local\n  vips: [\"/10.98.%d.1\"]\n  ports: {80: 8080}\n", n)
	m := newMesh(t, "", empty)
	m.mustEcho(fmt.Sprintf("10.96.%d.10", m.n), 80) // VIP:80 → endpoint :8080
	m.mustEcho("echo.default.svc.cluster.local", 80)
	testutil.WaitFor(t, "service in the access log", func() bool {
		return strings.Contains(m.client.log.String(), "dst.service=echo.default.svc.cluster.local")
	})
	// A service with no endpoint is refused, and the log says why.
	if c, code, err := m.socks(fmt.Sprintf("10.98.%d.1", m.n), 80); err != nil || code != socks5.HostUnreachable {
		t.Errorf("service without endpoints: code %d, %v", code, err)
	} else {
		c.Close()
	}
	testutil.WaitFor(t, "the refusal in the log", func() bool {
		return strings.Contains(m.client.log.String(), "service default/empty.default.svc.cluster.local port 80: no endpoint (the service has no endpoints)")
	})
	if c, code, err := m.socks("nope.default.svc.cluster.local", 80); err != nil || code != socks5.HostUnreachable {
		t.Errorf("unknown name: code %d, %v", code, err)
		if c != nil {
			c.Close()
		}
	}
}

func TestPolicyAllowAndDeny(t *testing.T) {
	allowOnly := func(principal string) string {
		return "  authorizationPolicies: [\"default/allow\"]\npolicies:\n- name: allow\n  namespace: default\n  scope: WorkloadSelector\n  action: Allow\n  rules:\n  - - - principals: [!Exact \"" + principal + "\"]\n"
	}
	m := newMesh(t, allowOnly("cluster.local/ns/default/sa/client"), "")
	m.mustEcho(m.serverIP.String(), 8080)

	m.write(m.config(allowOnly("cluster.local/ns/default/sa/someone-else"), ""))
	testutil.WaitFor(t, "the new policy", func() bool {
		return strings.Contains(m.server.p.Index().Policies()[0].Rules[0][0][0].Principals[0].Value, "someone-else")
	})
	c, code, err := m.socks(m.serverIP.String(), 8080)
	if err != nil || code != socks5.NotAllowed {
		t.Fatalf("denied connection: code %d, %v; want %d (not allowed)", code, err, socks5.NotAllowed)
	}
	c.Close()
	testutil.WaitFor(t, "the denial in the server's log", func() bool {
		return strings.Contains(m.server.log.String(), "denied: no ALLOW policy matched (default/allow)")
	})
	testutil.WaitFor(t, "the 401 in the client's log", func() bool {
		return strings.Contains(m.client.log.String(), "CONNECT answered 401 Unauthorized")
	})
	sm := get(t, "http://"+netip.AddrPortFrom(m.serverIP, ambient.StatsPort).String()+"/metrics")
	if !strings.Contains(sm, "istio_tcp_connections_failed_total{") || !strings.Contains(sm, `response_flags="DENY"`) {
		t.Errorf("no DENY in the server's metrics:\n%s", sm)
	}
}

func TestPolicyChangeClosesLiveConnection(t *testing.T) {
	m := newMesh(t, "", "")
	c, code, err := m.socks(m.serverIP.String(), 8080)
	if err != nil || code != socks5.Succeeded {
		t.Fatalf("code %d, %v", code, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	deny := "policies:\n- name: deny-client\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/client\"]\n"
	m.write(m.config(deny, ""))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(buf); err == nil {
		t.Fatal("the live connection still carries bytes after a policy denies it")
	}
	testutil.WaitFor(t, "late rejection in the log", func() bool {
		s := m.server.log.String()
		return strings.Contains(s, "flags=DENY_LATE") && strings.Contains(s, "closed by a policy change: denied by DENY policy default/deny-client")
	})
}

func TestPassthroughUnknownPortAndSelfCall(t *testing.T) {
	m := newMesh(t, "", "")
	m.mustEcho(m.plainIP.String(), 9000) // not in the mesh: plain TCP
	testutil.WaitFor(t, "passthrough log", func() bool {
		return strings.Contains(m.client.log.String(), "dst.addr="+m.plainIP.String()+":9000")
	})
	if strings.Contains(m.server.log.String(), m.plainIP.String()+":9000") {
		t.Error("passthrough went through the server's proxy")
	}
	// Nothing listens on the server's 9999: the server proxy answers 503.
	c, code, err := m.socks(m.serverIP.String(), 9999)
	if err != nil || code != socks5.ConnectionRefused {
		t.Fatalf("unknown port: code %d, %v", code, err)
	}
	c.Close()
	testutil.WaitFor(t, "503 in the client's log", func() bool {
		return strings.Contains(m.client.log.String(), "CONNECT answered 503")
	})
	// The proxy's own ports are loops.
	c, code, err = m.socks(m.serverIP.String(), ambient.ZtunnelInboundPort)
	if err != nil || code != socks5.HostUnreachable {
		t.Fatalf("self call: code %d, %v", code, err)
	}
	c.Close()
}

func TestConfigChangeAddsWorkloadLive(t *testing.T) {
	m := newMesh(t, "", "")
	// 127.0.N.40 is not in the mesh yet: plain passthrough to a closed port fails.
	lateIP := m.ip(40)
	echoOn(t, netip.AddrPortFrom(lateIP, 8080))
	extra := fmt.Sprintf("- name: late\n  namespace: default\n  hostname: late.default.svc.cluster.local\n  vips: [\"/10.97.%d.1\"]\n  ports: {80: 8080}\n", m.n)
	lateWl := fmt.Sprintf("- uid: test//late\n  name: late\n  namespace: default\n  workloadIps: [\"%s\"]\n  protocol: TCP\n  services: {\"default/late.default.svc.cluster.local\": {80: 8080}}\n", lateIP)
	if c, code, err := m.socks("late.default.svc.cluster.local", 80); err == nil {
		c.Close()
		if code == socks5.Succeeded {
			t.Fatal("a service that does not exist yet was reachable")
		}
	}
	m.write(m.config(lateWl, extra))
	testutil.WaitFor(t, "the new service", func() bool { return len(m.client.p.Index().Services()) == 2 })
	m.mustEcho("late.default.svc.cluster.local", 80)

	// A bad change is refused and the last good config stays.
	m.write(m.config(lateWl, extra) + "  bogus: 1\n")
	testutil.WaitFor(t, "the rejection", func() bool { return strings.Contains(m.client.log.String(), "config change rejected") })
	if !strings.Contains(m.client.log.String(), "mesh.yaml:") || !strings.Contains(m.client.log.String(), "bogus: unknown field") {
		t.Errorf("rejection does not name the line and field:\n%s", m.client.log.String())
	}
	m.mustEcho("late.default.svc.cluster.local", 80)
}

func TestAdminEndpoints(t *testing.T) {
	m := newMesh(t, "", "")
	base := "http://" + netip.AddrPortFrom(m.clientIP, ambient.AdminPort).String()
	d := get(t, base+"/config_dump")
	if !strings.Contains(d, `"proxyMode": "Dedicated"`) { // the schema: TestConfigDumpInZtunnelSchema
		t.Errorf("config_dump:\n%s", d)
	}
	resp, err := http.Post(base+"/logging?level=debug", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), "level: debug") {
		t.Errorf("logging: %d %s", resp.StatusCode, b)
	}
	resp, err = http.Post(base+"/logging?level=loud", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Errorf("bad level: %d", resp.StatusCode)
	}
	if !strings.Contains(get(t, base+"/debug/pprof/"), "goroutine") {
		t.Error("pprof index")
	}
}

// 100 MB each way at once through both proxies, byte-exact, with half-close.
func TestLargeTransferBothDirections(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP in -short: moves 200 MB")
	}
	m := newMesh(t, "", "")
	c, code, err := m.socks(m.serverIP.String(), 8080)
	if err != nil || code != socks5.Succeeded {
		t.Fatalf("code %d, %v", code, err)
	}
	defer c.Close()
	const size = 100 << 20
	up := sha256.New()
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(c, 256<<10)
		buf := make([]byte, 64<<10)
		for sent := 0; sent < size; sent += len(buf) {
			rand.Read(buf)
			up.Write(buf)
			if _, err := w.Write(buf); err != nil {
				errc <- err
				return
			}
		}
		if err := w.Flush(); err != nil {
			errc <- err
			return
		}
		errc <- c.CloseWrite()
	}()
	down := sha256.New()
	n, err := io.Copy(down, c)
	if err != nil {
		t.Fatalf("after %d bytes: %v", n, err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if n != size || !bytes.Equal(up.Sum(nil), down.Sum(nil)) {
		t.Fatalf("got %d bytes back, hashes equal: %v", n, bytes.Equal(up.Sum(nil), down.Sum(nil)))
	}
	testutil.WaitFor(t, "byte counts in the log", func() bool {
		return strings.Contains(m.server.log.String(), fmt.Sprintf("bytes_sent=%d bytes_recv=%d", size, size))
	})
}

// Shared mode: one proxy for node-a's workloads tells them apart by source
// IP, and refuses a source that is none of them.
func TestSharedNodeModeIdentifiesSourceByIP(t *testing.T) {
	m := newMesh(t, "", "")
	nodeIP := m.ip(1)
	shared := m.startProxy(Options{Node: "node-a", ListenIP: nodeIP, AdminIP: nodeIP}, nodeIP)
	dial := func(from netip.Addr) (*net.TCPConn, byte) {
		t.Helper()
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
		c, err := d.Dial("tcp", netip.AddrPortFrom(nodeIP, ambient.SOCKS5Port).String())
		if err != nil {
			t.Fatal(err)
		}
		a := m.serverIP.As4()
		req := append([]byte{5, 1, 0, 5, 1, 0, 1}, a[:]...)
		c.Write(binary.BigEndian.AppendUint16(req, 8080))
		resp := make([]byte, 12)
		if _, err := io.ReadFull(c, resp); err != nil {
			t.Fatalf("socks reply: %v", err)
		}
		return c.(*net.TCPConn), resp[3]
	}
	c, code := dial(m.clientIP) // the client workload lives on node-a
	if code != socks5.Succeeded {
		t.Fatalf("from the client workload: code %d", code)
	}
	msg := []byte("hello from node-a")
	if back, err := roundTrip(c, msg); err != nil || !bytes.Equal(back, msg) {
		t.Fatalf("echo %q %v", back, err)
	}
	c.Close()
	testutil.WaitFor(t, "the shared proxy's access log", func() bool {
		return strings.Contains(shared.log.String(), "src.identity=spiffe://cluster.local/ns/default/sa/client")
	})
	c, code = dial(m.ip(99)) // no workload there
	c.Close()
	if code != socks5.NotAllowed {
		t.Fatalf("from an unknown source: code %d, want %d", code, socks5.NotAllowed)
	}
	testutil.WaitFor(t, "the refusal", func() bool {
		return strings.Contains(shared.log.String(), "is not a workload of node node-a: refusing a connection with no identity")
	})
}

// Without capture, a connection straight to 15001 or 15006 has no original
// destination (SO_ORIGINAL_DST finds none): it is refused, and said so.
func TestCapturePortsRefuseLoops(t *testing.T) {
	m := newMesh(t, "", "")
	for _, port := range []uint16{ambient.ZtunnelOutboundPort, ambient.ZtunnelInboundPlaintextPort} {
		c, err := net.Dial("tcp", netip.AddrPortFrom(m.clientIP, port).String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("port %d: read %d bytes from a loop", port, n)
		}
		c.Close()
	}
	testutil.WaitFor(t, "both refusals", func() bool {
		s := m.client.log.String()
		return strings.Contains(s, `msg="outbound: no original destination"`) &&
			strings.Contains(s, `msg="inbound: no original destination"`) &&
			strings.Count(s, "the connection was not redirected to this port") == 2
	})
}

// TestUnsupportedIsRefusedNotBypassed: a destination that needs what Ambit
// does not implement yet (here a waypoint, as istiod sends it) is refused
// on the way out and on the way in, with the reason in the access log and
// the failure counted with flag UNSUPPORTED; everything else is served.
func TestUnsupportedIsRefusedNotBypassed(t *testing.T) {
	m := newMesh(t, "", "")
	m.mustEcho(m.serverIP.String(), 8080)
	ix, err := config.Parse("mesh.yaml", []byte(m.config("", "")))
	if err != nil {
		t.Fatal(err)
	}
	mark := func(uid, svcHost string) *workload.Index {
		ws := copyMarked(ix.Workloads(), func(w *workload.Workload) bool { return w.UID == uid }, func(w *workload.Workload) { w.Unsupported = "a waypoint" })
		ss := copyMarked(ix.Services(), func(s *workload.Service) bool { return s.Hostname == svcHost }, func(s *workload.Service) { s.Unsupported = "a waypoint" })
		out, err := workload.NewIndex(ws, ss, ix.Policies())
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	refused := func(host string, port uint16) {
		t.Helper()
		c, code, err := m.socks(host, port)
		if err == nil && code == 0 {
			c.Close()
			t.Fatalf("%s:%d was served; want it refused", host, port)
		}
		if c != nil {
			c.Close()
		}
	}
	// The service has a waypoint: its VIP is refused, the pod itself served.
	if err := m.client.p.SetIndex(mark("", "echo.default.svc.cluster.local")); err != nil {
		t.Fatal(err)
	}
	refused(fmt.Sprintf("10.96.%d.10", m.n), 80)
	m.mustEcho(m.serverIP.String(), 8080)
	// The workload has one: refused by the client's proxy ...
	if err := m.client.p.SetIndex(mark("test//server", "")); err != nil {
		t.Fatal(err)
	}
	refused(m.serverIP.String(), 8080)
	// ... and by the server's, from a client that does not know.
	if err := m.client.p.SetIndex(ix); err != nil {
		t.Fatal(err)
	}
	if err := m.server.p.SetIndex(mark("test//server", "")); err != nil {
		t.Fatal(err)
	}
	c, code, err := m.socks(m.serverIP.String(), 8080)
	if err == nil && code == 0 {
		back, rerr := roundTrip(c, []byte("hi\n"))
		c.Close()
		if rerr == nil && string(back) == "hi\n" {
			t.Fatal("the server's proxy served a workload with a waypoint around it")
		}
	}
	for _, n := range []*node{m.client, m.server} {
		testutil.WaitFor(t, "the refusal in the access log", func() bool {
			return strings.Contains(n.log.String(), "needs a waypoint, which Ambit does not implement yet: refused (fail closed)")
		})
		metrics := get(t, "http://"+netip.AddrPortFrom(n.ip, ambient.StatsPort).String()+"/metrics")
		if !strings.Contains(metrics, `response_flags="UNSUPPORTED"`) {
			t.Errorf("no failure counted with flag UNSUPPORTED:\n%s", metrics)
		}
	}
}

// copyMarked is items with those that match replaced by marked copies.
func copyMarked[T any](items []*T, match func(*T) bool, mark func(*T)) []*T {
	out := make([]*T, 0, len(items))
	for _, it := range items {
		if match(it) {
			c := *it
			mark(&c)
			it = &c
		}
		out = append(out, it)
	}
	return out
}

// TestQuitQuitQuit: POST /quitquitquit on the admin port stops the proxy as
// SIGTERM does (ztunnel's and Envoy's endpoint); any other method is 405.
func TestQuitQuitQuit(t *testing.T) {
	m := newMesh(t, "", "")
	admin := "http://" + netip.AddrPortFrom(m.serverIP, ambient.AdminPort).String() + "/quitquitquit"
	resp, err := http.Get(admin)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET /quitquitquit: %d, want 405", resp.StatusCode)
	}
	m.mustEcho(m.serverIP.String(), 8080)
	resp, err = http.Post(admin, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /quitquitquit: %d", resp.StatusCode)
	}
	testutil.WaitFor(t, "the server's proxy stopped", func() bool {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(m.serverIP, ambient.ReadinessPort).String(), time.Second)
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
	if !strings.Contains(m.server.log.String(), "asked to stop on the admin port") {
		t.Errorf("no log line for the stop:\n%s", m.server.log.String())
	}
}
