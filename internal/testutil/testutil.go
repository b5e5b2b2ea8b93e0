// Package testutil holds helpers that several packages' tests share: real
// TCP servers on loopback that end with the test, network namespaces,
// WaitFor, and a test CA.
package testutil

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
)

// ServeTCP listens on addr (use port 0 for any) and runs serve on each
// connection in its own goroutine, closing it after, until the test ends.
func ServeTCP(t testing.TB, addr string, serve func(net.Conn)) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

// Echo serves TCP echo on addr: it copies back until the client
// half-closes, then half-closes itself. Each client's address is sent on
// peers, if not nil.
func Echo(t testing.TB, addr string, peers chan<- string) netip.AddrPort {
	return ServeTCP(t, addr, func(c net.Conn) {
		if peers != nil {
			peers <- c.RemoteAddr().String()
		}
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

// TCPPair returns the two ends of a real loopback TCP connection, closed
// with the test.
func TCPPair(t testing.TB) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		c.Close()
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// Buffer is a bytes.Buffer that goroutines may write while a test reads it
// (a logger's output, say).
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is what was written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
