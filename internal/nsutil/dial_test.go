package nsutil_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestDialTCPFromANamespace: the socket lives in the namespace (it reaches
// an address that exists only there, from a source bound there) while the
// calling thread never stays in it.
func TestDialTCPFromANamespace(t *testing.T) {
	ns, _ := testutil.Netns(t)
	ln := listenIn(t, ns)
	seen := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			seen <- err.Error()
			return
		}
		seen <- c.RemoteAddr().String()
		c.Write([]byte("hi"))
		c.Close()
	}()
	to := netip.MustParseAddrPort(ln.Addr().String())
	from := netip.MustParseAddrPort("127.0.0.9:0")
	set := 0
	c, err := nsutil.DialTCP(context.Background(), ns, from, to, func(fd int) error { set = fd; return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if set == 0 {
		t.Error("setup was not called with the socket")
	}
	// Bound with port 0: the port is left to connect (a bind searching the
	// ephemeral range took ~50 ms with thousands of sockets on one address).
	rc, _ := c.SyscallConn()
	noPort := -1
	rc.Control(func(fd uintptr) { noPort, _ = unix.GetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT) })
	if noPort != 1 {
		t.Errorf("IP_BIND_ADDRESS_NO_PORT is %d on a socket bound to port 0, want 1", noPort)
	}
	b := make([]byte, 2)
	if _, err := c.Read(b); err != nil || string(b) != "hi" {
		t.Fatalf("read %q, %v", b, err)
	}
	if got := <-seen; !strings.HasPrefix(got, "127.0.0.9:") {
		t.Errorf("the listener saw %s, want the bound source 127.0.0.9", got)
	}
	if got := c.RemoteAddr().String(); got != to.String() {
		t.Errorf("RemoteAddr %s, want %s", got, to)
	}
	if la, _ := netip.ParseAddrPort(c.LocalAddr().String()); la.Addr() != from.Addr() || la.Port() == 0 {
		t.Errorf("LocalAddr %s, want 127.0.0.9 and a port", c.LocalAddr())
	}
	// A port nobody listens on in the namespace: refused, named like net's.
	_, err = nsutil.DialTCP(context.Background(), ns, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:1"), nil)
	if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "dial tcp 127.0.0.1:1") {
		t.Errorf("refused dial: %v", err)
	}
	// A source of the other family is refused, not a panic.
	_, err = nsutil.DialTCP(context.Background(), ns, netip.MustParseAddrPort("[::1]:0"), to, nil)
	if err == nil || !strings.Contains(err.Error(), "address family") {
		t.Errorf("IPv6 source to an IPv4 destination: %v", err)
	}
	// setup's error stops the dial.
	_, err = nsutil.DialTCP(context.Background(), ns, netip.AddrPort{}, to, func(int) error { return errors.New("no mark") })
	if err == nil || !strings.Contains(err.Error(), "no mark") {
		t.Errorf("setup error: %v", err)
	}
}

// TestDialTCPHoldsNoThreadWhileConnecting: connects in flight wait in the
// runtime's poller, not on threads locked into the namespace. 64 connects
// to an address that never answers must
// not add a thread each, and must end when their context does.
func TestDialTCPHoldsNoThreadWhileConnecting(t *testing.T) {
	ns, _ := testutil.Netns(t)
	// 10.253.0.2 is on the veth's subnet, but nobody has it: its ARP goes
	// unanswered, so SYNs never leave and a connect waits (~3 s, until
	// the kernel gives up on the neighbour).
	peer, _ := testutil.Netns(t)
	testutil.Veth(t, ns, peer, "10.253.0.1/24", "10.253.0.3/24")
	before := threads(t)
	const n = 64
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := nsutil.DialTCP(ctx, ns, netip.AddrPort{}, netip.MustParseAddrPort("10.253.0.2:80"), nil)
			errs <- err
		}()
	}
	time.Sleep(500 * time.Millisecond) // all connects in flight
	during := threads(t)
	wg.Wait()
	close(errs)
	for err := range errs {
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a connect to a black hole ended with %v, want the context's deadline", err)
		}
	}
	if during-before > 8 {
		t.Errorf("%d connects in flight took %d more threads (%d -> %d); they should wait in the poller", n, during-before, before, during)
	}
}

func threads(t *testing.T) int { return procStatus(t, "Threads") }

// procStatus reads a number from /proc/self/status.
func procStatus(t *testing.T, key string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	t.Fatalf("no %s line in /proc/self/status", key)
	return 0
}

// GrowFDTable grows the kernel's table (FDSize) to the size asked and
// leaves no descriptor open.
func TestGrowFDTable(t *testing.T) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	want := 4096
	if uint64(want) > lim.Cur {
		t.Fatalf("the descriptor limit here is %d: too low for the test (and for a node proxy)", lim.Cur)
	}
	ents := func() int {
		e, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(e)
	}
	before, open := procStatus(t, "FDSize"), ents()
	if before >= want {
		want = before * 4 // the test process grew it already: ask for more
		if uint64(want) > lim.Cur {
			t.Fatalf("the table holds %d already, and the limit (%d) leaves no room to grow it", before, lim.Cur)
		}
	}
	got, err := nsutil.GrowFDTable(want)
	if err != nil || got != want {
		t.Fatalf("GrowFDTable(%d) = %d, %v", want, got, err)
	}
	if size := procStatus(t, "FDSize"); size < want {
		t.Errorf("FDSize %d after growing to %d (was %d)", size, want, before)
	}
	if n := ents(); n != open {
		t.Errorf("open descriptors %d, %d before", n, open)
	}
}

// listenIn listens on 127.0.0.1 inside ns (its loopback, not the host's)
// until the test ends.
func listenIn(tb testing.TB, ns netns.NsHandle) net.Listener {
	tb.Helper()
	var ln net.Listener
	if err := nsutil.Do(ns, func() (err error) { ln, err = net.Listen("tcp", "127.0.0.1:0"); return }); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// BenchmarkDialTCP: one connect from a namespace to a listener in it, the
// namespace switch (socket made inside) included.
func BenchmarkDialTCP(b *testing.B) {
	ns, _ := testutil.Netns(b)
	ln := listenIn(b, ns)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	to := netip.MustParseAddrPort(ln.Addr().String())
	for b.Loop() {
		c, err := nsutil.DialTCP(context.Background(), ns, netip.AddrPort{}, to, nil)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkDo: entering a namespace and coming back.
func BenchmarkDo(b *testing.B) {
	ns, _ := testutil.Netns(b)
	for b.Loop() {
		if err := nsutil.Do(ns, func() error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}
