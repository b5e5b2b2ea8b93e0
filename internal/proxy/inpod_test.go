package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/nodeagent"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/ambitmesh/ambit/internal/zds"
	"istio.io/istio/pkg/zdsapi"
)

// The seed's path with in-pod capture: a client pod's plain TCP connection
// to a server pod is captured in the client's namespace, carried over HBONE
// between the pods' addresses, and delivered in the server's namespace from
// the client's IP. One shared proxy serves both pods here; the lab splits
// them across nodes.
func TestInPodCaptureCarriesTheSeedRequest(t *testing.T) {
	clientNS, clientName := testutil.Netns(t)
	serverNS, serverName := testutil.Netns(t)
	testutil.Veth(t, clientNS, serverNS, "10.250.9.2/24", "10.250.9.3/24")
	doc := `workloads:
- {uid: seed//client, name: client, namespace: default, serviceAccount: default, workloadIps: ["10.250.9.2"], protocol: HBONE, node: master}
- {uid: seed//server, name: server, namespace: default, serviceAccount: default, workloadIps: ["10.250.9.3"], protocol: HBONE, node: master}
- {uid: seed//elsewhere, name: elsewhere, namespace: default, serviceAccount: default, workloadIps: ["10.250.9.9"], protocol: HBONE, node: worker1}
`
	ix, err := config.Parse("seed.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	// Enrollment goes the real way: the node agent installs capture and
	// hands each namespace to the proxy over the ZDS socket.
	p, agent, lb := inPodProxy(t, ix, netip.MustParseAddr("127.0.77.1"))
	// The client pod is enrolled as the proxy connects (it may come in the
	// snapshot), the server after (an add).
	if err := agent.Enroll(nodeagent.Pod{UID: "seed//client", Info: &zdsapi.WorkloadInfo{Name: "client", Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + clientName}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the snapshot", func() bool { return p.podAt(netip.MustParseAddr("10.250.9.2")) != nil })
	testutil.WaitFor(t, "readiness", func() bool { ok, _ := p.Ready(); return ok })
	if err := agent.Enroll(nodeagent.Pod{UID: "seed//server", Info: &zdsapi.WorkloadInfo{Name: "server", Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + serverName}); err != nil {
		t.Fatal(err)
	}
	if p.podAt(netip.MustParseAddr("10.250.9.3")) == nil {
		t.Fatal("the server pod was acked but is not served")
	}
	// A pod xDS places on another node is refused, and its capture rolled back.
	otherNS, otherName := testutil.Netns(t)
	err = agent.Enroll(nodeagent.Pod{UID: "seed//elsewhere", NSPath: "/run/netns/" + otherName})
	if err == nil || !strings.Contains(err.Error(), `a workload of node "worker1"`) {
		t.Fatalf("a pod of another node: %v, want a refusal naming its node", err)
	}
	if ok, _ := capture.Installed(otherNS); ok {
		t.Fatal("a refused pod was left captured")
	}

	// The server pod's app: an echo server that reports who called.
	var app net.Listener
	if err := nsutil.Do(serverNS, func() (err error) { app, err = net.Listen("tcp", "10.250.9.3:80"); return }); err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	peers := make(chan string, 4)
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			peers <- c.RemoteAddr().String()
			go func() { defer c.Close(); io.Copy(c, c); c.(*net.TCPConn).CloseWrite() }()
		}
	}()

	// The client pod's app: an ordinary connection to the server pod.
	request := []byte("GET / HTTP/1.1\r\nHost: 10.250.9.3\r\nUser-Agent: curl/7.85.0\r\nAccept: */*\r\n\r\n")
	var c net.Conn
	if err := nsutil.Do(clientNS, func() (err error) {
		c, err = net.DialTimeout("tcp", "10.250.9.3:80", 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	back, err := roundTrip(c.(*net.TCPConn), request)
	if err != nil || !bytes.Equal(back, request) {
		t.Fatalf("through the mesh: %q, %v\nproxy log:\n%s", back, err, lb.String())
	}
	select {
	case peer := <-peers:
		if peer != c.LocalAddr().String() {
			t.Errorf("the server app saw %s, want the client pod's own address and port %s", peer, c.LocalAddr())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the app never accepted")
	}

	// A client port the proxy cannot use where the app is (here something
	// in the server pod listens on it): the connection still goes through,
	// from the client's IP and another port.
	var taken net.Listener
	if err := nsutil.Do(serverNS, func() (err error) { taken, err = net.Listen("tcp", "0.0.0.0:0"); return }); err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := taken.Addr().(*net.TCPAddr).Port
	var c2 net.Conn
	if err := nsutil.Do(clientNS, func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(10, 250, 9, 2), Port: takenPort}}
		c2, err = d.Dial("tcp", "10.250.9.3:80")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	back, err = roundTrip(c2.(*net.TCPConn), request)
	c2.Close()
	if err != nil || !bytes.Equal(back, request) {
		t.Fatalf("from a client port taken in the server pod: %q, %v\nproxy log:\n%s", back, err, lb.String())
	}
	select {
	case peer := <-peers:
		if ap := netip.MustParseAddrPort(peer); ap.Addr() != netip.MustParseAddr("10.250.9.2") || int(ap.Port()) == takenPort {
			t.Errorf("with the client's port %d taken, the server app saw %s; want 10.250.9.2 and another port", takenPort, peer)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the app never accepted the second connection")
	}
	testutil.WaitFor(t, "both access-log records", func() bool { return strings.Count(lb.String(), "connection complete") >= 4 })
	logs := lb.String()
	for _, want := range []string{
		"src.addr=10.250.9.2:", "dst.addr=10.250.9.3:80", "dst.hbone_addr=10.250.9.3:15008",
		"src.identity=spiffe://cluster.local/ns/default/sa/default", "direction=outbound", "direction=inbound",
		fmt.Sprintf("bytes_sent=%d bytes_recv=%d", len(request), len(request)),
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("access log lacks %q:\n%s", want, logs)
		}
	}

	// Taking the client out of the mesh: rules and listeners go; its next
	// connection goes direct, and the proxy sees nothing of it.
	if err := agent.Unenroll("seed//client"); err != nil {
		t.Fatal(err)
	}
	if p.podAt(netip.MustParseAddr("10.250.9.2")) != nil {
		t.Fatal("the proxy still serves the unenrolled pod")
	}
	before := strings.Count(lb.String(), "connection complete")
	if err := nsutil.Do(clientNS, func() (err error) {
		c, err = net.DialTimeout("tcp", "10.250.9.3:80", 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	back, err = roundTrip(c.(*net.TCPConn), request)
	c.Close()
	if err != nil || !bytes.Equal(back, request) {
		t.Fatalf("direct after unenroll: %q, %v", back, err)
	}
	// The server pod is still captured: a plaintext arrival goes through
	// 15006 (policy with no identity) and is logged as inbound.
	testutil.WaitFor(t, "the plaintext inbound record", func() bool {
		return strings.Count(lb.String(), "connection complete") == before+1
	})
	if last := lastLine(lb.String(), "connection complete"); !strings.Contains(last, "direction=inbound") || strings.Contains(last, "src.identity") {
		t.Errorf("after unenroll, the record is %q; want a plaintext inbound one", last)
	}
}

func lastLine(s, sub string) string {
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], sub) {
			return lines[i]
		}
	}
	return ""
}

// TestPodEnrolledBeforeXDS: on Kubernetes a pod is enrolled during its CNI
// ADD, before xDS can know it. The proxy takes it (its address from its
// namespace), refuses its traffic while xDS lacks it (fail closed: no
// identity to send with), and carries it once xDS brings it.
func TestPodEnrolledBeforeXDS(t *testing.T) {
	podNS, podName := testutil.Netns(t)
	peerNS, _ := testutil.Netns(t)
	testutil.Veth(t, podNS, peerNS, "10.250.7.2/24", "10.250.7.3/24")
	ix, err := config.Parse("empty.yaml", []byte("workloads: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, agent, lb := inPodProxy(t, ix, netip.MustParseAddr("127.0.77.2"))
	testutil.WaitFor(t, "the proxy on the ZDS socket", func() bool { return agent.ProxyConnected() })

	if err := agent.Enroll(nodeagent.Pod{UID: "k//Pod/default/early", Info: &zdsapi.WorkloadInfo{Name: "early", Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + podName}); err != nil {
		t.Fatalf("a pod xDS does not know yet: %v (the CNI ADD would fail)", err)
	}
	if p.podAt(netip.MustParseAddr("10.250.7.2")) == nil {
		t.Fatal("the early pod is not served at its namespace's address")
	}
	if active, pending := p.podCounts(); active != 1 || pending != 1 { // workload_manager_*_proxy_count
		t.Errorf("pods active %d, pending %d; want 1 and 1 (xDS does not have it)", active, pending)
	}
	// Its peer outside the mesh.
	var app net.Listener
	if err := nsutil.Do(peerNS, func() (err error) { app, err = net.Listen("tcp", "10.250.7.3:80"); return }); err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c); c.(*net.TCPConn).CloseWrite() }()
		}
	}()
	request := []byte("ping\n")
	try := func() ([]byte, error) {
		var c net.Conn
		if err := nsutil.Do(podNS, func() (err error) {
			c, err = net.DialTimeout("tcp", "10.250.7.3:80", 5*time.Second)
			return err
		}); err != nil {
			return nil, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return roundTrip(c.(*net.TCPConn), request)
	}
	if back, err := try(); err == nil && bytes.Equal(back, request) {
		t.Fatal("traffic of a pod xDS does not know went through; want it refused until xDS has it")
	}
	doc := `workloads:
- {uid: k//Pod/default/early, name: early, namespace: default, serviceAccount: default, workloadIps: ["10.250.7.2"], protocol: HBONE, node: master}
`
	ix2, err := config.Parse("later.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.SetIndex(ix2); err != nil {
		t.Fatal(err)
	}
	if back, err := try(); err != nil || !bytes.Equal(back, request) {
		t.Fatalf("once xDS has the pod: %q, %v\nproxy log:\n%s", back, err, lb.String())
	}
	if active, pending := p.podCounts(); active != 1 || pending != 0 {
		t.Errorf("once xDS has it: pods active %d, pending %d; want 1 and 0", active, pending)
	}
}

// inPodProxy runs a shared proxy for node master, listening on nodeIP,
// with a node agent serving it pods over a ZDS socket.
func inPodProxy(t *testing.T, ix *workload.Index, nodeIP netip.Addr, opts ...func(*Options)) (*Proxy, *nodeagent.Agent, *logBuf) {
	t.Helper()
	lb := &logBuf{}
	log := slog.New(slog.NewTextHandler(lb, nil))
	certs := identity.NewManager(&identity.LocalIssuer{CA: testutil.CA(t)}, log)
	t.Cleanup(certs.Close)
	o := Options{Node: "master", ListenIP: nodeIP, AdminIP: nodeIP, Certs: certs, Log: log, Metrics: telemetry.NewMetrics("test"), ZDS: true}
	for _, f := range opts {
		f(&o)
	}
	p, err := New(o, ix)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return p, runAgent(t, p, log), lb
}

// runAgent serves p pods from a node agent over a ZDS socket, until the
// test ends.
func runAgent(t *testing.T, p *Proxy, log *slog.Logger) *nodeagent.Agent {
	t.Helper()
	agent := &nodeagent.Agent{Socket: filepath.Join(t.TempDir(), "zds.sock"), Log: log}
	zc := &zds.Client{Socket: agent.Socket, Handler: p.ZDS(), Log: log}
	actx, acancel := context.WithCancel(context.Background())
	adone := make(chan struct{}, 2)
	go func() { agent.Serve(actx); adone <- struct{}{} }()
	go func() { zc.Run(actx); adone <- struct{}{} }()
	t.Cleanup(func() { acancel(); <-adone; <-adone })
	return agent
}

// TestNotReadyBeforeTheSnapshot: with pods from ZDS, the proxy is not
// ready until the node agent's first snapshot is in, and stays ready
// after (an agent restart does not take the node's pods away).
func TestNotReadyBeforeTheSnapshot(t *testing.T) {
	ix, err := config.Parse("empty.yaml", []byte("workloads: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Options{Node: "master", ZDS: true, Certs: identity.NewManager(&identity.LocalIssuer{CA: testutil.CA(t)}, nil), Metrics: telemetry.NewMetrics("test")}, ix)
	if err != nil {
		t.Fatal(err)
	}
	if ok, why := p.Ready(); ok || !strings.Contains(why, "snapshot") {
		t.Fatalf("before the snapshot: ready %v (%s)", ok, why)
	}
	if err := p.ZDS().SnapshotDone(map[string]bool{}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if ok, why := p.Ready(); !ok {
			t.Fatalf("after the snapshot: not ready (%s)", why)
		}
	}
}

// TestPodListenersLeaveRoomForASuccessor: with PortReuse (ztunnel's
// INPOD_PORT_REUSE) a pod's listeners are opened with SO_REUSEPORT, so
// the proxy that replaces this one during an upgrade can open its own on
// the same ports before this one closes; without it the ports are taken.
func TestPodListenersLeaveRoomForASuccessor(t *testing.T) {
	for _, reuse := range []bool{true, false} {
		podNS, podName := testutil.Netns(t)
		peerNS, _ := testutil.Netns(t)
		testutil.Veth(t, podNS, peerNS, "10.250.8.2/24", "10.250.8.3/24")
		ix, err := config.Parse("pod.yaml", []byte("workloads:\n- {uid: k//Pod/default/p, name: p, namespace: default, workloadIps: [\"10.250.8.2\"], protocol: HBONE, node: master}\n"))
		if err != nil {
			t.Fatal(err)
		}
		nodeIP := netip.MustParseAddr("127.0.77.3")
		if reuse {
			nodeIP = netip.MustParseAddr("127.0.77.4")
		}
		p, agent, _ := inPodProxy(t, ix, nodeIP, func(o *Options) { o.PortReuse = reuse })
		testutil.WaitFor(t, "the proxy on the ZDS socket", func() bool { return agent.ProxyConnected() })
		if err := agent.Enroll(nodeagent.Pod{UID: "k//Pod/default/p", Info: &zdsapi.WorkloadInfo{Name: "p", Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + podName}); err != nil {
			t.Fatal(err)
		}
		if p.podAt(netip.MustParseAddr("10.250.8.2")) == nil {
			t.Fatal("the pod is not served")
		}
		for _, port := range []int{15001, 15006, 15008} {
			var l net.Listener
			err := nsutil.Do(podNS, func() (err error) {
				lc := net.ListenConfig{Control: markTransparentReusePort}
				l, err = lc.Listen(context.Background(), "tcp", fmt.Sprintf("0.0.0.0:%d", port))
				return err
			})
			if reuse && err != nil {
				t.Errorf("port %d: a successor cannot open its listener beside ours: %v", port, err)
			}
			if !reuse && err == nil {
				t.Errorf("port %d: a second listener opened without SO_REUSEPORT on ours", port)
			}
			if l != nil {
				l.Close()
			}
		}
	}
}

// TestPodByItsKubernetesUID: istio-cni names a pod by its Kubernetes UID,
// which istiod's workload uids ("Kubernetes//Pod/ns/name") do not carry;
// the proxy finds the pod's workload by the WorkloadInfo's namespace and
// name, as ztunnel does, and does not hold it as one xDS lacks.
func TestPodByItsKubernetesUID(t *testing.T) {
	podNS, podName := testutil.Netns(t)
	peerNS, _ := testutil.Netns(t)
	testutil.Veth(t, podNS, peerNS, "10.250.12.2/24", "10.250.12.3/24")
	ix, err := config.Parse("pod.yaml", []byte("workloads:\n- {uid: Kubernetes//Pod/default/named, name: named, namespace: default, workloadIps: [\"10.250.12.2\"], protocol: HBONE, node: master}\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, agent, lb := inPodProxy(t, ix, netip.MustParseAddr("127.0.77.7"))
	testutil.WaitFor(t, "the proxy on the ZDS socket", func() bool { return agent.ProxyConnected() })
	const k8sUID = "0b6c2a9e-3f0d-4c55-9d6b-1c1a2b3c4d5e"
	if err := agent.Enroll(nodeagent.Pod{UID: k8sUID, Info: &zdsapi.WorkloadInfo{Name: "named", Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + podName}); err != nil {
		t.Fatal(err)
	}
	if active, pending := p.podCounts(); active != 1 || pending != 0 {
		t.Errorf("pods active %d, pending %d; want 1 and 0 (xDS has it, by namespace and name)", active, pending)
	}
	if strings.Contains(lb.String(), "pod added before xDS has it") {
		t.Errorf("the pod was held as one xDS lacks:\n%s", lb.String())
	}
	if st, ok := p.buildDump().WorkloadState["Kubernetes//Pod/default/named"]; !ok || st.Info.Name != "named" {
		t.Errorf("workloadState %+v: want the pod under its workload's uid", p.buildDump().WorkloadState)
	}
	if err := agent.Unenroll(k8sUID); err != nil {
		t.Fatalf("a delete by the Kubernetes UID: %v", err)
	}
	if active, _ := p.podCounts(); active != 0 {
		t.Error("the pod is still enrolled after its delete")
	}
}
