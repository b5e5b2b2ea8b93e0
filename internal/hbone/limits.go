package hbone

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
)

// frameGuard sits under the read Framer and watches the frame headers go
// by, to end a header block of too many CONTINUATION frames. The Framer
// reads a block's CONTINUATION frames inside one ReadFrame call
// (ReadMetaHeaders) and bounds what they decode to, not how many there
// are: five million empty ones over 2.1 s were never cut off. Assembling
// header blocks by hand instead would mean re-implementing the Framer's
// field checks; following the 9-byte headers costs a few comparisons per
// frame and nothing per payload byte.
type frameGuard struct {
	r     io.Reader
	hdr   [9]byte
	nhdr  int    // bytes of the current frame header seen
	left  uint32 // payload bytes of the current frame still to come
	conts int    // CONTINUATION frames since the last other frame
	err   error  // returned from the next Read once set
}

// errTooManyContinuations is the connection error for a header block of
// more than maxContinuations CONTINUATION frames.
var errTooManyContinuations = connError{http2.ErrCodeEnhanceYourCalm,
	fmt.Sprintf("header block of more than %d CONTINUATION frames", maxContinuations)}

func (g *frameGuard) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.r.Read(p)
	g.scan(p[:n])
	return n, err
}

// scan follows the frame boundaries in b. A violation is reported on the
// next Read: the Framer drops an error that comes with a full read.
func (g *frameGuard) scan(b []byte) {
	for len(b) > 0 {
		if g.left > 0 {
			k := uint32(min(len(b), int(min(g.left, 1<<30))))
			g.left -= k
			b = b[k:]
			continue
		}
		k := copy(g.hdr[g.nhdr:], b)
		g.nhdr += k
		b = b[k:]
		if g.nhdr < len(g.hdr) {
			return
		}
		g.nhdr = 0
		g.left = uint32(g.hdr[0])<<16 | uint32(g.hdr[1])<<8 | uint32(g.hdr[2])
		if http2.FrameType(g.hdr[3]) != http2.FrameContinuation {
			g.conts = 0
			continue
		}
		if g.conts++; g.conts > maxContinuations && g.err == nil {
			g.err = errTooManyContinuations
		}
	}
}

// resetBucket is a token bucket for the streams a peer resets before
// their answer or makes us reset: ResetBurst tokens, refilled at
// ResetRate per second. Owned by the connection's reader.
type resetBucket struct {
	tokens float64
	last   time.Time
	burst  float64
	rate   float64
	spent  int // for the error message
}

func newResetBucket(cfg Config) resetBucket {
	return resetBucket{tokens: float64(cfg.ResetBurst), burst: float64(cfg.ResetBurst), rate: cfg.ResetRate}
}

// take spends n tokens; false when the bucket holds fewer.
func (b *resetBucket) take(now time.Time, n int) bool {
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < float64(n) {
		return false
	}
	b.tokens -= float64(n)
	b.spent += n
	return true
}

// streamLimits counts a server's streams by peer identity and in all,
// across connections (MaxPeerStreams, MaxServerStreams). A stream counts
// from its HEADERS until it is over and its handler has returned.
type streamLimits struct {
	perPeer int64
	total   atomic.Int64
	max     int64

	mu    sync.Mutex
	peers map[identity.ID]*peerStreams
}

// peerStreams is one identity's count, shared by its connections.
type peerStreams struct {
	n     atomic.Int64
	conns int // guarded by streamLimits.mu
}

func newStreamLimits(cfg Config) *streamLimits {
	return &streamLimits{perPeer: int64(cfg.MaxPeerStreams), max: int64(cfg.MaxServerStreams), peers: map[identity.ID]*peerStreams{}}
}

// join returns the count a new connection of peer shares; leave gives it back.
func (l *streamLimits) join(peer identity.ID) *peerStreams {
	l.mu.Lock()
	defer l.mu.Unlock()
	ps := l.peers[peer]
	if ps == nil {
		ps = &peerStreams{}
		l.peers[peer] = ps
	}
	ps.conns++
	return ps
}

func (l *streamLimits) leave(peer identity.ID, ps *peerStreams) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ps.conns--; ps.conns == 0 && l.peers[peer] == ps {
		delete(l.peers, peer)
	}
}

// admit counts a new stream of ps, or says which bound refuses it.
func (l *streamLimits) admit(ps *peerStreams) (ok bool, why string) {
	if n := ps.n.Add(1); n > l.perPeer {
		ps.n.Add(-1)
		return false, fmt.Sprintf("peer holds %d streams (the limit per peer)", l.perPeer)
	}
	if n := l.total.Add(1); n > l.max {
		l.total.Add(-1)
		ps.n.Add(-1)
		return false, fmt.Sprintf("server holds %d streams (its limit)", l.max)
	}
	return true, ""
}

func (l *streamLimits) release(ps *peerStreams) {
	ps.n.Add(-1)
	l.total.Add(-1)
}

// spendReset takes a token from the reset budget for a stream the peer
// reset before its answer, or made us reset or refuse (why names which);
// an empty budget is the peer's connection error. readLoop's only.
func (c *conn) spendReset(why string) error { return c.spendResets(1, why) }

// oversizedCost is what a header list over the limit takes from the
// reset budget: decoding up to twice the limit of HPACK (x/net's Framer
// bounds it there) cost ~0.85 ms of CPU per 431 against a proxy process,
// some forty times a reset stream; at one token each, one connection
// bought 220 ms of CPU.
const oversizedCost = 10

// spendResets is spendReset for n tokens at once.
func (c *conn) spendResets(n int, why string) error {
	if c.resets.take(time.Now(), n) {
		return nil
	}
	return connError{http2.ErrCodeEnhanceYourCalm, fmt.Sprintf("%s: %d streams reset or refused early, more than the budget (%d, then %g per second)", why, c.resets.spent, c.cfg.ResetBurst, c.cfg.ResetRate)}
}

// handlerDone ends a stream's handler: its context is cancelled, and the
// stream's slot is free if the stream is over too.
func (c *conn) handlerDone(s *Stream) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cancel := c.handlers[s.id]
	if cancel == nil {
		return
	}
	cancel()
	delete(c.handlers, s.id)
	if len(c.handlers) == 0 {
		// A map keeps its largest size: one that held a burst's
		// handlers would stay with every idle connection (0.4 MB over
		// 100 connections after 10,000 set-ups).
		c.handlers = nil
	}
	if s.removed {
		c.orphans--
		c.slotFreedLocked()
	}
}

// goneLocked marks a server stream over: its handler, if it still runs,
// is cancelled (no dial goes on for a stream that is gone) and keeps the
// slot until it returns; otherwise the slot is free now.
func (c *conn) goneLocked(s *Stream) {
	if c.client {
		return
	}
	if cancel := c.handlers[s.id]; cancel != nil {
		cancel()
		c.orphans++
		return
	}
	c.slotFreedLocked()
}

// slotFreedLocked gives a finished server stream's slot back.
func (c *conn) slotFreedLocked() {
	if c.limits != nil {
		c.limits.release(c.peerN)
	}
	c.checkIdleLocked()
}
