package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HTTP/2 connection over TLS carrying CONNECT streams only.
// Which goroutine runs what is in the package doc (doc.go); the fields are
// grouped by who owns them, as x/net/http2's serverConn does.
type conn struct {
	// Immutable once start or serve runs: set by newConn, or by the Dialer
	// or Server between newConn and start.
	nc     net.Conn
	tls    tls.ConnectionState
	peer   identity.ID // from tls: the verified identity at the other end
	client bool
	cfg    Config
	log    *slog.Logger
	br     io.Reader      // under fr: the TLS connection itself (it buffers a record)
	hdec   *hpack.Decoder // fr's header decoder, kept across framers
	cork   *corkConn      // under the TLS conn, when there is one
	// newStream is called (server side) in a new goroutine for each
	// request, with a context cancelled once the stream is gone (reset by
	// the peer, or the connection closed) or the call has returned.
	newStream func(context.Context, *Stream)
	// limits and peerN (server side) count streams by peer across
	// connections; nil: no such bound.
	limits *streamLimits
	peerN  *peerStreams
	// onIdle (client side) is called when the connection has carried no
	// stream for cfg.IdleTimeout; onClose when it is closed for any reason.
	onIdle    func(*conn)
	onClose   func(*conn)
	done      chan struct{} // closed by closeWithError
	writeDone chan struct{} // closed once wclosed and every queued frame is out
	wkick     chan struct{} // hands a lingering writer the token
	wg        sync.WaitGroup

	// Owned by the read loop (by readPeerSettings before it starts).
	fr          *http2.Framer // replaced by newReadFramer after a large frame
	gotSettings bool          // the peer's first SETTINGS was read
	resets      resetBucket   // early resets and refusals the peer may still cause

	// Owned by the write token's holder (writing, below).
	bw      *bufio.Writer // borrowed from bwPool for the hold
	dataHdr [9]byte       // scratch for DATA frame headers
	wf      *http2.Framer // write side framer over bw

	// Atomic: lastRead is set by the read loop and read by pingFired;
	// ctrlQueued is counted up by queue (under mu), down by drain, and
	// checked by the read loop.
	lastRead   atomic.Int64 // unix nanos of the last frame read
	ctrlQueued atomic.Int32 // control frames queued, not yet written

	mu sync.Mutex // guards everything below

	// The write queue and token (write.go).
	wq       []outFrame
	wspare   []outFrame
	started  bool  // start or serve ran: writers may run
	wclosed  bool  // no more frames will be queued
	writing  bool  // the write token is taken (by writeQueued or a Stream.Write)
	writer   bool  // a writeQueued goroutine runs (writing, or lingering)
	kicked   bool  // kickLocked handed the lingering writer the token
	wdrained bool  // writeDone is closed
	werr     error // the first write error; nothing is written after it

	// HPACK: a block is encoded and queued under one hold of mu.
	henc *hpack.Encoder
	hbuf bytes.Buffer

	// Streams, the peer's settings, windows and the connection's life.
	streams     map[uint32]*Stream
	handlers    map[uint32]context.CancelFunc // server: streams whose handler runs
	orphans     int                           // server: handlers still running for streams already gone
	nextID      uint32                        // client: next stream id
	maxPeerID   uint32                        // server: highest stream id the peer opened
	reserved    int                           // client: slots promised to dials not yet opened
	peerStreams uint32                        // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	peerWindow  int32                         // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame   uint32                        // peer's SETTINGS_MAX_FRAME_SIZE
	goingAway   bool                          // GOAWAY sent or received: no new streams
	closed      bool
	flow        flow // the connection's windows
	err         error
	idleTimer   *time.Timer
	pingTimer   *time.Timer // keepalive (pingFired), both sides; stopped at close
	pings       uint64
	idleSince   time.Time
}

const clientPreface = http2.ClientPreface

// newConn sets up the connection state; start launches its goroutines once
// the preface has been exchanged.
func newConn(nc net.Conn, client bool, cfg Config, log *slog.Logger) *conn {
	c := &conn{
		nc:          nc,
		client:      client,
		cfg:         cfg,
		log:         log,
		done:        make(chan struct{}),
		writeDone:   make(chan struct{}),
		wkick:       make(chan struct{}, 1),
		streams:     map[uint32]*Stream{},
		nextID:      1,
		peerStreams: cfg.MaxStreams, // until the peer's SETTINGS say otherwise
		peerWindow:  65535,
		peerFrame:   16384,
		flow:        flow{send: 65535, recv: 65535},
	}
	if tc, ok := nc.(*tls.Conn); ok {
		c.tls = tc.ConnectionState()
		c.peer = peerID(c.tls)
		c.cork, _ = tc.NetConn().(*corkConn)
	}
	// Writes gather in a buffer borrowed only while the write token is held
	// (takeWriter), so an idle connection holds no write buffer. Reads
	// come straight from the TLS connection, which holds the decrypted
	// record anyway: a bufio.Reader over it (8 KB per connection, 0.9 MB
	// per proxy at 100 connections) was a second buffer with no effect on
	// throughput (BenchmarkThroughput, two A/B runs of 6).
	c.wf = http2.NewFramer(tokenWriter{c}, nil)
	c.br = &frameGuard{r: nc}
	c.hdec = hpack.NewDecoder(4096, nil)
	c.fr = c.newReadFramer()
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.lastRead.Store(time.Now().UnixNano())
	c.resets = newResetBucket(cfg)
	// Our SETTINGS must be the first frame we send.
	c.queue(outFrame{kind: kindSettings})
	if extra := int64(cfg.ConnWindow) - 65535; extra > 0 {
		c.queue(outFrame{kind: kindWindow, val: uint32(extra)})
		c.flow.recv += extra
	}
	return c
}

// readPeerSettings reads the peer's first frame, which must be SETTINGS,
// before the loops start. A client waits for it because in TLS 1.3 the
// server judges the client's certificate after the client's handshake has
// returned: the server's SETTINGS is the first sign it accepted us, and a
// refusal shows here as the server's TLS alert instead of a broken pipe.
func (c *conn) readPeerSettings(deadline time.Time) error {
	_ = c.nc.SetReadDeadline(deadline)
	defer c.nc.SetReadDeadline(time.Time{})
	f, err := c.fr.ReadFrame()
	if err != nil {
		return err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return fmt.Errorf("first frame is %v, want SETTINGS", f.Header().Type)
	}
	c.gotSettings = true
	return c.onSettings(sf)
}

// start runs the connection's goroutines.
func (c *conn) start() {
	c.begin()
	c.wg.Add(1)
	go func() { defer c.wg.Done(); c.readLoop() }()
}

// serve is start with the read loop on the calling goroutine, and returns
// once the connection and all its goroutines have ended. A server's
// connection goroutine would otherwise only wait, keeping the stack its
// TLS handshake grew, beside a second goroutine growing one for reading.
func (c *conn) serve() {
	c.begin()
	c.readLoop()
	c.wait()
}

// begin lets writers run, starting one for the frames queued at set-up
// (our SETTINGS first), and a client's keepalive timer.
func (c *conn) begin() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.started = true
	c.kickLocked()
	if !c.closed {
		c.pingTimer = time.AfterFunc(c.cfg.PingInterval, c.pingFired)
		c.checkIdleLocked() // a connection that never carries a stream is idle from the start
	}
}

func (c *conn) errLocked() error {
	if c.err != nil {
		return c.err
	}
	return ErrConnClosed
}

// newStreamLocked registers a stream with the windows both sides agreed on.
func (c *conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{
		c:    c,
		id:   id,
		flow: flow{send: int64(c.peerWindow), recv: int64(c.cfg.StreamWindow)},
	}
	s.cond.L = &c.mu
	c.streams[id] = s
	return s
}

// resetLocked ends a stream with RST_STREAM.
func (c *conn) resetLocked(s *Stream, code http2.ErrCode, remote bool) {
	if s.reset {
		return
	}
	s.reset = true
	if s.rerr == nil {
		s.rerr = &ResetError{Code: code, Remote: remote}
	}
	if !remote {
		c.queue(outFrame{kind: kindRST, streamID: s.id, code: code})
	}
	c.removeLocked(s)
}

// removeLocked forgets a finished stream; its buffered bytes stay readable.
func (c *conn) removeLocked(s *Stream) {
	if s.removed {
		return
	}
	s.removed = true
	delete(c.streams, s.id)
	s.wakeLocked()
	c.goneLocked(s)
	c.checkIdleLocked()
}

// tryReserve claims a stream slot for a dial (client side).
func (c *conn) tryReserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.goingAway {
		return false
	}
	limit := min(c.cfg.MaxStreams, c.peerStreams)
	if uint32(len(c.streams)+c.reserved) >= limit {
		return false
	}
	c.reserved++
	c.stopIdleLocked()
	return true
}

// openStream sends the HEADERS of a new CONNECT stream (client side), on
// the slot tryReserve claimed: the slot is given back either way.
func (c *conn) openStream(fields []hpack.HeaderField, reused bool) (*Stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reserved--
	if c.closed || c.goingAway {
		err := errGoingAway
		if c.closed {
			err = c.errLocked()
		}
		c.checkIdleLocked()
		return nil, err
	}
	id := c.nextID
	c.nextID += 2
	s := c.newStreamLocked(id)
	s.reused = reused
	c.queue(outFrame{kind: kindHeaders, streamID: id, data: c.encodeHeadersLocked(fields)})
	return s, nil
}

// load is how many streams the connection carries or has promised, and
// whether it takes new ones at all.
func (c *conn) load() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams) + c.reserved, !c.closed && !c.goingAway
}

// activeStreams counts open streams.
func (c *conn) activeStreams() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// checkIdleLocked arms the idle timer when the last stream ends: a
// client's pooled connection (IdleTimeout) and a server's connection
// (ServerIdleTimeout, from the start too: a peer may never open a stream).
func (c *conn) checkIdleLocked() {
	if c.closed || len(c.streams) > 0 || c.reserved > 0 || c.orphans > 0 || !c.started {
		return
	}
	if c.goingAway {
		if c.client {
			// Drained after GOAWAY: nothing more can happen here.
			c.wg.Add(1)
			go func() { defer c.wg.Done(); c.closeGracefully(errGoingAway) }()
		}
		return // a server's drain is Shutdown's to end
	}
	c.idleSince = time.Now()
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(c.idleTimeout(), c.idleFired)
	} else {
		c.idleTimer.Reset(c.idleTimeout())
	}
}

func (c *conn) idleTimeout() time.Duration {
	if c.client {
		return c.cfg.IdleTimeout
	}
	return c.cfg.ServerIdleTimeout
}

func (c *conn) stopIdleLocked() {
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
}

func (c *conn) idleFired() {
	c.mu.Lock()
	idle := !c.closed && !c.goingAway && len(c.streams) == 0 && c.reserved == 0 && c.orphans == 0 && time.Since(c.idleSince) >= c.idleTimeout()
	if idle {
		c.goingAway = true
		if !c.client {
			// Streams the peer opened meanwhile were refused: it may retry them.
			c.queue(outFrame{kind: kindGoAway, val: c.maxPeerID, code: http2.ErrCodeNo})
		}
	}
	c.mu.Unlock()
	if idle {
		if c.onIdle != nil {
			c.onIdle(c)
		}
		c.closeGracefully(errIdle)
	}
}

// pingFired sends a PING every interval and closes the connection when
// nothing at all was read for the timeout. A timer, not a goroutine: 100
// idle connections would keep 100 goroutines only for this.
func (c *conn) pingFired() {
	if silent := time.Since(time.Unix(0, c.lastRead.Load())); silent >= c.cfg.PingTimeout {
		c.log.Info("hbone: closing a connection whose peer did not answer keepalive PINGs", "peer", c.nc.RemoteAddr().String(), "identity", c.peer.String(), "silent", silent.Round(time.Millisecond).String())
		c.closeWithError(errKeepalive)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.pings++
	var p [8]byte
	binary.BigEndian.PutUint64(p[:], c.pings)
	c.queue(outFrame{kind: kindPing, ping: p})
	c.pingTimer.Reset(c.cfg.PingInterval)
}

// goAway tells the peer no new streams will be accepted (server drain).
func (c *conn) goAway() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.goingAway || c.closed {
		return
	}
	c.goingAway = true
	c.queue(outFrame{kind: kindGoAway, val: c.maxPeerID, code: http2.ErrCodeNo})
}

// closeGracefully lets queued frames (a GOAWAY, final END_STREAMs) reach the
// wire, waiting at most a second, then closes.
func (c *conn) closeGracefully(reason error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.wclosed = true
	c.kickLocked() // writeDone, if nothing is left to write
	c.mu.Unlock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	select {
	case <-c.writeDone:
	case <-time.After(time.Second):
	}
	c.closeWithError(reason)
}

// closeWithError ends the connection and every stream on it.
func (c *conn) closeWithError(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.err = err
	c.mu.Unlock()
	// Leave the pool before the streams learn of the end, so no caller
	// that sees a stream fail can still find the connection pooled.
	if c.onClose != nil {
		c.onClose(c)
	}
	c.mu.Lock()
	c.wclosed = true
	c.kickLocked() // fails what is queued, unless a holder is writing it
	c.stopIdleLocked()
	if c.pingTimer != nil {
		c.pingTimer.Stop()
	}
	for _, s := range c.streams {
		if s.rerr == nil {
			s.rerr = err
		}
		s.reset = true
		s.removed = true
		s.wakeLocked()
		c.goneLocked(s)
	}
	clear(c.streams)
	c.mu.Unlock()
	// A writer blocked on a full socket lets go now, so Close does not wait
	// on it (it could hold the cork's lock, which the close alert needs).
	_ = c.nc.SetWriteDeadline(time.Now())
	c.nc.Close()
	close(c.done)
}

// wait blocks until every goroutine of the connection has ended.
func (c *conn) wait() { c.wg.Wait() }
