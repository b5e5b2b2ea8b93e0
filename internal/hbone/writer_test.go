package hbone

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"testing/synctest"
	"time"
)

// The writer goroutine's linger ends while a Stream.Write holds the token
// (taken directly, not handed over): the writer must end, not wait for a
// hand-over that never comes. (It did once, and the connection's close
// then waited for it forever: BenchmarkThroughput hung on it.)
func TestWriterEndsWhileTheTokenIsHeldDirectly(t *testing.T) {
	// In a synctest bubble (net.Pipe is in memory): the linger timer fires on a fake clock, however busy the machine.
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		go io.Copy(io.Discard, b)
		c := newConn(a, false, Config{}.withDefaults(false), slog.New(slog.DiscardHandler))
		c.begin() // a writer starts for our SETTINGS, then lingers
		waitWriter := func(want bool) {
			t.Helper()
			for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(time.Millisecond) {
				c.mu.Lock()
				w, queued, writing := c.writer, len(c.wq), c.writing
				c.mu.Unlock()
				if w == want && queued == 0 && !writing {
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("writer %v (want %v), %d queued, writing %v", w, want, queued, writing)
				}
			}
		}
		waitWriter(true) // lingering
		c.mu.Lock()
		took := c.tryTakeWriter()
		c.mu.Unlock()
		if !took {
			t.Fatal("an idle connection's token could not be taken")
		}
		time.Sleep(3 * writerLinger) // the linger ends while the token is held
		c.release(nil)
		waitWriter(false)
		c.closeWithError(ErrConnClosed)
		done := make(chan struct{})
		go func() { c.wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			t.Fatal("the connection's goroutines did not end after close")
		}
	})
}
