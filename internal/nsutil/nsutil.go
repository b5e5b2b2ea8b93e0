// Package nsutil runs code inside Linux network namespaces. A namespace is
// a property of an OS thread, not of a goroutine: code that must run in one
// locks its thread, enters, and comes back. Sockets opened inside stay in
// that namespace for good and may then be used from any goroutine.
package nsutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"github.com/ambitmesh/ambit/internal/sockopt"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Do runs f with the calling goroutine's thread inside ns. Sockets f
// creates belong to ns for good, and may be used from any goroutine after.
// Do not start goroutines in f expecting them to be in ns: they are not.
func Do(ns netns.NsHandle, f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("nsutil: current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		return fmt.Errorf("nsutil: enter netns: %w", err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in ns; it must not serve other goroutines.
		// Leaving it locked makes the runtime end it with this goroutine.
		runtime.LockOSThread()
		return errors.Join(ferr, fmt.Errorf("nsutil: leave netns: %w", err))
	}
	return ferr
}

// NewNamed creates a named network namespace (as `ip netns add` does)
// without leaving the calling thread inside it.
func NewNamed(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return netns.None(), fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	h, err := netns.NewNamed(name) // moves this thread into the new namespace
	if serr := netns.Set(orig); serr != nil {
		runtime.LockOSThread() // a thread stuck in the new namespace must end with this goroutine
		return netns.None(), errors.Join(err, serr)
	}
	if err != nil {
		return netns.None(), fmt.Errorf("create netns %s: %w", name, err)
	}
	return h, nil
}

// DialTCP connects to raddr from a socket that lives in ns, bound to laddr
// if it is valid, with setup applied to the socket before the bind (socket
// options such as SO_MARK or IP_TRANSPARENT).
//
// Only the socket is made inside ns: a thread locked into a namespace
// cannot run other goroutines, so dialling there (as Do would) holds an OS
// thread per connect in flight: 10,000 connections opened in a burst left
// a node proxy with 38 threads and a handoff between threads on every
// connect. Here the bind and connect run on any thread, since a socket
// keeps its namespace, and the wait for the connect is the runtime
// poller's. ctx bounds the connect.
func DialTCP(ctx context.Context, ns netns.NsHandle, laddr, raddr netip.AddrPort, setup func(fd int) error) (*net.TCPConn, error) {
	fd, sa, err := BoundTCP(ns, laddr, raddr, setup)
	if err != nil {
		return nil, err
	}
	// The file owns fd from here: closing it closes the socket.
	f := os.NewFile(uintptr(fd), "tcp "+raddr.String())
	defer f.Close() // net.FileConn below made its own copy
	switch err := unix.Connect(fd, sa); err {
	case nil:
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		if err := waitConnected(ctx, f); err != nil {
			return nil, dialError(laddr, raddr, "", err)
		}
	default:
		return nil, dialError(laddr, raddr, "connect", err)
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, dialError(laddr, raddr, "", err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, dialError(laddr, raddr, "", fmt.Errorf("not a TCP connection: %T", c))
	}
	return tc, nil
}

// BoundTCP is DialTCP up to the connect: a non-blocking TCP socket made
// in ns, with setup applied and bound to laddr if it is valid, and the
// address to connect it to. The caller owns fd (a relay.Poller connects
// it and waits in its own set, with none of the runtime's state for it).
func BoundTCP(ns netns.NsHandle, laddr, raddr netip.AddrPort, setup func(fd int) error) (int, unix.Sockaddr, error) {
	family := unix.AF_INET
	if !raddr.Addr().Unmap().Is4() {
		family = unix.AF_INET6
	}
	if laddr.IsValid() && laddr.Addr().Unmap().Is4() != (family == unix.AF_INET) {
		return -1, nil, dialError(laddr, raddr, "", fmt.Errorf("source %s and destination are not of one address family", laddr.Addr()))
	}
	fd := -1
	if err := Do(ns, func() (err error) {
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		return -1, nil, dialError(laddr, raddr, "socket", err)
	}
	if setup != nil {
		if err := setup(fd); err != nil {
			unix.Close(fd)
			return -1, nil, dialError(laddr, raddr, "", err)
		}
	}
	if laddr.IsValid() {
		if laddr.Port() == 0 {
			_ = sockopt.NoPortAtBind(fd) // best effort (see there)
		}
		if err := unix.Bind(fd, sockaddr(family, laddr)); err != nil {
			unix.Close(fd)
			return -1, nil, dialError(laddr, raddr, "bind", err)
		}
	}
	return fd, sockaddr(family, raddr), nil
}

// dialError is a dial's error as the net package words it.
func dialError(laddr, raddr netip.AddrPort, op string, err error) error {
	var src net.Addr
	if laddr.IsValid() {
		src = net.TCPAddrFromAddrPort(laddr)
	}
	if op != "" {
		err = os.NewSyscallError(op, err)
	}
	return &net.OpError{Op: "dial", Net: "tcp", Source: src, Addr: net.TCPAddrFromAddrPort(raddr), Err: err}
}

// waitConnected waits, in the runtime's poller, for a non-blocking connect
// on f to finish, or for ctx to end.
func waitConnected(ctx context.Context, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var cerr error
	err = rc.Write(func(fd uintptr) bool {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			cerr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch e := unix.Errno(v); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0:
			// Writable with no error: connected, unless the wake-up was
			// spurious, which getpeername tells.
			if _, err := unix.Getpeername(int(fd)); err == unix.ENOTCONN {
				return false
			}
			return true
		default:
			cerr = os.NewSyscallError("connect", e)
			return true
		}
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// Only ctx sets deadlines here; its own timer may lag the poller's.
		<-ctx.Done()
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	return cerr
}

func sockaddr(family int, ap netip.AddrPort) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// GrowFDTable grows the process's descriptor table to hold n descriptors
// (at most the RLIMIT_NOFILE soft limit) and returns the size asked for.
// Linux doubles the table as descriptors are opened, and in a threaded
// process each doubling waits for an RCU grace period (~10 ms) while every
// other thread that opens a descriptor (accept, socket, dup) waits on the
// resize: a node proxy taking a burst of connections had threads parked
// in the kernel long enough for the runtime to start more, and each thread
// it starts is kept for good (48 KB of runtime stacks). Grown once at
// start, the table costs the kernel 8 bytes per slot; it never shrinks.
func GrowFDTable(n int) (int, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	if uint64(n) > lim.Cur {
		n = int(lim.Cur)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("eventfd: %w", err)
	}
	defer unix.Close(fd)
	// F_DUPFD takes the lowest free slot at or above n-1: it never replaces
	// a descriptor in use, as dup2 would.
	hi, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, n-1)
	if err != nil {
		return 0, fmt.Errorf("grow the descriptor table to %d: %w", n, err)
	}
	unix.Close(hi)
	return n, nil
}
