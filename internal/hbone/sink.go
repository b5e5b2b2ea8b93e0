package hbone

import (
	"io"
	"net"
	"os"
	"syscall"

	"github.com/ambitmesh/ambit/internal/relay"
	"golang.org/x/sys/unix"
)

// WriteTo writes the tunnelled bytes to w until the peer's END_STREAM,
// handing w the received chunks themselves: no copy, and while it waits
// for data it holds no buffer (an idle tunnel costs no buffer memory). The
// peer's window is returned only as w takes the bytes, so a slow w slows
// the peer. relay uses it for the tunnel-to-socket direction.
//
// When w is a socket, the connection's reader writes arriving DATA to it
// directly while nothing is queued (a non-blocking write; what does not
// fit is queued for WriteTo): no wake-up of this goroutine and no copy per
// frame, which is most of a request's cost at a thousand requests a second.
func (s *Stream) WriteTo(w io.Writer) (int64, error) {
	c := s.c
	var total int64
	c.mu.Lock()
	defer c.mu.Unlock()
	if d := nowWriterFor(w); d != nil {
		s.direct, s.sunk = d, 0
		defer func() { s.direct = nil }() // before the unlock: defers run last first
	}
	for {
		switch ready, end, err := s.sinkStateLocked(); {
		case end:
			return total + s.sunk, err
		case ready:
			n, err := s.writeChunkLocked(w)
			total += int64(n)
			if err != nil {
				return total + s.sunk, err
			}
		default:
			s.cond.Wait()
		}
	}
}

// sinkStateLocked says what a copy of the received bytes to a socket
// (WriteTo, WriteToAsync's drain) does next: write a chunk (ready), stop
// with err (end), or neither: wait, while the reader writes to the socket
// itself or nothing has come. c.mu must be held.
func (s *Stream) sinkStateLocked() (ready, end bool, err error) {
	switch {
	case s.closed:
		return false, true, net.ErrClosed
	case s.sinkBusy:
		return false, false, nil // the reader is writing: bytes stay in order
	case s.rbuf.len() > 0:
		return true, false, nil
	case s.reof:
		return false, true, nil
	case s.rerr != nil:
		return false, true, s.rerr
	case s.dl.expired(false):
		return false, true, os.ErrDeadlineExceeded
	}
	return false, false, nil
}

// writeChunkLocked writes the first received chunk to w, with c.mu
// released meanwhile, and returns the peer's window for it. After a write
// error the reader no longer writes to the socket directly. c.mu must be
// held; it is held again on return.
func (s *Stream) writeChunkLocked(w io.Writer) (int, error) {
	c := s.c
	chunk, off := s.rbuf.take()
	s.wtBusy = true
	c.mu.Unlock()
	data := (*chunk)[off:]
	n, err := w.Write(data)
	chunkPool.Put(chunk)
	c.mu.Lock()
	s.wtBusy = false
	c.creditConnLocked(int64(len(data)))
	s.creditLocked(int64(len(data)))
	if err != nil {
		s.direct = nil
	}
	return n, err
}

// WriteToAsync is WriteTo without a goroutine while there is nothing to
// do: the connection's reader writes arriving DATA to the socket w itself
// (as for WriteTo), and a goroutine runs only while bytes wait for a full
// socket, or to finish. done gets what WriteTo would return, once, from a
// goroutine of the stream's own. It reports false, and does nothing, when
// w is not a socket. An idle tunnel then costs no goroutine on this side.
func (s *Stream) WriteToAsync(w io.Writer, done AsyncDone) bool {
	d := nowWriterFor(w)
	if d == nil {
		return false
	}
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.direct != nil || s.park.w != nil {
		return false // a WriteTo is running
	}
	s.direct, s.sunk = d, 0
	s.park = parkedSink{w: w, done: done}
	s.wakeLocked() // whatever is queued or ended already
	return true
}

// AsyncDone is told the end of a WriteToAsync: what WriteTo would have
// returned (the relay's contract, relay.AsyncDone).
type AsyncDone = relay.AsyncDone

// The contracts of the data path (internal/relay/contract.go): a drift in
// either signature breaks the build instead of the fast path.
var _ relay.AsyncSource = (*Stream)(nil)

// AsyncDoneFunc is a func as an AsyncDone.
type AsyncDoneFunc func(n int64, err error)

func (f AsyncDoneFunc) AsyncDone(n int64, err error) { f(n, err) }

// parkedSink is WriteToAsync's state, guarded by c.mu; w is nil when no
// WriteToAsync runs.
type parkedSink struct {
	w       io.Writer
	done    AsyncDone
	running bool // a drain goroutine is on it
	total   int64
}

// wakeLocked tells whoever waits for received data that something
// changed: a blocked Read or WriteTo, or, for WriteToAsync, a new drain
// goroutine. c.mu must be held.
func (s *Stream) wakeLocked() {
	s.cond.Broadcast()
	if p := &s.park; p.w != nil && !p.running {
		p.running = true
		go s.drain(p)
	}
}

// drain is WriteToAsync's goroutine: it writes what is queued, finishes
// at the end of the stream, and otherwise parks (ends) until wakeLocked.
func (s *Stream) drain(p *parkedSink) {
	c := s.c
	c.mu.Lock()
	for {
		ready, end, err := s.sinkStateLocked()
		if ready {
			var n int
			n, err = s.writeChunkLocked(p.w)
			p.total += int64(n)
			if end = err != nil; !end {
				continue
			}
		}
		if !end {
			p.running = false // nothing to do (or the reader is on it): park
			c.mu.Unlock()
			return
		}
		total, done := p.total+s.sunk, p.done
		s.park, s.direct = parkedSink{}, nil
		c.mu.Unlock()
		done.AsyncDone(total, err)
		return
	}
}

// NowWriter writes what a socket takes at once and never waits: 0 and no
// error when it is full. A stream's reader writes arriving DATA to WriteTo's
// socket with it (relay.Socket is one; any other socket is wrapped).
type NowWriter = relay.NowWriter

// nowWriterFor returns w's NowWriter: w itself, a wrapper of its
// descriptor, or nil if w is not a socket.
func nowWriterFor(w io.Writer) NowWriter {
	if d, ok := w.(NowWriter); ok {
		return d
	}
	if sc, ok := w.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			return newDirectWriter(rc)
		}
	}
	return nil
}

// directWriter is the NowWriter of a socket that has none: one
// non-blocking write attempt through its RawConn, never a wait. Its
// callback is bound once.
type directWriter struct {
	rc  syscall.RawConn
	p   []byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

func newDirectWriter(rc syscall.RawConn) *directWriter {
	d := &directWriter{rc: rc}
	d.fn = func(fd uintptr) bool {
		d.n, d.err = unix.Write(int(fd), d.p)
		return true // one attempt: a full socket is the caller's to queue for
	}
	return d
}

// WriteNow writes what the socket takes now; EAGAIN is no error (n is 0).
func (d *directWriter) WriteNow(p []byte) (int, error) {
	d.p, d.n, d.err = p, 0, nil
	if err := d.rc.Write(d.fn); err != nil {
		return 0, err
	}
	d.p = nil
	n, err := max(d.n, 0), d.err
	if err == unix.EAGAIN || err == unix.EINTR {
		err = nil
	}
	return n, err
}
