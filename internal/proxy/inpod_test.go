package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/vishvananda/netns"
)

// The seed's path with in-pod capture: a client pod's plain TCP connection
// to a server pod is captured in the client's namespace, carried over HBONE
// between the pods' addresses, and delivered in the server's namespace from
// the client's IP. One shared proxy serves both pods here; the lab splits
// them across nodes.
func TestInPodCaptureCarriesTheSeedRequest(t *testing.T) {
	clientNS, _ := testutil.Netns(t)
	serverNS, _ := testutil.Netns(t)
	testutil.Veth(t, clientNS, serverNS, "10.250.9.2/24", "10.250.9.3/24")
	for _, ns := range []netns.NsHandle{clientNS, serverNS} {
		if err := capture.Install(ns, capture.Config{}); err != nil {
			t.Fatal(err)
		}
	}
	doc := `workloads:
- {uid: seed//client, name: client, namespace: default, serviceAccount: default, workloadIps: ["10.250.9.2"], protocol: HBONE, node: master}
- {uid: seed//server, name: server, namespace: default, serviceAccount: default, workloadIps: ["10.250.9.3"], protocol: HBONE, node: master}
`
	ix, err := config.Parse("seed.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := identity.InitCA(t.TempDir(), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	lb := &logBuf{}
	log := slog.New(slog.NewTextHandler(lb, nil))
	certs := identity.NewManager(&identity.LocalIssuer{CA: ca}, log)
	t.Cleanup(certs.Close)
	nodeIP := netip.MustParseAddr("127.0.77.1")
	p, err := New(Options{Node: "master", ListenIP: nodeIP, AdminIP: nodeIP, Certs: certs, Log: log, Metrics: telemetry.NewMetrics("test")}, ix)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	waitFor(t, "readiness", func() bool { ok, _ := p.Ready(); return ok })
	if err := p.AddPod("seed//client", clientNS); err != nil {
		t.Fatal(err)
	}
	if err := p.AddPod("seed//server", serverNS); err != nil {
		t.Fatal(err)
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
		if !strings.HasPrefix(peer, "10.250.9.2:") {
			t.Errorf("the server app saw %s, want the client pod's IP 10.250.9.2", peer)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the app never accepted")
	}
	waitFor(t, "both access-log records", func() bool { return strings.Count(lb.String(), "connection complete") >= 2 })
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
	if err := p.RemovePod("seed//client"); err != nil {
		t.Fatal(err)
	}
	if err := capture.Remove(clientNS, capture.Config{}); err != nil {
		t.Fatal(err)
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
	waitFor(t, "the plaintext inbound record", func() bool {
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
