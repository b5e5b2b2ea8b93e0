package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HTTP/2 connection over TLS carrying CONNECT streams only. It
// is deliberately small: HBONE needs HEADERS, DATA, flow control, RST_STREAM,
// PING and GOAWAY, and the stream is a byte pipe with half-close in both
// directions, which a generic HTTP/2 server cannot give a handler.
//
// One goroutine owns it while it lives: readLoop (frames in; on a server,
// the goroutine that accepted the connection). Frames out are written by
// whoever holds the write token (conn.writing), the only writer of the
// socket: a Stream.Write that finds the connection idle takes it and
// writes its DATA itself, sparing two goroutine hand-offs per chunk (see
// docs/benchmarks.md); frames queued while nobody holds it start a writer
// goroutine (writeQueued) that drains the queue and ends, so an idle
// connection holds no writer and its stack. readLoop never takes the
// token: it only queues, so a reader never waits on a writer. A client's
// keepalive is a timer (pingFired). All end when the connection closes.
type conn struct {
	nc     net.Conn
	tls    tls.ConnectionState
	peer   identity.ID // from tls: the verified identity at the other end
	client bool
	cfg    Config
	log    *slog.Logger

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
	onIdle  func(*conn)
	onClose func(*conn)

	fr      *http2.Framer  // read side; only readLoop uses it (and replaces it: newReadFramer)
	br      io.Reader      // under fr: the TLS connection itself (it buffers a record)
	hdec    *hpack.Decoder // fr's header decoder, kept across framers
	bw      *bufio.Writer  // the token holder's, borrowed from bwPool for the hold
	dataHdr [9]byte        // the token holder's scratch for DATA frame headers
	wf      *http2.Framer  // write side framer over bw
	cork    *corkConn      // under the TLS conn, when there is one

	lastRead    atomic.Int64 // unix nanos of the last frame read
	gotSettings bool         // the peer's first SETTINGS was read (readLoop's)
	resets      resetBucket  // readLoop's: early resets and refusals the peer may still cause
	ctrlQueued  atomic.Int32 // control frames queued, not yet written (changed under mu)
	done        chan struct{}
	writeDone   chan struct{} // closed once wclosed and every queued frame is out
	wg          sync.WaitGroup

	mu       sync.Mutex
	wq       []outFrame
	wspare   []outFrame
	started  bool          // start or serve ran: writers may run
	wclosed  bool          // no more frames will be queued
	writing  bool          // the write token is taken (by writeQueued or a Stream.Write)
	writer   bool          // a writeQueued goroutine runs (writing, or lingering)
	kicked   bool          // kickLocked handed the lingering writer the token
	wkick    chan struct{} // hands a lingering writer the token
	wdrained bool          // writeDone is closed
	werr     error         // the first write error; nothing is written after it

	henc *hpack.Encoder
	hbuf bytes.Buffer

	streams     map[uint32]*Stream
	handlers    map[uint32]context.CancelFunc // server: streams whose handler runs
	orphans     int                           // server: handlers still running for streams already gone
	nextID      uint32                        // client: next stream id
	maxPeerID   uint32                        // server: highest stream id the peer opened
	reserved    int                           // client: slots promised to dials not yet opened
	peerStreams uint32                        // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	peerWindow  int32                         // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame   uint32                        // peer's SETTINGS_MAX_FRAME_SIZE
	flow        flow                          // the connection's windows
	goingAway   bool                          // GOAWAY sent or received: no new streams
	closed      bool
	err         error
	idleTimer   *time.Timer
	pingTimer   *time.Timer // keepalive (pingFired), both sides; stopped at close
	pings       uint64
	idleSince   time.Time
}

type frameKind uint8

const (
	kindData frameKind = iota
	kindHeaders
	kindRST
	kindWindow
	kindSettings
	kindSettingsAck
	kindPing
	kindPingAck
	kindGoAway
)

// outFrame is one queued frame. Data frames point into the caller's buffer;
// the caller waits on done until the frame is written.
type outFrame struct {
	kind     frameKind
	streamID uint32
	end      bool
	data     []byte
	code     http2.ErrCode
	val      uint32
	ping     [8]byte
	done     chan error
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

// queue appends a frame for the token holder, starting a writer if nobody
// holds the token (a holder drains the queue before it lets go). c.mu must
// be held. It never blocks, so readLoop can answer PINGs and SETTINGS while
// a writer waits on the socket.
func (c *conn) queue(f outFrame) {
	if c.wclosed {
		if f.done != nil {
			f.done <- c.errLocked()
		}
		return
	}
	if f.kind.control() {
		c.ctrlQueued.Add(1)
	}
	c.wq = append(c.wq, f)
	c.kickLocked()
}

// control tells the frames we owe the peer (answers and window credit)
// from our own requests and data, for the MaxControlFrames bound.
func (k frameKind) control() bool {
	switch k {
	case kindRST, kindWindow, kindSettingsAck, kindPingAck:
		return true
	}
	return false
}

// kickLocked starts a writer for queued frames when nobody holds the
// token. On a closed connection none starts: the frames fail. c.mu must be
// held.
func (c *conn) kickLocked() {
	switch {
	case c.writing:
		return // the holder drains the queue before it lets go
	case !c.started && !c.closed:
		return // begin kicks
	case len(c.wq) > 0 && c.closed:
		err := c.errLocked()
		c.ctrlQueued.Store(0)
		for i := range c.wq {
			if c.wq[i].done != nil {
				c.wq[i].done <- err
			}
			c.wq[i] = outFrame{}
		}
		c.wq = c.wq[:0]
	case len(c.wq) > 0:
		c.writing = true
		if c.writer { // lingering: hand it the token
			c.kicked = true
			c.wkick <- struct{}{} // never blocks: one kick per hand-over
			return
		}
		c.writer = true
		c.wg.Add(1) // not after wait: closed is set before anyone waits
		go c.writeQueued()
		return
	}
	if c.wclosed && !c.wdrained {
		c.wdrained = true
		close(c.writeDone)
	}
}

func (c *conn) errLocked() error {
	if c.err != nil {
		return c.err
	}
	return ErrConnClosed
}

// writerLinger is how long a writer goroutine waits for more frames once
// its queue is empty before it ends. A busy connection keeps its writer
// (a goroutine per queued frame cost a stack growth each through the TLS
// write path: +10% CPU at 1000 req/s); an idle one holds none.
const writerLinger = 100 * time.Millisecond

// writeQueued writes the queued frames as the token holder (kickLocked
// gave it the token), and again each time it is handed the token within
// writerLinger; then it ends. It takes every queued frame at once, writes
// them and flushes once, so streams that write together share TLS records
// and syscalls.
func (c *conn) writeQueued() {
	defer c.wg.Done()
	t := time.NewTimer(writerLinger)
	defer t.Stop()
	for {
		c.takeWriter()
		c.release(c.drain(0))
		t.Reset(writerLinger)
		select {
		case <-c.wkick:
		case <-t.C:
		case <-c.done:
		}
		c.mu.Lock()
		if !c.kicked {
			// Nothing was handed over: end. The token may be held all the
			// same, by a Stream.Write that took it directly.
			c.writer = false
			c.mu.Unlock()
			return
		}
		c.kicked = false
		select {
		case <-c.wkick: // the timer or the close won the race with the kick
		default: // taken above
		}
		c.mu.Unlock()
	}
}

// bwPool holds the write buffers of connections not writing at the moment.
var bwPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 64<<10) }}

// tokenWriter is the framer's way to the token holder's buffer.
type tokenWriter struct{ c *conn }

func (w tokenWriter) Write(p []byte) (int, error) { return w.c.bw.Write(p) }

// takeWriter borrows the write buffer and corks the socket, right after the
// token is taken: whatever the holder writes leaves in one write at flush.
func (c *conn) takeWriter() {
	c.bw = bwPool.Get().(*bufio.Writer)
	c.bw.Reset(c.nc)
	if c.cork != nil {
		c.cork.cork()
	}
}

// tryTakeWriter takes the write token if the connection is idle: no holder,
// nothing queued ahead. c.mu must be held.
func (c *conn) tryTakeWriter() bool {
	if c.writing || len(c.wq) > 0 || c.wclosed || c.werr != nil {
		return false
	}
	c.writing = true
	c.takeWriter()
	return true
}

// maxDrainRounds bounds how long a Stream.Write holding the token serves
// other streams' frames before it hands the rest to a writer goroutine.
const maxDrainRounds = 4

// drain writes queued frames and flushes, as the token holder, until the
// queue is empty (or rounds run out, when rounds > 0). It returns the
// first write error.
func (c *conn) drain(rounds int) error {
	for i := 0; rounds == 0 || i < rounds; i++ {
		c.mu.Lock()
		q, werr := c.wq, c.werr
		if len(q) == 0 {
			c.mu.Unlock()
			break
		}
		c.wq, c.wspare = c.wspare[:0], nil
		c.mu.Unlock()
		var ctrl int32
		for i := range q {
			if q[i].kind.control() {
				ctrl++
			}
			if werr == nil {
				werr = c.writeFrame(&q[i])
			}
			// The bytes are in the write buffer (or on the wire): release
			// the writer now, so it reads its next chunk while this one is
			// encrypted and sent. A later failure reaches it on its next
			// Write, as with a TCP socket's send buffer.
			if q[i].done != nil {
				q[i].done <- werr
			}
			q[i] = outFrame{}
		}
		c.ctrlQueued.Add(-ctrl) // written (or failed): no longer owed
		c.mu.Lock()
		c.wspare = q[:0]
		if werr != nil && c.werr == nil {
			c.werr = werr
		}
		c.mu.Unlock()
	}
	c.mu.Lock()
	werr := c.werr
	c.mu.Unlock()
	if werr == nil {
		if werr = c.flush(); werr != nil {
			c.mu.Lock()
			c.werr = werr
			c.mu.Unlock()
		}
	}
	return werr
}

// release gives the write token back, starting a writer if frames came in
// meanwhile, and closes the connection after a write error.
func (c *conn) release(werr error) {
	c.bw.Reset(nil)
	bwPool.Put(c.bw)
	c.bw = nil
	if c.cork != nil {
		c.cork.uncork() // nothing is left in it: drain flushed
	}
	c.mu.Lock()
	c.writing = false
	c.kickLocked()
	c.mu.Unlock()
	if werr != nil {
		c.closeWithError(fmt.Errorf("hbone: write: %w", werr))
	}
}

// flush pushes the buffered frames through TLS and, under the TLS conn,
// the records gathered since the token was taken out in one write
// (corkConn), then corks again for whatever the holder writes next.
func (c *conn) flush() error {
	err := c.bw.Flush()
	if c.cork == nil {
		return err
	}
	if uerr := c.cork.uncork(); err == nil {
		err = uerr
	}
	c.cork.cork()
	return err
}

// writeData writes one DATA frame as the token holder, then whatever other
// streams queued meanwhile, and flushes.
func (c *conn) writeData(streamID uint32, p []byte) error {
	f := outFrame{kind: kindData, streamID: streamID, data: p}
	err := c.writeFrame(&f)
	if err != nil {
		c.mu.Lock()
		if c.werr == nil {
			c.werr = err
		}
		c.mu.Unlock()
	}
	return c.drain(maxDrainRounds)
}

func (c *conn) writeFrame(f *outFrame) error {
	switch f.kind {
	case kindData:
		// Written by hand so the payload goes from the caller's buffer to
		// the bufio.Writer without the Framer's intermediate copy.
		hdr := c.dataHdr[:]
		n := len(f.data)
		hdr[0], hdr[1], hdr[2] = byte(n>>16), byte(n>>8), byte(n)
		hdr[3] = byte(http2.FrameData)
		hdr[4] = 0 // the scratch is reused: every byte is set each time
		if f.end {
			hdr[4] = byte(http2.FlagDataEndStream)
		}
		binary.BigEndian.PutUint32(hdr[5:], f.streamID)
		if _, err := c.bw.Write(hdr); err != nil {
			return err
		}
		_, err := c.bw.Write(f.data)
		return err
	case kindHeaders:
		block := f.data
		max := int(c.peerFrameSize())
		first := true
		for first || len(block) > 0 {
			chunk := block
			if len(chunk) > max {
				chunk = chunk[:max]
			}
			block = block[len(chunk):]
			var err error
			if first {
				err = c.wf.WriteHeaders(http2.HeadersFrameParam{StreamID: f.streamID, BlockFragment: chunk, EndStream: f.end, EndHeaders: len(block) == 0})
				first = false
			} else {
				err = c.wf.WriteContinuation(f.streamID, len(block) == 0, chunk)
			}
			if err != nil {
				return err
			}
		}
		return nil
	case kindRST:
		return c.wf.WriteRSTStream(f.streamID, f.code)
	case kindWindow:
		return c.wf.WriteWindowUpdate(f.streamID, f.val)
	case kindSettings:
		s := []http2.Setting{
			{ID: http2.SettingInitialWindowSize, Val: uint32(c.cfg.StreamWindow)},
			{ID: http2.SettingMaxFrameSize, Val: c.cfg.MaxFrameSize},
			{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
		}
		if c.client {
			s = append(s, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		} else {
			s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxStreams})
		}
		return c.wf.WriteSettings(s...)
	case kindSettingsAck:
		return c.wf.WriteSettingsAck()
	case kindPing:
		return c.wf.WritePing(false, f.ping)
	case kindPingAck:
		return c.wf.WritePing(true, f.ping)
	case kindGoAway:
		return c.wf.WriteGoAway(f.val, f.code, nil)
	}
	return fmt.Errorf("hbone: unknown frame kind %d", f.kind)
}

func (c *conn) peerFrameSize() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerFrame
}

// connError is a protocol violation by the peer that ends the connection.
type connError struct {
	code http2.ErrCode
	msg  string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: peer protocol error (%v): %s", e.code, e.msg)
}

// readLoop reads every frame and applies it. It never blocks on anything
// but the socket.
func (c *conn) readLoop() {
	err := c.readFrames()
	var ce connError
	if errors.As(err, &ce) {
		c.mu.Lock()
		c.queue(outFrame{kind: kindGoAway, val: c.maxPeerID, code: ce.code})
		c.mu.Unlock()
		if ce.code == http2.ErrCodeEnhanceYourCalm {
			// Abuse, not a bug: the operator should hear of it.
			c.log.Warn("hbone: connection closed for abuse (GOAWAY ENHANCE_YOUR_CALM)", "peer", c.nc.RemoteAddr().String(), "identity", c.peer.String(), "err", err)
		} else {
			c.log.Debug("hbone connection error", "peer", c.nc.RemoteAddr(), "err", err)
		}
		c.closeGracefully(err)
		return
	}
	if errors.Is(err, io.EOF) {
		err = ErrConnClosed
	}
	c.closeWithError(err)
}

// newReadFramer returns a framer over the connection's reader and header
// decoder. The framer keeps a buffer the size of the largest frame it has
// read, for the connection's life; readFrames starts a fresh one after a
// frame larger than keepFrameBuf, so that a peer that sends large frames
// once (ztunnel allows 1 MiB) does not leave each idle connection holding
// that much.
func (c *conn) newReadFramer() *http2.Framer {
	fr := http2.NewFramer(nil, c.br)
	fr.SetMaxReadFrameSize(c.cfg.MaxFrameSize)
	fr.SetReuseFrames()
	fr.ReadMetaHeaders = c.hdec
	fr.MaxHeaderListSize = maxHeaderListSize
	return fr
}

// keepFrameBuf is the largest frame buffer a connection keeps between
// frames (Ambit's own peers send at most 32 KiB).
const keepFrameBuf = 64 << 10

func (c *conn) readFrames() error {
	big := false // the last frame grew the framer's buffer past keepFrameBuf
	for {
		if big {
			c.fr, big = c.newReadFramer(), false
		}
		f, err := c.fr.ReadFrame()
		big = err == nil && f.Header().Length > keepFrameBuf
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.mu.Lock()
				if s := c.streams[se.StreamID]; s != nil {
					c.resetLocked(s, se.Code, false)
				} else {
					c.queue(outFrame{kind: kindRST, streamID: se.StreamID, code: se.Code})
				}
				c.mu.Unlock()
				if err := c.spendReset("stream errors"); err != nil {
					return err
				}
				continue
			}
			var h2e http2.ConnectionError
			if errors.As(err, &h2e) {
				return connError{http2.ErrCode(h2e), err.Error()}
			}
			return err
		}
		c.lastRead.Store(time.Now().UnixNano())
		if !c.gotSettings {
			sf, ok := f.(*http2.SettingsFrame)
			if !ok || sf.IsAck() {
				return connError{http2.ErrCodeProtocol, "first frame is not SETTINGS"}
			}
			c.gotSettings = true
		}
		if err := c.handleFrame(f); err != nil {
			return err
		}
		if n := c.ctrlQueued.Load(); int(n) > c.cfg.MaxControlFrames {
			return connError{http2.ErrCodeEnhanceYourCalm, fmt.Sprintf("the peer does not read: %d frames owed to it are queued (the bound is %d)", n, c.cfg.MaxControlFrames)}
		}
	}
}

func (c *conn) handleFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		s := c.streams[f.StreamID]
		if s == nil {
			known := c.knownStreamLocked(f.StreamID)
			c.mu.Unlock()
			if !known {
				return connError{http2.ErrCodeProtocol, fmt.Sprintf("RST_STREAM on idle stream %d", f.StreamID)}
			}
			return nil
		}
		// A server stream reset before its answer cost a handler and
		// perhaps a dial for nothing (rapid reset).
		early := !c.client && !s.responded
		s.rerr = &ResetError{Code: f.ErrCode, Remote: true}
		s.reset = true
		c.removeLocked(s)
		c.mu.Unlock()
		if early {
			return c.spendReset("streams reset before their answer")
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			c.mu.Lock()
			c.queue(outFrame{kind: kindPingAck, ping: f.Data})
			c.mu.Unlock()
		}
	case *http2.GoAwayFrame:
		c.mu.Lock()
		defer c.mu.Unlock()
		c.goingAway = true
		if f.ErrCode != http2.ErrCodeNo {
			c.log.Debug("hbone: peer sent GOAWAY", "peer", c.nc.RemoteAddr(), "code", f.ErrCode, "debug", string(f.DebugData()))
		}
		for id, s := range c.streams {
			if c.client && id > f.LastStreamID {
				s.rerr = errGoingAway
				s.reset = true
				c.removeLocked(s)
			}
		}
		c.checkIdleLocked()
	case *http2.PushPromiseFrame:
		return connError{http2.ErrCodeProtocol, "PUSH_PROMISE on an HBONE connection"}
	}
	// PRIORITY and unknown frame types are ignored, as RFC 9113 asks.
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return connError{http2.ErrCodeProtocol, err.Error()}
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - int64(c.peerWindow)
			c.peerWindow = int32(s.Val)
			for _, st := range c.streams {
				if !st.flow.add(delta) {
					return connError{http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
				}
				st.cond.Broadcast()
			}
		case http2.SettingMaxFrameSize:
			c.peerFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerStreams = s.Val
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(s.Val)
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.queue(outFrame{kind: kindSettingsAck})
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		if !c.flow.add(int64(f.Increment)) {
			return connError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		for _, s := range c.streams {
			s.cond.Broadcast()
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil // a stream we already closed
	}
	if !s.flow.add(int64(f.Increment)) {
		c.resetLocked(s, http2.ErrCodeFlowControl, false)
		return c.spendReset("stream window overflows")
	}
	s.cond.Broadcast()
	return nil
}

func (c *conn) onData(f *http2.DataFrame) error {
	n := int64(f.Length) // padding counts against flow control too
	data := f.Data()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.flow.receive(n) {
		return connError{http2.ErrCodeFlowControl, "peer overran the connection window"}
	}
	s := c.streams[f.StreamID]
	if s == nil || s.reof || s.reset {
		if !c.knownStreamLocked(f.StreamID) {
			return connError{http2.ErrCodeProtocol, fmt.Sprintf("DATA on idle stream %d", f.StreamID)}
		}
		// A stream we closed or reset: the bytes are dropped but the
		// connection window still gets them back.
		c.creditConnLocked(n)
		if s != nil && s.reof && !s.reset {
			c.resetLocked(s, http2.ErrCodeStreamClosed, false)
			return c.spendReset("DATA after END_STREAM")
		}
		return nil
	}
	if !s.flow.receive(n) {
		c.creditConnLocked(n)
		c.resetLocked(s, http2.ErrCodeFlowControl, false)
		return c.spendReset("streams over their window")
	}
	if pad := n - int64(len(data)); pad > 0 {
		c.creditConnLocked(pad)
		s.creditLocked(pad)
	}
	if len(data) > 0 && s.direct != nil && s.rbuf.len() == 0 && !s.wtBusy && !s.closed {
		// Nothing queued ahead: straight to the socket, without waking
		// the stream's WriteTo (see Stream.WriteTo).
		d := s.direct
		s.sinkBusy = true
		c.mu.Unlock()
		n, err := d.WriteNow(data)
		c.mu.Lock()
		s.sinkBusy = false
		if err != nil {
			s.direct = nil // WriteTo meets the error on its own write
		}
		if n > 0 {
			s.sunk += int64(n)
			c.creditConnLocked(int64(n))
			s.creditLocked(int64(n))
			data = data[n:]
		}
		if s.closed || s.reset {
			c.creditConnLocked(int64(len(data)))
			s.wakeLocked()
			return nil
		}
	}
	if len(data) == 0 && !f.StreamEnded() {
		// Nothing for a reader to see (all of it went to the socket, or
		// an empty frame): waking the stream's WriteTo for nothing would
		// cost a context switch per frame.
		return nil
	}
	if len(data) > 0 {
		s.rbuf.write(data)
	}
	if f.StreamEnded() {
		c.remoteEndedLocked(s)
	}
	s.wakeLocked()
	return nil
}

// remoteEndedLocked records the peer's END_STREAM; a stream ended both ways is done.
func (c *conn) remoteEndedLocked(s *Stream) {
	s.reof = true
	if s.wEOF {
		c.removeLocked(s)
	}
}

// knownStreamLocked reports whether id names a stream that was opened at
// some point (as opposed to an idle one).
func (c *conn) knownStreamLocked(id uint32) bool {
	if id == 0 {
		return false
	}
	if c.client {
		return id%2 == 1 && id < c.nextID
	}
	return id%2 == 1 && id <= c.maxPeerID
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := f.StreamID
	if s := c.streams[id]; s != nil {
		if f.Truncated {
			// Over the header list size we advertised.
			c.resetLocked(s, http2.ErrCodeProtocol, false)
			return c.spendResets(oversizedCost, "header lists over the limit")
		}
		if c.client && !s.gotResp {
			status, err := strconv.Atoi(f.PseudoValue("status"))
			if err != nil || status < 100 || status > 999 {
				c.resetLocked(s, http2.ErrCodeProtocol, false)
				return nil
			}
			if status >= 100 && status < 200 {
				return nil // informational; the real answer follows
			}
			s.gotResp = true
			s.status = status
			s.header = regularHeaders(f)
		} else if !f.StreamEnded() {
			// Trailers must end the stream.
			c.resetLocked(s, http2.ErrCodeProtocol, false)
			return c.spendReset("trailers that do not end the stream")
		}
		if f.StreamEnded() {
			c.remoteEndedLocked(s)
		}
		s.wakeLocked()
		return nil
	}
	if c.client {
		if c.knownStreamLocked(id) {
			return nil // a stream we already closed
		}
		return connError{http2.ErrCodeProtocol, fmt.Sprintf("HEADERS on stream %d the client never opened", id)}
	}
	// Server: a new request.
	if id%2 == 0 || id <= c.maxPeerID {
		if id <= c.maxPeerID && id%2 == 1 {
			return nil // late frame of a closed stream
		}
		return connError{http2.ErrCodeProtocol, fmt.Sprintf("bad new stream id %d", id)}
	}
	c.maxPeerID = id
	if f.Truncated {
		// Over the header list size we advertised: 431, as x/net's
		// server answers, and the stream is over (the decoder's state
		// is intact: the connection goes on).
		block := c.encodeHeadersLocked([]hpack.HeaderField{{Name: ":status", Value: "431"}, {Name: reasonHeader, Value: fmt.Sprintf("header list over %d bytes", maxHeaderListSize)}})
		c.queue(outFrame{kind: kindHeaders, streamID: id, end: true, data: block})
		if !f.StreamEnded() {
			c.queue(outFrame{kind: kindRST, streamID: id, code: http2.ErrCodeNo})
		}
		return c.spendResets(oversizedCost, "header lists over the limit")
	}
	// A stream counts against MaxStreams while it is open or its handler
	// runs: a reset stream whose dial is still being cancelled holds its
	// slot, so resets cannot buy a peer more concurrent work.
	if c.goingAway || c.closed || uint32(len(c.streams)+c.orphans) >= c.cfg.MaxStreams {
		c.queue(outFrame{kind: kindRST, streamID: id, code: http2.ErrCodeRefusedStream})
		return c.spendReset("streams over the concurrency limit")
	}
	if c.limits != nil {
		if ok, why := c.limits.admit(c.peerN); !ok {
			c.log.Debug("hbone: stream refused", "peer", c.peer.String(), "reason", why)
			c.queue(outFrame{kind: kindRST, streamID: id, code: http2.ErrCodeRefusedStream})
			return c.spendReset("streams over the peer's or the server's limit")
		}
	}
	s := c.newStreamLocked(id)
	s.method = f.PseudoValue("method")
	s.authority = f.PseudoValue("authority")
	s.extended = f.PseudoValue("path") != "" || f.PseudoValue("scheme") != "" || f.PseudoValue("protocol") != ""
	s.header = regularHeaders(f)
	if f.StreamEnded() {
		s.reof = true
	}
	c.stopIdleLocked()
	if c.newStream != nil {
		// A context per stream, not one under the server's: cancelling it
		// touches no lock shared by every connection.
		ctx, cancel := context.WithCancel(context.Background())
		if c.handlers == nil {
			c.handlers = map[uint32]context.CancelFunc{}
		}
		c.handlers[id] = cancel
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.newStream(ctx, s)
			c.handlerDone(s)
		}()
	}
	return nil
}

func regularHeaders(f *http2.MetaHeadersFrame) http.Header {
	fields := f.RegularFields()
	if len(fields) == 0 {
		return nil
	}
	h := make(http.Header, len(fields))
	for _, hf := range fields {
		h.Add(hf.Name, hf.Value)
	}
	return h
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

// encodeHeadersLocked hpack-encodes fields. It must run under c.mu and the
// frame be queued under the same lock, so blocks reach the wire in the
// order the encoder's table saw them.
func (c *conn) encodeHeadersLocked(fields []hpack.HeaderField) []byte {
	c.hbuf.Reset()
	for _, f := range fields {
		_ = c.henc.WriteField(f) // writes to a bytes.Buffer cannot fail
	}
	return bytes.Clone(c.hbuf.Bytes())
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

// creditConnLocked returns n consumed bytes to the peer's connection window.
func (c *conn) creditConnLocked(n int64) {
	if inc := c.flow.credit(n, c.cfg.ConnWindow); inc > 0 {
		c.queue(outFrame{kind: kindWindow, val: inc})
	}
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
