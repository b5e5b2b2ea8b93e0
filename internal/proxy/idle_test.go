package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/socks5"
	"github.com/ambitmesh/ambit/internal/testutil"
)

// goroutinesIn counts the goroutines whose stack passes through pkg (an
// import path and a dot), and returns their records.
func goroutinesIn(t *testing.T, pkg string) (int, string) {
	t.Helper()
	var b bytes.Buffer
	if err := pprof.Lookup("goroutine").WriteTo(&b, 1); err != nil {
		t.Fatal(err)
	}
	n := 0
	var stacks []string
	for _, g := range strings.Split(b.String(), "\n\n") {
		if !strings.Contains(g, pkg) {
			continue
		}
		// A record is "N @ pcs" then its frames (the first also has the
		// profile's header line before it).
		for _, line := range strings.Split(g, "\n") {
			var count int
			if _, err := fmt.Sscanf(line, "%d @", &count); err == nil {
				n += count
				break
			}
		}
		stacks = append(stacks, g)
	}
	return n, strings.Join(stacks, "\n\n")
}

// The memory design, end to end: connections through both proxies that
// carried bytes and went quiet hold no goroutine in either proxy (their
// sockets wait in each proxy's relay.Poller, their streams in the HBONE
// connection's reader), and each still works afterwards.
func TestIdleConnectionsHoldNoGoroutinePerConnection(t *testing.T) {
	m := newMesh(t, "", "")
	const n = 100
	conns := make([]*net.TCPConn, n)
	for i := range conns {
		c, code, err := m.socks(m.serverIP.String(), 8080)
		if err != nil || code != socks5.Succeeded {
			t.Fatalf("connection %d: code %d, %v", i, code, err)
		}
		defer c.Close()
		msg := fmt.Appendf(nil, "ping %d", i)
		if err := echoOnce(c, msg); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns[i] = c
	}
	// Past the relay's linger (100 ms), every direction has moved to its
	// proxy's set; what is left is the two pollers' own loops.
	var got int
	var stacks string
	deadline := time.Now().Add(5 * time.Second)
	for {
		if got, stacks = goroutinesIn(t, "ambit/internal/relay."); got <= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("got %d; all: %d\n%s", got, runtime.NumGoroutine(), stacks)
	if got > 2 {
		t.Fatalf("%d idle connections hold %d relay goroutines (want the 2 pollers):\n%s", n, got, stacks)
	}
	// The HBONE side: a reader, a writer and a pinger per pooled connection
	// (and the server's per-connection loop); a few connections carry the
	// 100 streams, so anything per stream would show as 100 or more.
	if h, stacks := goroutinesIn(t, "ambit/internal/hbone."); h >= n/4 {
		t.Fatalf("%d idle streams hold %d HBONE goroutines:\n%s", n, h, stacks)
	}
	for i, c := range conns {
		if err := echoOnce(c, fmt.Appendf(nil, "again %d", i)); err != nil {
			t.Fatalf("connection %d after idling: %v", i, err)
		}
	}
}

// echoOnce writes msg and reads the echo back, leaving the connection open.
func echoOnce(c *net.TCPConn, msg []byte) error {
	if _, err := c.Write(msg); err != nil {
		return err
	}
	back := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(c, back); err != nil {
		return err
	}
	if !bytes.Equal(back, msg) {
		return fmt.Errorf("echo %q, sent %q", back, msg)
	}
	return nil
}

// BenchmarkIdleConnectionHeap reports the live heap each idle connection
// costs, both proxies together (and the test's own sockets at both ends,
// ~1 KB: a floor, not the proxies'): each iteration opens 500 connections
// through the mesh, proves each with a round trip, lets them idle past the
// relay's linger and reads the heap after a collection.
// AMBIT_HEAP_PROFILE=file writes the heap profile of the last iteration
// with every allocation sampled, for attributing the bytes.
func BenchmarkIdleConnectionHeap(b *testing.B) {
	m := newMesh(b, "", "")
	stop := make(chan struct{})
	b.Cleanup(func() { close(stop) })
	go func() { // the echo app reports each peer; more than its buffer of 100 here
		for {
			select {
			case <-m.appPeers:
			case <-stop:
				return
			}
		}
	}()
	const n = 500
	var perConn float64
	for b.Loop() {
		if path := os.Getenv("AMBIT_HEAP_PROFILE"); path != "" {
			runtime.MemProfileRate = 1
			defer func() { runtime.MemProfileRate = 512 * 1024 }()
		}
		before := liveHeap()
		conns := make([]*net.TCPConn, n)
		for i := range conns {
			c, code, err := m.socks(m.serverIP.String(), 8080)
			if err != nil || code != socks5.Succeeded {
				b.Fatalf("connection %d: code %d, %v", i, code, err)
			}
			if err := echoOnce(c, []byte("ping")); err != nil {
				b.Fatal(err)
			}
			conns[i] = c
		}
		settle(b, m, n) // every socket direction waits in its proxy's poller
		perConn = (float64(liveHeap()) - float64(before)) / n
		if path := os.Getenv("AMBIT_HEAP_PROFILE"); path != "" {
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			pprof.Lookup("heap").WriteTo(f, 0)
			f.Close()
		}
		for _, c := range conns {
			c.Close()
		}
		settle(b, m, 0)
	}
	b.ReportMetric(perConn, "heap-B/conn")
}

// settle waits until each proxy's poller holds exactly want directions.
func settle(b *testing.B, m *mesh, want int) {
	b.Helper()
	testutil.WaitFor(b, fmt.Sprintf("%d directions waiting in each proxy", want), func() bool {
		return m.client.p.poller.Waiting() == want && m.server.p.poller.Waiting() == want
	})
}

// liveHeap collects garbage and returns the heap still in use.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
