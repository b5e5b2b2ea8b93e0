package zds

import (
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"
)

// pair is two ends of a real SOCK_SEQPACKET socket.
func pair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		c, err := net.FileConn(os.NewFile(uintptr(fd), "zds"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func TestSendRecvWithDescriptor(t *testing.T) {
	a, b := pair(t)
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	req := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "u1",
		WorkloadInfo: &zdsapi.WorkloadInfo{Name: "client", Namespace: "default", ServiceAccount: "sa"}}}}
	if err := Send(a, req, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	var got zdsapi.WorkloadRequest
	fd, err := Recv(b, &got)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st1, st2 unix.Stat_t
	unix.Fstat(int(f.Fd()), &st1)
	unix.Fstat(fd, &st2)
	if fd < 0 || st1.Ino != st2.Ino || got.GetAdd().GetUid() != "u1" || got.GetAdd().GetWorkloadInfo().GetServiceAccount() != "sa" {
		t.Fatalf("got %v fd %d (same file: %v)", &got, fd, st1.Ino == st2.Ino)
	}
}

func TestRecvRefusesGarbage(t *testing.T) {
	a, b := pair(t)
	if _, err := a.Write([]byte{0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	var m zdsapi.WorkloadRequest
	if _, err := Recv(b, &m); err == nil || !strings.Contains(err.Error(), "unmarshal") {
		t.Fatalf("garbage: %v", err)
	}
	// An add without a namespace is refused by the client, not crashed on.
	c := &Client{Handler: nil}
	sent := map[string]bool{}
	snap := true
	if err := c.handle(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "x"}}}, -1, sent, &snap); err == nil {
		t.Fatal("add without a namespace accepted")
	}
	snap = false
	if err := c.handle(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: "x"}}}, -1, sent, &snap); err == nil {
		t.Fatal("keep after the snapshot accepted")
	}
	if err := c.handle(&zdsapi.WorkloadRequest{}, -1, sent, &snap); err == nil {
		t.Fatal("empty request accepted")
	}
}
