// Package relay copies bytes both ways between two connections, passing
// each half-close on: when one side stops sending, the other side's write
// half is closed and the opposite direction goes on. It is what a proxy
// does between an application socket and a tunnel.
//
// It is careful with memory, since a node proxy holds thousands of mostly
// idle connections: a direction waiting for data holds no buffer. From a
// socket it waits for readability first and only then takes a pooled
// buffer, and with a Poller it waits with no goroutine either; from a
// source that hands out its own buffers (an HBONE stream's WriteToAsync)
// it copies nothing and holds no goroutine while idle.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Conn is a connection whose write half can be closed on its own:
// *net.TCPConn, *tls.Conn and *hbone.Stream are.
type Conn interface {
	io.ReadWriter
	CloseWrite() error
}

// Result counts the bytes moved each way and keeps the first error of each
// direction (io.EOF is the normal end, not an error).
type Result struct {
	AToB, BToA int64
	ErrAToB    error
	ErrBToA    error
}

// Err returns the first error of either direction, or nil.
func (r Result) Err() error { return errors.Join(r.ErrAToB, r.ErrBToA) }

// Bidirectional copies a→b and b→a until both directions have ended. It
// does not close a or b; the caller does, after it returns.
func Bidirectional(a, b Conn) Result {
	done := make(chan Result, 1)
	Go(a, b, func(r Result) { done <- r })
	return <-done
}

// Go runs Bidirectional in new goroutines and returns at once; done gets
// the result, called from the goroutine that finishes last. A direction
// from a Socket (Poller.Adopt) or an HBONE stream holds no goroutine while
// idle. The copy runs on fresh small stacks: a caller that did deep work
// first (a policy check, a dial, a TLS handshake) does not keep its grown
// stack for the connection's life, which for thousands of idle
// connections is most of a proxy's memory. To end a relay early, close a
// and b: a Socket's Close ends a direction parked on it too.
func Go(a, b Conn, done func(Result)) { GoFinisher(a, b, finishFunc(done)) }

type finishFunc func(Result)

func (f finishFunc) Finish(r Result) { f(r) }

// GoFinisher is Go reporting to f.
func GoFinisher(a, b Conn, f Finisher) {
	rl := &state{done: f}
	rl.left.Store(2)
	for dir, d := range [2]struct{ dst, src Conn }{{b, a}, {a, b}} {
		if s, ok := d.src.(*Socket); ok {
			ir := &rl.read
			if ir.rl != nil { // taken by the first direction
				ir = new(idleRead)
			}
			*ir = idleRead{rl: rl, dst: d.dst, src: s, dir: dir}
			ir.start() // no goroutine until there is data (now, or later)
			continue
		}
		oneWayGo(rl, d.dst, d.src, dir)
	}
}

// state is one relay's state, in one allocation (a node proxy holds
// thousands): the result, how many directions still run, the state of a
// direction from a Socket, and the end of a direction from an AsyncSource
// (a proxy's relay has one of each; a second of a kind is allocated apart).
type state struct {
	r     Result
	left  atomic.Int32
	done  Finisher
	read  idleRead
	async asyncEnd
}

// of returns where a direction's count and error go: 0 is a → b.
func (r *Result) of(dir int) (*int64, *error) {
	if dir == 0 {
		return &r.AToB, &r.ErrAToB
	}
	return &r.BToA, &r.ErrBToA
}

// finish ends one direction; the last one reports.
func (rl *state) finish() {
	if rl.left.Add(-1) == 0 {
		rl.done.Finish(rl.r)
	}
}

// asyncEnd finishes a direction from an AsyncSource (its AsyncDone).
type asyncEnd struct {
	rl  *state
	dst Conn
	dir int
}

func (a *asyncEnd) AsyncDone(m int64, e error) {
	n, err := a.rl.r.of(a.dir)
	*n, *err = m, closeWrite(a.dst, e)
	a.rl.finish()
}

// oneWayGo copies src to dst and half-closes dst, then stores the count
// and error and finishes the direction: from a goroutine of its own, or,
// for an AsyncSource, from the source's goroutine that runs only when
// there is something to write.
func oneWayGo(rl *state, dst, src Conn, dir int) {
	if as, ok := src.(AsyncSource); ok {
		end := &rl.async
		if end.rl != nil { // taken by the first direction
			end = new(asyncEnd)
		}
		*end = asyncEnd{rl: rl, dst: dst, dir: dir}
		if as.WriteToAsync(dst, end) {
			return
		}
		*end = asyncEnd{}
	}
	n, err := rl.r.of(dir)
	go func() {
		*n, *err = oneWay(dst, src)
		rl.finish()
	}()
}

func oneWay(dst, src Conn) (int64, error) {
	n, err := copyConn(dst, src)
	return n, closeWrite(dst, err)
}

// closeWrite passes the end on to dst and returns the copy's error, or
// the half-close's if the copy had none.
func closeWrite(dst Conn, err error) error {
	if cerr := dst.CloseWrite(); err == nil && cerr != nil && !errors.Is(cerr, io.ErrClosedPipe) {
		err = cerr
	}
	return err
}

// bufSize is the copy buffer: what io.Copy uses, and two full TLS records.
const bufSize = 32 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

func copyConn(dst io.Writer, src io.Reader) (int64, error) {
	if sc, ok := src.(*net.TCPConn); ok {
		// Not splice(2) between two sockets: a blocked splice holds a pipe,
		// two descriptors, per idle direction.
		if rc, err := sc.SyscallConn(); err == nil {
			return copyWhenReadable(dst, src, rc)
		}
	}
	if wt, ok := src.(io.WriterTo); ok {
		return wt.WriteTo(dst)
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	// Hide dst's ReadFrom, which would allocate a buffer of its own.
	return io.CopyBuffer(struct{ io.Writer }{dst}, src, *bp)
}

// copyWhenReadable copies from a socket without holding a buffer while it
// waits: the read happens in the poller's callback, which takes a pooled
// buffer only when it runs and gives it back if the socket had nothing
// (EAGAIN, then the goroutine parks bufferless). The syscalls are those of
// a plain read loop: one read per chunk, one EAGAIN before each wait.
func copyWhenReadable(dst io.Writer, src io.Reader, rc syscall.RawConn) (int64, error) {
	var total int64
	sr := newSocketReader(rc)
	for {
		bp, n, err := sr.read()
		if err != nil {
			return total, err // closed, a deadline, or the read's error
		}
		if n == 0 {
			return total, nil // EOF
		}
		w, err := writePooled(dst, bp, n)
		total += int64(w)
		if err != nil {
			return total, err
		}
	}
}

// socketReader makes one read at a time from a socket into a pooled
// buffer, taken only once the read has something. Its callback for
// RawConn.Read is made once: a closure made per read (capturing its
// results) cost four allocations per read, ~130 per MiB relayed. A
// direction makes one per spell of activity, so an idle one holds none.
type socketReader struct {
	rc  syscall.RawConn
	bp  *[]byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

func newSocketReader(rc syscall.RawConn) *socketReader {
	r := &socketReader{rc: rc}
	r.fn = func(fd uintptr) bool {
		r.bp, r.n, r.err = readPooled(fd)
		if r.err == unix.EAGAIN {
			bufPool.Put(r.bp)
			r.bp = nil
			return false // wait in the poller, holding nothing
		}
		return true
	}
	return r
}

// read makes one read; an empty socket is waited on in the runtime's
// poller (until any read deadline). EOF is (nil, 0, nil).
func (r *socketReader) read() (*[]byte, int, error) {
	r.bp, r.n, r.err = nil, 0, nil
	err := r.rc.Read(r.fn)
	bp, n := r.bp, r.n
	r.bp = nil
	if err == nil && r.err != nil {
		err = opError("read", r.err)
	}
	if err != nil || n <= 0 {
		if bp != nil {
			bufPool.Put(bp)
		}
		return nil, 0, err
	}
	return bp, n, nil
}

// writePooled writes the n bytes read into bp to dst and gives bp back.
func writePooled(dst io.Writer, bp *[]byte, n int) (int, error) {
	w, err := dst.Write((*bp)[:n])
	bufPool.Put(bp)
	if err == nil && w < n {
		err = io.ErrShortWrite
	}
	return w, err
}

// readPooled makes one read(2) into a buffer from the pool (EINTR is
// retried); the caller puts the buffer back.
func readPooled(fd uintptr) (*[]byte, int, error) {
	bp := bufPool.Get().(*[]byte)
	n, err := ignoringEINTR(func() (int, error) { return unix.Read(int(fd), *bp) })
	return bp, n, err
}
