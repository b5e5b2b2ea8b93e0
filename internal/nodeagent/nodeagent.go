// Package nodeagent is the node's enrollment agent (istio-cni's role): it
// puts a pod in the mesh by programming capture in the pod's network
// namespace and handing that namespace to the node proxy over ZDS, and takes
// it out again. It serves the ZDS socket the proxy connects to.
package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
	"github.com/ambitmesh/ambit/internal/listener"
	"github.com/ambitmesh/ambit/internal/zds"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"
)

// Pod is one enrolled pod.
type Pod struct {
	UID    string
	Info   *zdsapi.WorkloadInfo
	NSPath string // e.g. /run/netns/<name> or /proc/<pid>/ns/net
}

// Agent enrolls pods and serves the proxy.
type Agent struct {
	Socket  string
	Capture capture.Config
	Log     *slog.Logger // nil: discard
	// AckTimeout bounds the wait for the proxy's ack; default 10 s.
	AckTimeout time.Duration

	mu    sync.Mutex
	pods  map[string]*Pod
	proxy *proxyConn // the connected proxy, if any
}

type proxyConn struct {
	mu   sync.Mutex // one request at a time
	conn *net.UnixConn
}

func (a *Agent) log() *slog.Logger {
	if a.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return a.Log
}

// Enroll captures the pod's traffic and hands it to the proxy (now, or
// when the proxy connects). If the proxy refuses it, capture is removed
// again so the pod is not left cut off.
func (a *Agent) Enroll(p Pod) error {
	ns, err := netns.GetFromPath(p.NSPath)
	if err != nil {
		return fmt.Errorf("enroll %s: %w", p.UID, err)
	}
	defer ns.Close()
	if err := capture.Install(ns, a.Capture); err != nil {
		return fmt.Errorf("enroll %s: %w", p.UID, err)
	}
	a.mu.Lock()
	if a.pods == nil {
		a.pods = map[string]*Pod{}
	}
	a.pods[p.UID] = &p
	pc := a.proxy
	a.mu.Unlock()
	if pc != nil {
		err := pc.request(a, add(&p), int(ns))
		var refused *refusal
		switch {
		case errors.As(err, &refused):
			// The proxy will not serve it: undo capture, or the pod's
			// traffic would be redirected to nothing.
			a.mu.Lock()
			delete(a.pods, p.UID)
			a.mu.Unlock()
			_ = capture.Remove(ns, a.Capture)
			return fmt.Errorf("enroll %s: the proxy refused: %w", p.UID, err)
		case err != nil:
			// The connection failed, not the proxy's judgement: the pod stays
			// enrolled and goes in the snapshot when the proxy reconnects.
			a.log().Warn("proxy unreachable during enrollment; it will get the pod on reconnect", "uid", p.UID, "err", err)
		}
	}
	a.log().Info("pod enrolled", "uid", p.UID, "netns", p.NSPath, "proxy_connected", pc != nil)
	return nil
}

// Unenroll removes the pod's capture and tells the proxy to let go of it:
// its next connections go direct.
func (a *Agent) Unenroll(uid string) error {
	a.mu.Lock()
	p := a.pods[uid]
	delete(a.pods, uid)
	pc := a.proxy
	a.mu.Unlock()
	if p == nil {
		return fmt.Errorf("unenroll %s: not enrolled", uid)
	}
	// Capture first: the pod's next connections go direct at once, even
	// if the proxy is slow to answer (or stopping).
	var errs []error
	if ns, err := netns.GetFromPath(p.NSPath); err == nil {
		errs = append(errs, capture.Remove(ns, a.Capture))
		ns.Close()
	}
	if pc != nil {
		if err := pc.request(a, &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}, -1); err != nil {
			errs = append(errs, fmt.Errorf("proxy: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("unenroll %s: %w", uid, err)
	}
	a.log().Info("pod unenrolled", "uid", uid)
	return nil
}

// Pods lists the enrolled pods' UIDs.
func (a *Agent) Pods() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for uid := range a.pods {
		out = append(out, uid)
	}
	sort.Strings(out)
	return out
}

// ProxyConnected reports whether a proxy is connected and has had its
// snapshot (new enrollments go to it at once).
func (a *Agent) ProxyConnected() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proxy != nil
}

func add(p *Pod) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: p.UID, WorkloadInfo: p.Info}}}
}

// request sends one message and waits for its ack.
func (pc *proxyConn) request(a *Agent, req *zdsapi.WorkloadRequest, fd int) error {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	timeout := a.AckTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	_ = pc.conn.SetDeadline(time.Now().Add(timeout))
	defer pc.conn.SetDeadline(time.Time{})
	if err := zds.Send(pc.conn, req, fd); err != nil {
		return err
	}
	var resp zdsapi.WorkloadResponse
	rfd, err := zds.Recv(pc.conn, &resp)
	if rfd >= 0 {
		closeFD(rfd)
	}
	if err != nil {
		return err
	}
	if msg := resp.GetAck().GetError(); msg != "" {
		return &refusal{msg}
	}
	return nil
}

// refusal is the proxy's error in an ack: it received the request and
// said no.
type refusal struct{ msg string }

func (r *refusal) Error() string { return r.msg }

// Serve listens on the socket and serves one proxy at a time until ctx
// ends: each connection gets the snapshot, then the changes.
func (a *Agent) Serve(ctx context.Context) error {
	l, cleanup, err := ListenSocket("unixpacket", a.Socket)
	if err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	defer cleanup()
	// Guarded: out of descriptors, the loop backs off instead of ending.
	g := listener.Guard(l, listener.Options{Name: "zds", Log: a.log()})
	stop := context.AfterFunc(ctx, func() { g.Close() })
	defer stop()
	for {
		c, err := g.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("node agent: accept: %w", err)
		}
		a.serveProxy(ctx, c.(*net.UnixConn))
	}
}

func (a *Agent) serveProxy(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	log := a.log()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var hello zdsapi.ZdsHello
	fd, err := zds.Recv(c, &hello)
	if fd >= 0 {
		closeFD(fd)
	}
	if err != nil || hello.GetVersion() != zdsapi.Version_V1 {
		log.Warn("proxy hello refused", "err", err, "version", hello.GetVersion().String())
		return
	}
	_ = c.SetDeadline(time.Time{})
	pc := &proxyConn{conn: c}
	// The snapshot, under the lock so no enrollment slips between it and
	// the proxy becoming the one that gets changes.
	a.mu.Lock()
	var failed error
	for _, p := range a.pods {
		ns, err := netns.GetFromPath(p.NSPath)
		if err != nil {
			keep := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: p.UID}}}
			failed = pc.request(a, keep, -1)
		} else {
			failed = pc.request(a, add(p), int(ns))
			ns.Close()
		}
		if failed != nil {
			break
		}
	}
	if failed == nil {
		failed = pc.request(a, &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}, -1)
	}
	if failed == nil {
		a.proxy = pc
	}
	n := len(a.pods)
	a.mu.Unlock()
	if failed != nil {
		log.Warn("snapshot to the proxy failed", "err", failed)
		return
	}
	log.Info("proxy connected; snapshot sent", "pods", n)
	// Wait for the connection to end: a read that returns only on close.
	// Requests from Enroll/Unenroll hold pc.mu while they read their acks.
	for ctx.Err() == nil {
		pc.mu.Lock()
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		var stray zdsapi.WorkloadResponse
		_, err := zds.Recv(c, &stray)
		_ = c.SetReadDeadline(time.Time{})
		pc.mu.Unlock()
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.mu.Lock()
	if a.proxy == pc {
		a.proxy = nil
	}
	a.mu.Unlock()
	log.Info("proxy disconnected")
}

func closeFD(fd int) { _ = unix.Close(fd) }
