package hbone

import (
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/net/http2"
)

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

// handleFrame applies one frame, by type.
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
		return c.onRSTStream(f)
	case *http2.PingFrame:
		return c.onPing(f)
	case *http2.GoAwayFrame:
		return c.onGoAway(f)
	case *http2.PushPromiseFrame:
		return connError{http2.ErrCodeProtocol, "PUSH_PROMISE on an HBONE connection"}
	}
	// PRIORITY and unknown frame types are ignored, as RFC 9113 asks.
	return nil
}
