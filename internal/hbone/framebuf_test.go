package hbone

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// A peer may send frames up to the MaxFrameSize we advertise (1 MiB, as
// ztunnel). After such a frame a connection must not keep a buffer that
// size: thousands of idle connections would each hold a megabyte. Here 32
// server connections each receive one 1 MiB DATA frame, then idle; the heap
// they keep must be far below 32 MiB.
func TestLargeFrameBufferIsNotKept(t *testing.T) {
	const n = 32
	type peer struct {
		c   *conn
		b   net.Conn
		got chan int64
	}
	peers := make([]peer, n)
	gc := func() { runtime.GC(); runtime.GC() } // twice: sync.Pool's victim cache too
	gc()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	payload := make([]byte, 1<<20)
	for i := range peers {
		a, b := net.Pipe()
		got := make(chan int64, 1)
		c := newConn(a, false, Config{}.withDefaults(true), slog.New(slog.DiscardHandler))
		c.newStream = func(_ context.Context, s *Stream) {
			s.respond(200, nil, "")
			buf := make([]byte, 64<<10)
			var total int64
			for total < int64(len(payload)) {
				m, err := s.Read(buf)
				total += int64(m)
				if err != nil {
					break
				}
			}
			got <- total // the stream stays open: the connection idles with it
		}
		c.start()
		go io.Copy(io.Discard, b)
		w := bufio.NewWriter(b)
		fr := http2.NewFramer(w, nil)
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: true})
		fr.WriteData(1, false, payload)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-got:
			if m != int64(len(payload)) {
				t.Fatalf("connection %d: the stream read %d bytes of %d", i, m, len(payload))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("connection %d: the 1 MiB frame was not delivered", i)
		}
		peers[i] = peer{c, b, got}
	}
	gc()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	kept := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d idle connections after a 1 MiB frame each keep %d KiB of heap", n, kept>>10)
	if kept > n<<18 { // a quarter of the frame per connection
		t.Errorf("%d connections keep %d KiB after one 1 MiB frame each (%d KiB each)", n, kept>>10, kept/n>>10)
	}
	for _, p := range peers {
		p.b.Close()
		<-p.c.done
		p.c.wait()
	}
}
