package hbone

import (
	"context"
	"fmt"
	"net/http"
	"strconv"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

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

func (c *conn) onRSTStream(f *http2.RSTStreamFrame) error {
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
	return nil
}

func (c *conn) onPing(f *http2.PingFrame) error {
	if !f.IsAck() {
		c.mu.Lock()
		c.queue(outFrame{kind: kindPingAck, ping: f.Data})
		c.mu.Unlock()
	}
	return nil
}

func (c *conn) onGoAway(f *http2.GoAwayFrame) error {
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
	return nil
}
