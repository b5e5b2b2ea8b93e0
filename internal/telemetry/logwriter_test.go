package telemetry

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ambitmesh/ambit/internal/testutil"
)

func TestLogWriterFlushesWithinItsDelay(t *testing.T) {
	// In a synctest bubble: the flush timer fires when due on a fake clock, however busy the machine.
	synctest.Test(t, func(t *testing.T) {
		var out testutil.Buffer
		lw := NewLogWriter(&out, 50*time.Millisecond)
		defer lw.Close()
		if _, err := lw.Write([]byte("one\n")); err != nil {
			t.Fatal(err)
		}
		if got := out.String(); got != "" {
			t.Fatalf("written through at once: %q (want it buffered)", got)
		}
		deadline := time.Now().Add(5 * time.Second)
		for out.String() != "one\n" {
			if time.Now().After(deadline) {
				t.Fatalf("not flushed after 5 s: %q", out.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
		// A second line arms the timer again.
		lw.Write([]byte("two\n"))
		for out.String() != "one\ntwo\n" {
			if time.Now().After(deadline) {
				t.Fatalf("second line not flushed: %q", out.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func TestLogWriterLosesNothingOnClose(t *testing.T) {
	var out testutil.Buffer
	lw := NewLogWriter(&out, time.Hour) // only Close (or a full buffer) writes
	const writers, lines = 8, 2000      // more than the 64 KiB buffer holds
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range lines {
				fmt.Fprintf(lw, "w%d line %d\n", w, i)
			}
		}()
	}
	wg.Wait()
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(got) != writers*lines {
		t.Fatalf("%d lines written, want %d", len(got), writers*lines)
	}
	next := make([]int, writers)
	for _, l := range got {
		var w, i int
		if _, err := fmt.Sscanf(l, "w%d line %d", &w, &i); err != nil {
			t.Fatalf("torn line %q: %v", l, err)
		}
		if i != next[w] {
			t.Fatalf("writer %d: line %d after %d", w, i, next[w]-1)
		}
		next[w]++
	}
	// After Close a write goes straight through.
	lw.Write([]byte("late\n"))
	if !strings.HasSuffix(out.String(), "late\n") {
		t.Error("a write after Close was kept in the buffer")
	}
}
