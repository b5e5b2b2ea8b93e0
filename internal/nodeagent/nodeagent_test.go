package nodeagent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"
)

// recorder is a proxy stand-in that records what the agent sends; it
// checks each namespace it is given is the pod's by the kernel's id.
type recorder struct {
	mu     sync.Mutex
	events []string
	want   map[string]string // uid -> the pod namespace's kernel id (netns.UniqueId)
}

func (r *recorder) log(e string) { r.mu.Lock(); r.events = append(r.events, e); r.mu.Unlock() }

func (r *recorder) Add(uid string, info *zdsapi.WorkloadInfo, ns netns.NsHandle) error {
	if got := ns.UniqueId(); got != r.want[uid] {
		r.log("add " + uid + " WRONG NETNS " + got)
		return errors.New("wrong namespace")
	}
	r.log("add " + uid + " " + info.GetServiceAccount())
	return nil
}
func (r *recorder) Keep(uid string) error { r.log("keep " + uid); return nil }
func (r *recorder) Del(uid string) error  { r.log("del " + uid); return nil }
func (r *recorder) SnapshotDone(map[string]bool) error {
	r.log("snapshot-done")
	return nil
}
func (r *recorder) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.events...)
}

func waitEvents(t *testing.T, r *recorder, n int) []string {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if ev := r.get(); len(ev) >= n {
			return ev
		}
	}
	t.Fatalf("waited for %d events, got %q", n, r.get())
	return nil
}

func TestSnapshotAddDelAndReconnect(t *testing.T) {
	podA, nameA := testutil.Netns(t)
	podB, nameB := testutil.Netns(t)
	r := &recorder{want: map[string]string{"a": podA.UniqueId(), "b": podB.UniqueId()}}
	sock := filepath.Join(t.TempDir(), "zds.sock")
	agent := &Agent{Socket: sock, AckTimeout: 2 * time.Second}
	if err := agent.Enroll(Pod{UID: "a", Info: &zdsapi.WorkloadInfo{ServiceAccount: "sa-a"}, NSPath: "/run/netns/" + nameA}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := capture.Installed(podA); !ok {
		t.Fatal("enroll did not install capture")
	}
	start := func() context.CancelFunc {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { agent.Serve(ctx); close(done) }()
		return func() { cancel(); <-done }
	}
	stopAgent := start()
	ctx, cancel := context.WithCancel(context.Background())
	cdone := make(chan struct{})
	go func() { (&zds.Client{Socket: sock, Handler: r}).Run(ctx); close(cdone) }()
	defer func() { cancel(); <-cdone }()

	ev := waitEvents(t, r, 2)
	if ev[0] != "add a sa-a" || ev[1] != "snapshot-done" {
		t.Fatalf("snapshot: %q", ev)
	}
	if err := agent.Enroll(Pod{UID: "b", Info: &zdsapi.WorkloadInfo{ServiceAccount: "sa-b"}, NSPath: "/run/netns/" + nameB}); err != nil {
		t.Fatal(err)
	}
	if ev := r.get(); ev[len(ev)-1] != "add b sa-b" {
		t.Fatalf("add: %q", ev)
	}
	if err := agent.Unenroll("a"); err != nil {
		t.Fatal(err)
	}
	if ev := r.get(); ev[len(ev)-1] != "del a" {
		t.Fatalf("del: %q", ev)
	}
	if ok, _ := capture.Installed(podA); ok {
		t.Fatal("unenroll left capture installed")
	}
	// The agent restarts: the proxy reconnects and gets the snapshot again.
	stopAgent()
	stopAgent = start()
	defer stopAgent()
	ev = waitEvents(t, r, 6)
	if ev[4] != "add b sa-b" || ev[5] != "snapshot-done" {
		t.Fatalf("after reconnect: %q", ev)
	}
}

// A proxy that vanishes mid-request (no ack) is not a refusal: the pod
// stays enrolled and captured, for the snapshot when a proxy comes back.
func TestEnrollSurvivesAProxyThatVanishes(t *testing.T) {
	pod, name := testutil.Netns(t)
	sock := filepath.Join(t.TempDir(), "zds.sock")
	agent := &Agent{Socket: sock, AckTimeout: 2 * time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { agent.Serve(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	// A bare ZDS peer: hello, ack the (empty) snapshot, then hang up on the add.
	var c *net.UnixConn
	for end := time.Now().Add(5 * time.Second); c == nil && time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if raw, err := net.Dial("unixpacket", sock); err == nil {
			c = raw.(*net.UnixConn)
		}
	}
	if c == nil {
		t.Fatal("agent socket never came up")
	}
	zds.Send(c, &zdsapi.ZdsHello{Version: zdsapi.Version_V1}, -1)
	var req zdsapi.WorkloadRequest
	if _, err := zds.Recv(c, &req); err != nil || req.GetSnapshotSent() == nil {
		t.Fatalf("want SnapshotSent, got %v %v", &req, err)
	}
	zds.Send(c, &zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{}}}, -1)
	go func() {
		var add zdsapi.WorkloadRequest
		if fd, err := zds.Recv(c, &add); err == nil && fd >= 0 {
			unix.Close(fd)
		}
		c.Close() // gone without an answer
	}()
	time.Sleep(300 * time.Millisecond) // the agent now counts this peer as its proxy
	if err := agent.Enroll(Pod{UID: "v", NSPath: "/run/netns/" + name}); err != nil {
		t.Fatalf("enroll with a vanishing proxy: %v", err)
	}
	if got := agent.Pods(); len(got) != 1 || got[0] != "v" {
		t.Fatalf("pods %v", got)
	}
	if ok, _ := capture.Installed(pod); !ok {
		t.Fatal("capture removed although the proxy never refused")
	}
}
