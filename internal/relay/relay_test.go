package relay

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
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
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// client <-> [a relay b] <-> server: each direction ends on its own.
func TestBidirectionalHalfClose(t *testing.T) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done := make(chan Result, 1)
	go func() { done <- Bidirectional(a, b) }()

	// The server answers first and half-closes; the client keeps sending after.
	server.Write([]byte("hello"))
	server.CloseWrite()
	got, err := io.ReadAll(client)
	if err != nil || string(got) != "hello" {
		t.Fatalf("client read %q, %v", got, err)
	}
	big := bytes.Repeat([]byte("x"), 1<<20)
	go func() {
		client.Write(big)
		client.CloseWrite()
	}()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	up, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(up, big) {
		t.Fatalf("server read %d bytes, %v", len(up), err)
	}
	r := <-done
	if r.AToB != int64(len(big)) || r.BToA != 5 || r.Err() != nil {
		t.Fatalf("result %+v", r)
	}
}
