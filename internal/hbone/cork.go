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
	buf    *[]byte // from corkPool while something is gathered
}

// corkPool holds gathering buffers: a connection borrows one for a flush.
var corkPool = sync.Pool{New: func() any { b := make([]byte, 0, 80<<10); return &b }}

func newCorkConn(nc net.Conn) *corkConn { return &corkConn{Conn: nc} }

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		if c.buf == nil {
			c.buf = corkPool.Get().(*[]byte)
		}
		*c.buf = append(*c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork writes what was gathered and gives the buffer back.
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if c.buf == nil {
		return nil
	}
	_, err := c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	corkPool.Put(c.buf)
	c.buf = nil
	return err
}
