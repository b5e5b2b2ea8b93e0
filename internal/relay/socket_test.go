package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
	"golang.org/x/sys/unix"
)

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Adopting moves the descriptor: the TCPConn is closed, the Socket carries
// the bytes both ways, and closing it leaves no descriptor behind.
func TestAdoptMovesTheDescriptor(t *testing.T) {
	p := newPoller(t)
	peer, c := testutil.TCPPair(t)
	before := openFDs(t)
	s := adopt(t, p, c)
	if got := openFDs(t); got != before {
		t.Errorf("open descriptors: %d after adopting, %d before", got, before)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the adopted TCPConn still writes: %v", err)
	}
	buf := make([]byte, 4)
	sendPing(t, s, peer)
	peer.Write([]byte("pong"))
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("socket read %q, %v", buf, err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := peer.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("after CloseWrite the peer read %d, %v; want EOF", n, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := openFDs(t); got != before-1 {
		t.Errorf("open descriptors: %d after Close, want %d", got, before-1)
	}
	if p.Sockets() != 0 {
		t.Errorf("%d sockets left in the set", p.Sockets())
	}
	if _, err := s.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// Close wakes a reader waiting for data and a writer waiting for room.
func TestSocketCloseWakesWaiters(t *testing.T) {
	p := newPoller(t)
	_, c := testutil.TCPPair(t)
	s := adopt(t, p, c)
	errs := make(chan error, 2)
	go func() {
		_, err := s.Read(make([]byte, 10))
		errs <- err
	}()
	go func() {
		// The peer reads nothing: this fills both socket buffers and waits.
		_, err := s.Write(make([]byte, 64<<20))
		errs <- err
	}()
	time.Sleep(200 * time.Millisecond)
	s.Close()
	for range 2 {
		select {
		case err := <-errs:
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("waiter woke with %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a waiter never woke after Close")
		}
	}
}

// A write larger than the socket's buffers waits for room, edge by edge,
// and every byte arrives.
func TestSocketWriteWaitsForRoom(t *testing.T) {
	p := newPoller(t)
	peer, c := testutil.TCPPair(t)
	s := adopt(t, p, c)
	msg := make([]byte, 16<<20)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	werr := make(chan error, 1)
	go func() {
		n, err := s.Write(msg)
		if err == nil && n != len(msg) {
			err = io.ErrShortWrite
		}
		s.CloseWrite()
		werr <- err
	}()
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(peer)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msg) {
		t.Fatalf("peer read %d of %d bytes", len(got), len(msg))
	}
	for i := range got {
		if got[i] != msg[i] {
			t.Fatalf("byte %d differs", i)
		}
	}
}

// An edge and the linger's timer at the same moment: whichever wait
// reports, neither is lost. (A wait that took the edge after its timer
// fired once reported only the edge; the direction then waited with a
// spent timer and never parked.)
func TestSocketWaitLosesNeitherEdgeNorTimeout(t *testing.T) {
	p := newPoller(t)
	_, c := testutil.TCPPair(t)
	s := adopt(t, p, c)
	timer := time.NewTimer(time.Hour)
	outcomes := map[bool]int{}
	for i := range 500 {
		timer.Reset(time.Duration(20+i%40) * time.Microsecond)
		sent := make(chan struct{})
		go func() {
			time.Sleep(time.Duration(20+(i*7)%40) * time.Microsecond)
			if r := s.event(unix.EPOLLIN); r != nil {
				t.Error("an event started a direction that was never parked")
			}
			close(sent)
		}()
		first := s.wait(false, timer)
		if first != nil && first != errTimeout {
			t.Fatal(first)
		}
		<-sent
		outcomes[first == errTimeout]++
		// Timed out: the edge must still be there. Woken: the timer must
		// still fire. Either way the next wait returns.
		second := make(chan error, 1)
		go func() { second <- s.wait(false, timer) }()
		select {
		case err := <-second:
			if first == errTimeout && err != nil {
				t.Fatalf("round %d: the edge that came with the timeout was lost (%v)", i, err)
			}
			if first == nil && err != nil && err != errTimeout {
				t.Fatalf("round %d: %v", i, err)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("round %d: after a %v wait the next one never returned", i, first)
		}
		timer.Stop()
		s.mu.Lock()
		s.rready = false
		s.mu.Unlock()
	}
	t.Logf("timeouts first: %d, edges first: %d", outcomes[true], outcomes[false])
}

// WriteNow takes what fits and never waits: a full socket is (0, nil), so
// the HBONE stream's reader can queue the rest and read on; a closed one
// is an error.
func TestSocketWriteNowNeverWaits(t *testing.T) {
	p := newPoller(t)
	peer, c := testutil.TCPPair(t)
	s := adopt(t, p, c)
	chunk := make([]byte, 64<<10)
	total, full := 0, false
	// A WriteNow that waited would hang here: the peer reads nothing yet.
	for i := 0; i < 4096 && !full; i++ { // 256 MiB at most: far above any socket buffer
		n, err := s.WriteNow(chunk)
		if err != nil {
			t.Fatalf("WriteNow after %d bytes: %v", total, err)
		}
		total += n
		full = n == 0
	}
	if !full {
		t.Fatalf("WriteNow never found the socket full after %d bytes", total)
	}
	// The peer reads what was taken, byte for byte in count.
	go func() { io.Copy(io.Discard, io.LimitReader(peer, int64(total))); peer.Close() }()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteNow([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("WriteNow on a closed Socket: %v, want net.ErrClosed", err)
	}
}

// sendPing writes "ping" on s and checks that peer reads it.
func sendPing(t *testing.T, s *Socket, peer net.Conn) {
	t.Helper()
	if _, err := s.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
}

// tcpSocket makes a non-blocking IPv4 TCP socket, as nsutil.BoundTCP does.
func tcpSocket(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func loopbackSockaddr(t *testing.T, addr net.Addr) unix.Sockaddr {
	t.Helper()
	ap := addr.(*net.TCPAddr).AddrPort()
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
}

// Connect waits for the handshake in the poller's set and hands back a
// Socket that carries bytes; a refused connect is an error that leaves no
// descriptor behind, and a handshake that never ends stops at the deadline.
func TestPollerConnect(t *testing.T) {
	p := newPoller(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, err := p.Connect(ctxFor(t, 5*time.Second), tcpSocket(t), loopbackSockaddr(t, l.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	if got, want := s.LocalAddr().String(), peer.RemoteAddr().String(); got != want {
		t.Errorf("LocalAddr %s, the peer sees %s", got, want)
	}
	sendPing(t, s, peer)
	s.Close()

	// Refused: a port nobody listens on.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := closed.Addr()
	closed.Close()
	before := openFDs(t)
	if _, err := p.Connect(ctxFor(t, 5*time.Second), tcpSocket(t), loopbackSockaddr(t, addr)); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("connect to a closed port: %v, want ECONNREFUSED", err)
	}
	if got := openFDs(t); got != before {
		t.Errorf("open descriptors %d after a refused connect, %d before", got, before)
	}

	// A listener that never accepts and whose backlog is full drops SYNs:
	// the handshake never ends, and the deadline ends the wait.
	full, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()
	rc, _ := full.(*net.TCPListener).SyscallConn()
	rc.Control(func(fd uintptr) { unix.Listen(int(fd), 0) })
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < 8; i++ { // fill the backlog
		c, err := net.DialTimeout("tcp", full.Addr().String(), 200*time.Millisecond)
		if err != nil {
			break
		}
		held = append(held, c)
	}
	start := time.Now()
	if _, err := p.Connect(ctxFor(t, 300*time.Millisecond), tcpSocket(t), loopbackSockaddr(t, full.Addr())); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("connect to a full backlog: %v, want the deadline", err)
	} else if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the deadline of 300 ms ended the connect after %v", d)
	}

	// Cancelled while the handshake hangs (its stream was reset): the
	// wait ends with the cancellation, long before the deadline, and
	// leaves no descriptor behind.
	before = openFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	errc := make(chan error, 1)
	go func() {
		_, err := p.Connect(ctx, tcpSocket(t), loopbackSockaddr(t, full.Addr()))
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond) // most likely waiting by now; either way it must end cancelled
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled connect: %v, want context.Canceled", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a cancelled connect did not end")
	}
	if got := openFDs(t); got != before {
		t.Errorf("open descriptors %d after a cancelled connect, %d before", got, before)
	}
	if _, err := p.Connect(ctx, tcpSocket(t), loopbackSockaddr(t, l.Addr())); !errors.Is(err, context.Canceled) {
		t.Errorf("connect with a context already cancelled: %v, want context.Canceled", err)
	}
}

// ctxFor is a context with a timeout, cancelled when the test ends.
func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
