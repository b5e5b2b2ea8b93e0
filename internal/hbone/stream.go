package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"
)

// Stream is one HBONE tunnel: an HTTP/2 CONNECT stream used as a byte pipe.
// It is a net.Conn with CloseWrite for half-close: CloseWrite sends
// END_STREAM and the peer reads io.EOF while the other direction goes on.
// Close ends both directions; if the peer was still sending, it resets the
// stream (like a TCP close with unread data).
type Stream struct {
	c  *conn
	id uint32

	wmu sync.Mutex // serializes Write and CloseWrite

	// Guarded by c.mu.
	cond     sync.Cond
	rbuf     recvBuf
	rerr     error // reset or connection error
	flow     flow  // the stream's windows
	reof     bool  // END_STREAM received
	wEOF     bool  // END_STREAM queued
	reset    bool
	removed  bool
	closed   bool       // Close called
	dl       *deadlines // nil until a deadline is set: most streams never have one
	direct   NowWriter  // WriteTo's socket, for the reader's direct writes
	sinkBusy bool       // the reader is writing to direct
	wtBusy   bool       // WriteTo is writing a chunk
	sunk     int64      // bytes the reader wrote to direct
	park     parkedSink // WriteToAsync's state (in the stream: one allocation less per tunnel)

	// Request (server side) or response (client side), fixed once set.
	// (The bools sit together here and above: each alone took a word.)
	method    string
	authority string
	header    http.Header
	status    int // the CONNECT answer: received (client), given (server)
	extended  bool
	gotResp   bool
	responded bool
	reused    bool // client: the stream rode a pooled connection
}

// Info describes the tunnel a stream runs in, for logs and the demo.
type Info struct {
	StreamID    uint32
	Reused      bool // client: the stream rode an existing pooled connection
	LocalAddr   net.Addr
	RemoteAddr  net.Addr
	TLSVersion  uint16
	CipherSuite uint16
	ALPN        string
	Peer        identity.ID // the verified SPIFFE identity at the other end
	Status      int         // the CONNECT answer
}

// TLSVersionName and CipherSuiteName render the numbers for people.
func (i Info) TLSVersionName() string  { return tls.VersionName(i.TLSVersion) }
func (i Info) CipherSuiteName() string { return tls.CipherSuiteName(i.CipherSuite) }

// Info returns what is known about the stream's tunnel. It is built on
// demand from the connection's facts, not kept in every stream: a node
// proxy holds thousands of streams over a few connections.
func (s *Stream) Info() Info {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	return Info{
		StreamID: s.id, Reused: s.reused, Status: s.status,
		LocalAddr: c.nc.LocalAddr(), RemoteAddr: c.nc.RemoteAddr(),
		TLSVersion: c.tls.Version, CipherSuite: c.tls.CipherSuite, ALPN: c.tls.NegotiatedProtocol,
		Peer: c.peer,
	}
}

// ID is the HTTP/2 stream id.
func (s *Stream) ID() uint32 { return s.id }

// Read reads tunnelled bytes. It returns io.EOF after the peer's
// END_STREAM, and the reset or connection error otherwise.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if s.closed {
			return 0, net.ErrClosed
		}
		if s.rbuf.len() > 0 {
			if len(p) == 0 {
				return 0, nil
			}
			n := s.rbuf.read(p)
			c.creditConnLocked(int64(n))
			s.creditLocked(int64(n))
			return n, nil
		}
		if s.reof {
			// Everything the peer sent has arrived; a reset after its
			// END_STREAM only says it wants no more from us.
			return 0, io.EOF
		}
		if s.rerr != nil {
			return 0, s.rerr
		}
		if s.dl.expired(false) {
			return 0, os.ErrDeadlineExceeded
		}
		s.cond.Wait()
	}
}

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
// returned. An interface, so a relay's state can take it with no closure
// allocated (and kept) per connection; an alias of the literal type, so
// the relay can name it without importing this package.
type AsyncDone = interface {
	AsyncDone(n int64, err error)
}

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
type NowWriter interface {
	WriteNow(p []byte) (int, error)
}

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

// creditLocked returns consumed bytes to the stream's window.
func (s *Stream) creditLocked(n int64) {
	if s.reof || s.reset {
		return // the peer will send nothing more
	}
	if inc := s.flow.credit(n, s.c.cfg.StreamWindow); inc > 0 {
		s.c.queue(outFrame{kind: kindWindow, streamID: s.id, val: inc})
	}
}

// Write sends p as DATA frames within the flow-control windows. It returns
// once the bytes are handed to the TLS connection, so p may be reused.
func (s *Stream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	c := s.c
	total := 0
	for len(p) > 0 {
		c.mu.Lock()
		for {
			if err := s.writeErrLocked(); err != nil {
				c.mu.Unlock()
				return total, err
			}
			if s.flow.avail() > 0 && c.flow.avail() > 0 {
				break
			}
			s.cond.Wait()
		}
		n := min(int64(len(p)), s.flow.avail(), c.flow.avail(), int64(c.peerFrame))
		s.flow.take(n)
		c.flow.take(n)
		if c.tryTakeWriter() {
			// The connection is idle: write it here, with no hand-off.
			c.mu.Unlock()
			err := c.writeData(s.id, p[:n])
			c.release(err)
			if err != nil {
				return total, err
			}
		} else {
			// Most writes find the connection idle and never queue; a
			// queued one borrows a completion channel, so an idle stream
			// holds none (10,000 idle streams kept 0.7 MB of them).
			done := donePool.Get().(chan error)
			c.queue(outFrame{kind: kindData, streamID: s.id, data: p[:n], done: done})
			c.mu.Unlock()
			err := <-done
			donePool.Put(done) // drained: the writer sends exactly once
			if err != nil {
				return total, err
			}
		}
		total += int(n)
		p = p[n:]
	}
	return total, nil
}

func (s *Stream) writeErrLocked() error {
	switch {
	case s.closed:
		return net.ErrClosed
	case s.wEOF:
		return errWriteAfterClose
	case s.reset:
		if s.rerr != nil {
			return s.rerr
		}
		return &ResetError{Code: http2.ErrCodeCancel}
	case s.dl.expired(true):
		return os.ErrDeadlineExceeded
	}
	return nil
}

var errWriteAfterClose = &net.OpError{Op: "write", Net: "hbone", Err: io.ErrClosedPipe}

// CloseWrite half-closes the stream: END_STREAM goes to the peer, which
// reads io.EOF, while this side can still read.
func (s *Stream) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.closed {
		return net.ErrClosed
	}
	return s.endLocked()
}

func (s *Stream) endLocked() error {
	if s.wEOF {
		return nil
	}
	if s.reset {
		return s.writeErrLocked()
	}
	s.wEOF = true
	s.c.queue(outFrame{kind: kindData, streamID: s.id, end: true})
	if s.reof {
		s.c.removeLocked(s)
	}
	return nil
}

// Close ends both directions. Unread bytes are dropped and returned to the
// connection's window so other streams are not starved.
func (s *Stream) Close() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.closed {
		return nil
	}
	switch {
	case s.reset:
	case !s.reof:
		c.resetLocked(s, http2.ErrCodeCancel, false)
	case !s.wEOF:
		s.wEOF = true
		c.queue(outFrame{kind: kindData, streamID: s.id, end: true})
		c.removeLocked(s)
	}
	s.closed = true
	if n := s.rbuf.len(); n > 0 {
		s.rbuf.reset()
		c.creditConnLocked(int64(n))
	}
	if s.dl != nil {
		for _, t := range []*time.Timer{s.dl.rt, s.dl.wt} {
			if t != nil {
				t.Stop()
			}
		}
	}
	s.wakeLocked()
	return nil
}

// LocalAddr and RemoteAddr are those of the TLS connection carrying the stream.
func (s *Stream) LocalAddr() net.Addr  { return s.c.nc.LocalAddr() }
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

// SetDeadline sets both deadlines.
func (s *Stream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

// SetReadDeadline makes a blocked or future Read fail at t.
func (s *Stream) SetReadDeadline(t time.Time) error {
	s.setDeadline(false, t)
	return nil
}

// SetWriteDeadline makes a Write waiting for window fail at t. A frame
// already handed to the connection is written regardless.
func (s *Stream) SetWriteDeadline(t time.Time) error {
	s.setDeadline(true, t)
	return nil
}

// deadlines are a stream's, kept apart: 64 bytes that 10,000 idle streams
// would hold for nothing (and that took the stream a size class up).
type deadlines struct {
	r, w   time.Time
	rt, wt *time.Timer
}

// expired reports whether the write (or read) deadline has passed; a nil
// d has none.
func (d *deadlines) expired(write bool) bool {
	if d == nil {
		return false
	}
	if write {
		return expired(d.w)
	}
	return expired(d.r)
}

func (s *Stream) setDeadline(write bool, t time.Time) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.dl == nil {
		if t.IsZero() {
			return // none set, none to clear
		}
		s.dl = &deadlines{}
	}
	d, timer := &s.dl.r, &s.dl.rt
	if write {
		d, timer = &s.dl.w, &s.dl.wt
	}
	*d = t
	if *timer != nil {
		(*timer).Stop()
	}
	if !t.IsZero() {
		*timer = time.AfterFunc(time.Until(t), func() {
			c.mu.Lock()
			s.wakeLocked()
			c.mu.Unlock()
		})
	}
	s.wakeLocked()
}

func expired(d time.Time) bool { return !d.IsZero() && !time.Now().Before(d) }

// waitResponse blocks until the server answers the CONNECT (client side).
func (s *Stream) waitResponse(ctx context.Context) (int, http.Header, error) {
	c := s.c
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		s.cond.Broadcast()
		c.mu.Unlock()
	})
	defer stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for !s.gotResp && s.rerr == nil && ctx.Err() == nil {
		s.cond.Wait()
	}
	if s.gotResp {
		return s.status, s.header, nil
	}
	if s.rerr != nil {
		return 0, nil, s.rerr
	}
	return 0, nil, ctx.Err()
}

// recvBuf holds received bytes in pooled chunks, so an idle stream holds no
// buffer and a busy one holds only what the peer sent ahead of the reader.
type recvBuf struct {
	chunks []*[]byte // pooled chunks; (*chunks[0])[off:] is unread
	off    int
	n      int
}

const chunkSize = 32 << 10

// donePool holds completion channels for queued DATA frames.
var donePool = sync.Pool{New: func() any { return make(chan error, 1) }}

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 0, chunkSize); return &b }}

func (b *recvBuf) len() int { return b.n }

func (b *recvBuf) write(p []byte) {
	b.n += len(p)
	for len(p) > 0 {
		if k := len(b.chunks); k > 0 {
			last := b.chunks[k-1]
			if free := cap(*last) - len(*last); free > 0 {
				m := min(free, len(p))
				*last = append(*last, p[:m]...)
				p = p[m:]
				continue
			}
		}
		c := chunkPool.Get().(*[]byte)
		*c = (*c)[:0]
		b.chunks = append(b.chunks, c)
	}
}

func (b *recvBuf) read(p []byte) int {
	total := 0
	for len(p) > 0 && len(b.chunks) > 0 {
		first := b.chunks[0]
		m := copy(p, (*first)[b.off:])
		p = p[m:]
		b.off += m
		total += m
		if b.off == len(*first) {
			chunkPool.Put(first)
			// Shift rather than reslice, so the slice's array is reused
			// instead of creeping forward and reallocating.
			k := copy(b.chunks, b.chunks[1:])
			b.chunks[k] = nil
			b.chunks = b.chunks[:k]
			b.off = 0
		}
	}
	b.n -= total
	return total
}

// take removes the first chunk and returns it with the offset of its
// unread bytes; the caller owns it (and puts it back in chunkPool).
func (b *recvBuf) take() (*[]byte, int) {
	c, off := b.chunks[0], b.off
	k := copy(b.chunks, b.chunks[1:])
	b.chunks[k] = nil
	b.chunks = b.chunks[:k]
	b.off = 0
	b.n -= len(*c) - off
	return c, off
}

func (b *recvBuf) reset() {
	for _, c := range b.chunks {
		chunkPool.Put(c)
	}
	*b = recvBuf{}
}
