package listener

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
)

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // the directory being read
}

// Out of descriptors for real (RLIMIT_NOFILE lowered under the process):
// the accept loop does not end, sheds each connection it cannot take with
// its reserve descriptor (the peer gets the Shed answer at once), says so
// in the log with a count and in Health; once descriptors are free again
// it recovers by itself, with no connection needed to notice, and serves.
func TestGuardSurvivesDescriptorExhaustion(t *testing.T) {
	var logs testutil.Buffer
	var health Health
	raw, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	g := Guard(raw, Options{Name: "test", Log: slog.New(slog.NewTextHandler(&logs, nil)), Health: &health,
		Shed: func(c net.Conn) { c.Write([]byte("shed\n")); c.Close() }})
	defer g.Close()

	// Clients first, while descriptors are plenty: they wait in the backlog.
	const clients = 12
	var conns []net.Conn
	for range clients {
		c, err := net.Dial("tcp", g.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}

	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}
	defer restore()
	// Room for 3 accepted connections (the reserve is open already).
	low := lim
	low.Cur = uint64(openFDs(t) + 3)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}

	var accepted []net.Conn
	var mu sync.Mutex
	var loopErr atomic.Value
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		for {
			c, err := g.Accept()
			if err != nil {
				loopErr.Store(err)
				return
			}
			mu.Lock()
			accepted = append(accepted, c)
			mu.Unlock()
		}
	}()

	// Every client is either accepted or shed with the answer.
	shed := 0
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		var buf [8]byte
		n, _ := c.Read(buf[:])
		if string(buf[:n]) == "shed\n" {
			shed++
			continue
		}
		// Not shed yet (or accepted): wait longer only for the shed ones.
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		mu.Lock()
		nacc := len(accepted)
		mu.Unlock()
		if i < nacc {
			continue
		}
		n, _ = io.ReadFull(c, buf[:5])
		if string(buf[:n]) == "shed\n" {
			shed++
		}
	}
	mu.Lock()
	nacc := len(accepted)
	mu.Unlock()
	if shed == 0 || nacc+shed != clients {
		t.Fatalf("%d accepted and %d shed of %d clients, want all shed but those accepted (limit for 3)", nacc, shed, clients)
	}
	failing, why := health.Failing()
	if !failing || !strings.Contains(why, "listener test") {
		t.Errorf("Health while out of descriptors: %v %q, want failing naming the listener", failing, why)
	}
	select {
	case <-loopDone:
		t.Fatalf("Accept returned %v while out of descriptors", loopErr.Load())
	default:
	}
	if l := logs.String(); !strings.Contains(l, "accept failed") || !strings.Contains(l, "failures=") {
		t.Errorf("no accept failure logged with its count; log:\n%s", l)
	}
	if g.Failures() == 0 {
		t.Error("Failures() is 0 after failed accepts")
	}

	// Descriptors back: Health recovers with nobody connecting.
	restore()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if failing, _ := health.Failing(); !failing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Health still failing 10 s after descriptors were free again")
		}
		time.Sleep(10 * time.Millisecond)
	}
	c, err := net.Dial("tcp", g.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline = time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(accepted)
		mu.Unlock()
		if n == nacc+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a connection after recovery was not accepted")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "accepting again") {
		t.Errorf("recovery not logged; log:\n%s", logs.String())
	}
	mu.Lock()
	for _, c := range accepted {
		c.Close()
	}
	mu.Unlock()

	// Close ends Accept with net.ErrClosed.
	g.Close()
	select {
	case <-loopDone:
		if err, _ := loopErr.Load().(error); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept did not return after Close")
	}
	if failing, why := health.Failing(); failing {
		t.Errorf("a closed listener still in Health: %s", why)
	}
}

// Close ends an Accept that is backing off after failures.
func TestGuardCloseEndsTheBackOff(t *testing.T) {
	g := Guard(&failingListener{err: errors.New("accept4: no buffer space available"), addr: &net.TCPAddr{}}, Options{Name: "f"})
	done := make(chan error, 1)
	go func() { _, err := g.Accept(); done <- err }()
	time.Sleep(50 * time.Millisecond)
	g.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still backing off after Close")
	}
}

// A listener wrapped twice is guarded once.
func TestGuardTwiceIsOnce(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := Guard(l, Options{})
	defer g.Close()
	if Guard(g, Options{}) != g {
		t.Error("Guard of a Guarded made a second guard")
	}
}

type failingListener struct {
	err    error
	addr   net.Addr
	closed atomic.Bool
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.closed.Load() {
		return nil, net.ErrClosed
	}
	return nil, l.err
}
func (l *failingListener) Close() error   { l.closed.Store(true); return nil }
func (l *failingListener) Addr() net.Addr { return l.addr }
