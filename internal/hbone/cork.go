package hbone

import (
	"net"
	"sync"
)

// corkConn sits under a TLS connection so that the records of one flush
// leave in one write: crypto/tls writes each record (at most 16 KiB) with
// its own call, which on a busy tunnel is a syscall, and a TCP segment,
// per record. Between cork and uncork, writes are gathered; otherwise (the
// handshake, alerts) they go straight through.
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	buf    []byte
}

func newCorkConn(nc net.Conn) *corkConn { return &corkConn{Conn: nc} }

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork writes what was gathered. A gathered buffer grown past maxCork is
// dropped afterwards, so an idle connection does not keep a burst's memory.
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.buf)
	if cap(c.buf) > maxCork {
		c.buf = nil
	} else {
		c.buf = c.buf[:0]
	}
	return err
}

// maxCork is the gathered buffer kept between flushes: a full write buffer
// (64 KiB) and its TLS overhead.
const maxCork = 80 << 10
