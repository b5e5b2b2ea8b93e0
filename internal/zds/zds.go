// Package zds speaks Istio's ZDS protocol (istio.workload.zds), by which a
// node agent hands pods' network namespaces to the node proxy: one protobuf
// message per SOCK_SEQPACKET packet, the namespace travelling as an
// SCM_RIGHTS file descriptor beside an AddWorkload. The proxy connects and
// says hello; the agent sends its snapshot (each message acked), then
// SnapshotSent, then adds and deletes as they happen.
package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/ambitmesh/ambit/internal/backoff"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// DefaultSocket is where istio-cni's node agent listens.
const DefaultSocket = "/var/run/ztunnel/ztunnel.sock"

// maxMessage bounds one packet; ZDS messages are a few hundred bytes.
const maxMessage = 64 << 10

// Send writes one message, with the file descriptor fd attached if fd >= 0.
func Send(c *net.UnixConn, m proto.Message, fd int) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("zds: marshal: %w", err)
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("zds: send: %w", err)
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("zds: short send (%d of %d bytes)", n, len(b))
	}
	return nil
}

// Recv reads one message into m. It returns the attached file descriptor,
// or -1; the caller owns it. Extra descriptors are closed.
func Recv(c *net.UnixConn, m proto.Message) (int, error) {
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return -1, err
	}
	fds, perr := fdsOf(oob[:oobn])
	fd := -1
	if len(fds) > 0 {
		fd = fds[0]
		for _, extra := range fds[1:] {
			unix.Close(extra)
		}
	}
	fail := func(err error) (int, error) {
		if fd >= 0 {
			unix.Close(fd)
		}
		return -1, err
	}
	switch {
	case perr != nil:
		return fail(fmt.Errorf("zds: control message: %w", perr))
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0:
		return fail(errors.New("zds: message truncated"))
	case n == 0:
		return fail(errors.New("zds: peer closed the connection"))
	}
	if err := proto.Unmarshal(buf[:n], m); err != nil {
		return fail(fmt.Errorf("zds: unmarshal: %w", err))
	}
	return fd, nil
}

func fdsOf(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, err
		}
		fds = append(fds, f...)
	}
	return fds, nil
}

// Handler is what the proxy does with the agent's requests. Each call's
// error goes back to the agent in the ack.
type Handler interface {
	// Add enrolls a pod; ns is valid only during the call (keep a dup).
	Add(uid string, info *zdsapi.WorkloadInfo, ns netns.NsHandle) error
	// Keep says a pod the agent has no namespace for stays.
	Keep(uid string) error
	// Del removes a pod.
	Del(uid string) error
	// SnapshotDone says every current pod was sent: others are gone.
	SnapshotDone(sent map[string]bool) error
}

// Client is the proxy's side: it connects to the agent's socket and serves
// requests, reconnecting with backoff (10 ms doubling to 15 s) until ctx ends.
type Client struct {
	Socket  string
	Handler Handler
	Log     *slog.Logger
}

// Run serves until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	log := c.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	retry := backoff.Backoff{Min: 10 * time.Millisecond, Max: 15 * time.Second}
	for {
		start := time.Now()
		err := c.session(ctx, log)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > 30*time.Second {
			retry.Reset()
		}
		wait := retry.Next()
		log.Warn("node agent connection ended; reconnecting", "socket", c.Socket, "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

func (c *Client) session(ctx context.Context, log *slog.Logger) error {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "unixpacket", c.Socket)
	if err != nil {
		return err
	}
	conn := raw.(*net.UnixConn)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := Send(conn, &zdsapi.ZdsHello{Version: zdsapi.Version_V1}, -1); err != nil {
		return err
	}
	log.Info("connected to the node agent", "socket", c.Socket)
	sent := map[string]bool{}
	snapshot := true
	for {
		var req zdsapi.WorkloadRequest
		fd, err := Recv(conn, &req)
		if err != nil {
			return err
		}
		herr := c.handle(&req, fd, sent, &snapshot)
		if fd >= 0 {
			unix.Close(fd)
		}
		ack := &zdsapi.Ack{}
		if herr != nil {
			ack.Error = herr.Error()
			log.Error("node agent request failed", "err", herr)
		}
		if err := Send(conn, &zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: ack}}, -1); err != nil {
			return err
		}
	}
}

func (c *Client) handle(req *zdsapi.WorkloadRequest, fd int, sent map[string]bool, snapshot *bool) error {
	switch p := req.Payload.(type) {
	case *zdsapi.WorkloadRequest_Add:
		if fd < 0 {
			return fmt.Errorf("add %s: no network namespace attached", p.Add.GetUid())
		}
		if *snapshot {
			sent[p.Add.GetUid()] = true
		}
		return c.Handler.Add(p.Add.GetUid(), p.Add.GetWorkloadInfo(), netns.NsHandle(fd))
	case *zdsapi.WorkloadRequest_Keep:
		if !*snapshot {
			return fmt.Errorf("keep %s after the snapshot", p.Keep.GetUid())
		}
		sent[p.Keep.GetUid()] = true
		return c.Handler.Keep(p.Keep.GetUid())
	case *zdsapi.WorkloadRequest_Del:
		return c.Handler.Del(p.Del.GetUid())
	case *zdsapi.WorkloadRequest_SnapshotSent:
		*snapshot = false
		return c.Handler.SnapshotDone(sent)
	}
	return errors.New("unknown request")
}
