package bench

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// /proc is read right: this process's own CPU time grows with work, and
// its RSS and threads are there.
func TestSampleProc(t *testing.T) {
	a, err := sampleProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if a.rssKB <= 0 || a.peakKB < a.rssKB || a.threads < 1 {
		t.Fatalf("sample %+v: want RSS > 0, peak >= RSS, threads >= 1", a)
	}
	// CPU work measured by the kernel's own account (getrusage), not by
	// the wall clock: on a loaded machine a busy loop gets what it gets.
	// /proc's CPU time must have grown by at least as much.
	used := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	before := used()
	x := 0
	for deadline := time.Now().Add(time.Minute); used()-before < 200*time.Millisecond; x++ {
		if time.Now().After(deadline) {
			t.Fatalf("200 ms of CPU not had in a minute (x=%d)", x)
		}
	}
	spent := used() - before
	b, err := sampleProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// /proc counts in clock ticks (10 ms): allow two of them.
	if d := b.cpu - a.cpu; d < spent-20*time.Millisecond {
		t.Fatalf("/proc shows %v of CPU for %v spent (getrusage)", d, spent)
	}
	if r := cpuRate(a, b); r <= 0 || r > 2.5 {
		t.Fatalf("cpuRate %.2f vCPU for one busy goroutine: want above 0, at most the 2 cores plus slack", r)
	}
	if _, err := sampleProc(1 << 30); err == nil {
		t.Fatal("no error for a process that does not exist")
	}
}

// Hold opens and proves every connection, keeps them until ctx ends, and
// counts failures by reason without addresses.
func TestHold(t *testing.T) {
	echo := testutil.Echo(t, "127.0.0.1:0", nil)
	ctx, cancel := context.WithCancel(context.Background())
	readyc := make(chan HoldResult, 1)
	done := make(chan error, 1)
	go func() {
		_, err := Hold(ctx, echo.String(), 40, 8, func(r HoldResult) { readyc <- r })
		done <- err
	}()
	r := <-readyc
	if r.Held != 40 || r.Failed != 0 {
		t.Fatalf("held %+v, want 40 and no failure", r)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Hold returned %v once told to stop, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Hold still holding after its context ended")
	}

	// A port nobody listens on: every dial fails, counted under one reason.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	l.Close()
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	go Hold(ctx2, dead, 5, 2, func(r HoldResult) { readyc <- r })
	r = <-readyc
	if r.Held != 0 || r.Failed != 5 || len(r.Errors) != 1 || r.Errors["dial: connect: connection refused"] != 5 {
		t.Fatalf("against a closed port: %+v", r)
	}
	if _, err := Hold(ctx2, dead, -1, 1, nil); err == nil {
		t.Fatal("no error for a negative count")
	}
}

// The TLS relay pair carries bytes both ways with half-close, over real
// TLS 1.3 with certificates from one CA.
func TestTLSRelayPair(t *testing.T) {
	ca := testutil.CA(t)
	echo := testutil.Echo(t, "127.0.0.1:0", nil)
	srv := runRelay(t, &TLSRelay{Connect: echo.String(), Server: true, CA: ca, Log: quiet()})
	cli := runRelay(t, &TLSRelay{Connect: srv, CA: ca, Log: quiet()})
	c, err := net.Dial("tcp", cli)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	data := bytes.Repeat([]byte("ambit "), 50000)
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("echo through the pair: %d of %d bytes, %v", len(got), len(data), err)
	}
}

func TestRunRefusesBadInput(t *testing.T) {
	if os.Geteuid() != 0 {
		if err := Run(context.Background(), Options{}); err == nil || !strings.Contains(err.Error(), "root") {
			t.Fatalf("as non-root: %v, want an error naming root", err)
		}
		return
	}
	err := Run(context.Background(), Options{Only: []string{"nonsense"}})
	if err == nil || !strings.Contains(err.Error(), `unknown scenario "nonsense"`) {
		t.Fatalf("unknown scenario: %v", err)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
