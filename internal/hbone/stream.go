package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
)

// Stream is one HBONE tunnel: an HTTP/2 CONNECT stream used as a byte pipe.
// It is a net.Conn with CloseWrite for half-close: CloseWrite sends
// END_STREAM and the peer reads io.EOF while the other direction goes on.
// Close ends both directions; if the peer was still sending, it resets the
// stream (like a TCP close with unread data).
type Stream struct {
	// Immutable after newStreamLocked.
	c  *conn
	id uint32

	wmu sync.Mutex // serializes Write and CloseWrite

	// Guarded by c.mu (cond's L is &c.mu).
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

	// Request (server side) or response (client side), set once under
	// c.mu: the read loop sets the request before the handler's goroutine
	// starts, which reads it without the lock (and drops header after).
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

// donePool holds completion channels for queued DATA frames.
var donePool = sync.Pool{New: func() any { return make(chan error, 1) }}

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
