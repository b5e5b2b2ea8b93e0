package hbone

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

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
