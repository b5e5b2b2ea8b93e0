package relay

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
	"unsafe"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// runners are the two ways to relay, each run to its end: goroutines over
// net.TCPConns (Bidirectional), and Sockets adopted by a poller.
func runners(t *testing.T) map[string]func(a, b Conn) Result {
	p, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return map[string]func(a, b Conn) Result{
		"goroutines": Bidirectional,
		"sockets": func(a, b Conn) Result {
			done := make(chan Result, 1)
			Go(adopt(t, p, a.(*net.TCPConn)), adopt(t, p, b.(*net.TCPConn)), func(r Result) { done <- r })
			return <-done
		},
	}
}

// client <-> [a relay b] <-> server: each direction ends on its own.
func TestBidirectionalHalfClose(t *testing.T) {
	for name, run := range runners(t) {
		t.Run(name, func(t *testing.T) { testHalfClose(t, run) })
	}
}

func testHalfClose(t *testing.T, run func(a, b Conn) Result) {
	client, a := testutil.TCPPair(t)
	b, server := testutil.TCPPair(t)
	done := make(chan Result, 1)
	go func() { done <- run(a, b) }()

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

// Random bytes both ways at once through the socket-to-socket path (which
// waits for readability, then reads into a pooled buffer): every byte
// arrives, in order, whether reads come full or short.
func TestBidirectionalIntegrity(t *testing.T) {
	for name, run := range runners(t) {
		t.Run(name, func(t *testing.T) { testIntegrity(t, run) })
	}
}

func testIntegrity(t *testing.T, run func(a, b Conn) Result) {
	client, a := testutil.TCPPair(t)
	b, server := testutil.TCPPair(t)
	done := make(chan Result, 1)
	go func() { done <- run(a, b) }()
	up, down := make([]byte, 3<<20+17), make([]byte, 2<<20+5)
	rand.Read(up)
	rand.Read(down)
	send := func(c *net.TCPConn, p []byte) {
		for len(p) > 0 { // uneven writes, so reads come in all sizes
			n := min(len(p), 1+len(p)%70000)
			c.Write(p[:n])
			p = p[n:]
		}
		c.CloseWrite()
	}
	go send(client, up)
	go send(server, down)
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	server.SetReadDeadline(time.Now().Add(10 * time.Second))
	gotDown, err1 := io.ReadAll(client)
	gotUp, err2 := io.ReadAll(server)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if !bytes.Equal(gotUp, up) || !bytes.Equal(gotDown, down) {
		t.Fatalf("corrupted: up %d of %d bytes, down %d of %d", len(gotUp), len(up), len(gotDown), len(down))
	}
	if r := <-done; r.AToB != int64(len(up)) || r.BToA != int64(len(down)) || r.Err() != nil {
		t.Fatalf("result %+v", r)
	}
}

// A relay blocked on an idle socket ends when the socket is closed under
// it (how the proxy closes connections a policy change denies).
func TestCloseUnblocksIdleRelay(t *testing.T) {
	_, a := testutil.TCPPair(t)
	b, _ := testutil.TCPPair(t)
	done := make(chan Result, 1)
	go func() { done <- Bidirectional(a, b) }()
	time.Sleep(50 * time.Millisecond)
	a.Close()
	b.Close()
	select {
	case r := <-done:
		if r.Err() == nil {
			t.Fatalf("relay over closed sockets reported no error: %+v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("relay still blocked after its sockets were closed")
	}
}

// Go returns at once and reports the same result as Bidirectional, once,
// after both directions end.
func TestGo(t *testing.T) {
	client, a := testutil.TCPPair(t)
	b, server := testutil.TCPPair(t)
	done := make(chan Result, 2)
	Go(a, b, func(r Result) { done <- r })
	client.Write([]byte("ping"))
	client.CloseWrite()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(server); err != nil || string(got) != "ping" {
		t.Fatalf("server read %q, %v", got, err)
	}
	server.Write([]byte("pong!"))
	server.CloseWrite()
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(client); err != nil || string(got) != "pong!" {
		t.Fatalf("client read %q, %v", got, err)
	}
	select {
	case r := <-done:
		if r.AToB != 4 || r.BToA != 5 || r.Err() != nil {
			t.Fatalf("result %+v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("done not called")
	}
	noSecondResult(t, done)
}

// noSecondResult fails if a relay's done function is called again.
func noSecondResult(t *testing.T, done <-chan Result) {
	t.Helper()
	select {
	case r := <-done:
		t.Fatalf("done called twice (second: %+v)", r)
	case <-time.After(100 * time.Millisecond):
	}
}

// A node proxy holds one relay state per connection for its life: both
// directions' ends in it, in the 144-byte size class.
func TestStateFitsItsSizeClass(t *testing.T) {
	if n := unsafe.Sizeof(state{}); n > 144 {
		t.Errorf("relay state is %d bytes, above the 144-byte size class", n)
	}
}
