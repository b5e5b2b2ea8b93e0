package nodeagent

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/vishvananda/netns"
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
