package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/nodeagent"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/vishvananda/netns"
	"istio.io/istio/pkg/zdsapi"
)

// TestUpgradeWithoutReset is the DaemonSet's rolling update, proxy by
// proxy (ztunnel has it open as istio/ztunnel#1191): a connection between
// two captured pods is carried by the old proxy; the new one opens the
// pods' listeners beside the old one's (SO_REUSEPORT); the old one is told
// to stop (SIGTERM) and drains. The live connection goes on to its end,
// byte-exact, without a reset; a connection opened during the drain goes
// to the new proxy; and the old proxy ends as soon as its last connection
// does, not at the drain deadline.
func TestUpgradeWithoutReset(t *testing.T) {
	clientNS, clientName := testutil.Netns(t)
	serverNS, serverName := testutil.Netns(t)
	testutil.Veth(t, clientNS, serverNS, "10.250.11.2/24", "10.250.11.3/24")
	ix, err := config.Parse("upgrade.yaml", []byte(`workloads:
- {uid: up//client, name: client, namespace: default, workloadIps: ["10.250.11.2"], protocol: HBONE, node: master}
- {uid: up//server, name: server, namespace: default, workloadIps: ["10.250.11.3"], protocol: HBONE, node: master}
`))
	if err != nil {
		t.Fatal(err)
	}
	ca := testutil.CA(t)
	start := func(nodeIP string, zdsMode bool) (*Proxy, *logBuf, func(), <-chan struct{}) {
		lb := &logBuf{}
		log := slog.New(slog.NewTextHandler(lb, nil))
		certs := identity.NewManager(&identity.LocalIssuer{CA: ca}, log)
		t.Cleanup(certs.Close)
		ip := netip.MustParseAddr(nodeIP)
		p, err := New(Options{Node: "master", ListenIP: ip, AdminIP: ip, Certs: certs, Log: log, Metrics: telemetry.NewMetrics("test"),
			ZDS: zdsMode, PortReuse: true, DrainTimeout: time.Minute}, ix)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { p.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
		return p, lb, cancel, done
	}

	// The old proxy, its pods enrolled the real way (the node agent
	// installs capture and hands the namespaces over ZDS).
	old, oldLog, stopOld, oldDone := start("127.0.77.5", true)
	agent := runAgent(t, old, slog.New(slog.DiscardHandler))
	testutil.WaitFor(t, "the old proxy on the ZDS socket", agent.ProxyConnected)
	for _, pod := range []struct{ uid, name, ns string }{{"up//client", "client", clientName}, {"up//server", "server", serverName}} {
		if err := agent.Enroll(nodeagent.Pod{UID: pod.uid, Info: &zdsapi.WorkloadInfo{Name: pod.name, Namespace: "default", ServiceAccount: "default"}, NSPath: "/run/netns/" + pod.ns}); err != nil {
			t.Fatal(err)
		}
	}

	// The server pod's app echoes.
	var app net.Listener
	if err := nsutil.Do(serverNS, func() (err error) { app, err = net.Listen("tcp", "10.250.11.3:80"); return }); err != nil {
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
	dial := func() *net.TCPConn {
		var c net.Conn
		if err := nsutil.Do(clientNS, func() (err error) {
			c, err = net.DialTimeout("tcp", "10.250.11.3:80", 5*time.Second)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return c.(*net.TCPConn)
	}

	// The long transfer: 4 MB each way, the first half before the upgrade.
	const half = 2 << 20
	sent := make([]byte, 2*half)
	rand.Read(sent)
	live := dial()
	defer live.Close()
	live.SetDeadline(time.Now().Add(2 * time.Minute))
	got := make(chan []byte, 1)
	readErr := make(chan error, 1)
	go func() {
		b, err := io.ReadAll(live)
		got <- b
		readErr <- err
	}()
	if _, err := live.Write(sent[:half]); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the old proxy relaying the live connection", func() bool { return old.relaying() >= 2 })

	// The new proxy opens the pods' listeners beside the old one's (its
	// node agent would hand it the same namespaces), then the old one stops.
	next, nextLog, _, _ := start("127.0.77.6", false)
	for uid, ns := range map[string]netns.NsHandle{"up//client": clientNS, "up//server": serverNS} {
		if err := next.AddPod(uid, nil, ns); err != nil {
			t.Fatalf("the new proxy cannot open %s's listeners beside the old one's: %v", uid, err)
		}
	}
	stopOld()
	testutil.WaitFor(t, "the old proxy's pod listeners closed", func() bool {
		return old.podAt(netip.MustParseAddr("10.250.11.2")) == nil && old.podAt(netip.MustParseAddr("10.250.11.3")) == nil
	})

	// During the drain a new connection goes to the new proxy.
	fresh := dial()
	fresh.SetDeadline(time.Now().Add(30 * time.Second))
	back, err := roundTrip(fresh, []byte("during the drain"))
	fresh.Close()
	if err != nil || string(back) != "during the drain" {
		t.Fatalf("a connection during the drain: %q, %v\nnew proxy:\n%s", back, err, nextLog.String())
	}
	testutil.WaitFor(t, "the new proxy's records of it", func() bool {
		return strings.Count(nextLog.String(), "connection complete") >= 2
	})
	select {
	case <-oldDone:
		t.Fatal("the old proxy ended with a live connection")
	default:
	}

	// The live connection finishes through the old proxy.
	if _, err := live.Write(sent[half:]); err != nil {
		t.Fatalf("the live connection after the old proxy was stopped: %v", err)
	}
	if err := live.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if b, err := <-got, <-readErr; err != nil || !bytes.Equal(b, sent) {
		t.Fatalf("the live connection across the upgrade: %d of %d bytes back, %v\nold proxy:\n%s", len(b), len(sent), err, oldLog.String())
	}
	select {
	case <-oldDone:
	case <-time.After(50 * time.Second): // under the drain deadline (a minute): it must end with its last connection
		t.Fatalf("the old proxy did not end after its last connection\n%s", oldLog.String())
	}
	if s := oldLog.String(); strings.Contains(s, "drain deadline passed") || strings.Contains(s, "error=") {
		t.Errorf("the old proxy's drain:\n%s", s)
	}
}
