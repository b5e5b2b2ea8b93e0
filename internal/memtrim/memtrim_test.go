package memtrim

import (
	"context"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestShouldTrim(t *testing.T) {
	tr := &Trimmer{Quiet: 100, MinFree: 1000}
	for _, c := range []struct {
		name      string
		prev, cur Stats
		want      bool
	}{
		{"quiet with free pages", Stats{Allocated: 500}, Stats{Allocated: 600, Free: 1000}, true},
		{"quiet, nothing free", Stats{Allocated: 500}, Stats{Allocated: 500, Free: 999}, false},
		{"quiet, garbage not collected", Stats{Allocated: 500}, Stats{Allocated: 500, Free: 10, Objects: 5000, Live: 4010}, true},
		{"quiet, little garbage", Stats{Allocated: 500}, Stats{Allocated: 500, Free: 10, Objects: 5000, Live: 4100}, false},
		{"busy", Stats{Allocated: 500}, Stats{Allocated: 601, Free: 1 << 30}, false},
	} {
		if got := tr.ShouldTrim(c.prev, c.cur); got != c.want {
			t.Errorf("%s: ShouldTrim(%+v, %+v) = %v, want %v", c.name, c.prev, c.cur, got, c.want)
		}
	}
	var zero Trimmer // the defaults: 1 MiB each
	if !zero.ShouldTrim(Stats{}, Stats{Allocated: DefaultQuiet, Free: DefaultMinFree}) {
		t.Errorf("defaults: a process that allocated %d bytes with %d free was not trimmed", DefaultQuiet, DefaultMinFree)
	}
	if zero.ShouldTrim(Stats{}, Stats{Allocated: DefaultQuiet + 1, Free: 1 << 30}) {
		t.Errorf("defaults: a process that allocated %d bytes in an interval was trimmed", DefaultQuiet+1)
	}
}

var sink [][]byte

// A quiet process holding free heap pages gets them returned: the runtime's
// own scavenger keeps them (up to the next collection's goal).
func TestTrimReturnsFreeHeap(t *testing.T) {
	for i := 0; i < 256; i++ {
		sink = append(sink, make([]byte, 64<<10)) // 16 MiB
	}
	sink = nil
	runtime.GC()
	before := Read()
	const minFree = 256 << 10
	if before.Free < minFree {
		t.Fatalf("after freeing 16 MiB the heap holds only %d free bytes: nothing for the test to trim", before.Free)
	}
	var trims atomic.Int32
	tr := &Trimmer{Interval: 20 * time.Millisecond, MinFree: minFree, Trim: func() { debug.FreeOSMemory(); trims.Add(1) }}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { tr.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()
	deadline := time.Now().Add(5 * time.Second)
	for trims.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if trims.Load() == 0 {
		t.Fatalf("no trim in 5 s with %d free bytes", before.Free)
	}
	// Not zero: what the test process frees between the trim and this read
	// (the race detector's own allocations, the testing package) is free again.
	if after := Read(); after.Free > before.Free/4 {
		t.Errorf("after a trim the heap still holds %d free bytes (before: %d)", after.Free, before.Free)
	} else {
		t.Logf("free heap %d -> %d bytes", before.Free, after.Free)
	}
}

// A process that allocates faster than Quiet per interval is left alone,
// however much free heap it holds.
func TestBusyProcessIsNotTrimmed(t *testing.T) {
	var trims atomic.Int32
	tr := &Trimmer{Interval: 20 * time.Millisecond, Quiet: 64 << 10, MinFree: 1, Trim: func() { trims.Add(1) }}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { tr.Run(ctx) })
	stop := time.Now().Add(300 * time.Millisecond)
	var allocated int
	for time.Now().Before(stop) {
		for i := 0; i < 64; i++ {
			b := make([]byte, 16<<10) // 1 MiB per round, far above Quiet per interval
			sink = append(sink[:0], b)
			allocated += len(b)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	wg.Wait()
	sink = nil
	if n := trims.Load(); n != 0 {
		t.Errorf("a process allocating %d MB in 300 ms was trimmed %d times", allocated>>20, n)
	}
}

// FreeAll drops what sync.Pools hold: a quiet proxy's pooled copy buffers
// are as useless as its garbage. (One collection only moves them to the
// pools' victim caches; no control here: under -race, sync.Pool drops a
// quarter of what it is given at random.)
func TestFreeAllEmptiesPools(t *testing.T) {
	var p sync.Pool
	buf := make([]byte, 32<<10)
	p.Put(&buf)
	FreeAll()
	if b := p.Get(); b != nil {
		t.Errorf("a pooled %d-byte buffer survived FreeAll", len(*b.(*[]byte)))
	}
}
