// Package memtrim gives a quiet process's free heap back to the operating
// system.
//
// Go's scavenger keeps free heap pages up to the next collection's goal,
// expecting the heap to grow back into them. A node proxy that has just set
// up 10,000 connections which then stay idle may not allocate again for
// hours: at GOGC=50 that keeps ~2.5 MB of free pages resident (and charged
// to its container) for nothing. A Trimmer watches the allocation rate and,
// once the process has been quiet for an interval and holds enough free
// pages, returns them (FreeAll: two collections, which empty the
// sync.Pools too, then every free page released). A busy process is left
// to the runtime.
package memtrim

import (
	"context"
	"log/slog"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Defaults for a Trimmer's zero fields.
const (
	DefaultInterval = 5 * time.Second
	DefaultQuiet    = 1 << 20 // bytes allocated per interval
	DefaultMinFree  = 1 << 20 // free, unreleased bytes worth a trim
)

// Trimmer returns free heap pages to the OS when the process is quiet.
// The zero value is ready to use.
type Trimmer struct {
	// Interval between looks at the heap (DefaultInterval if zero).
	Interval time.Duration
	// Quiet is the most a process may allocate in an interval and still
	// count as quiet (DefaultQuiet if zero).
	Quiet uint64
	// MinFree is the least reclaimable heap (Stats.Reclaimable) worth a
	// trim (DefaultMinFree if zero): a trim costs two collections.
	MinFree uint64
	// Log, if set, gets a debug record per trim.
	Log *slog.Logger
	// Trim, if set, replaces FreeAll (tests count the calls).
	Trim func()
}

// Stats is what a Trimmer reads at each look.
type Stats struct {
	Allocated uint64 // cumulative bytes allocated on the heap
	Free      uint64 // free heap bytes still backed by memory
	Objects   uint64 // bytes of heap objects, live or not yet collected
	Live      uint64 // bytes of heap objects live at the last collection
}

// Reclaimable is what a trim would give back: the free pages, and the
// garbage made since the last collection (a burst that ended before the
// heap reached its goal leaves its garbage uncollected, possibly for hours).
func (s Stats) Reclaimable() uint64 {
	r := s.Free
	if s.Objects > s.Live {
		r += s.Objects - s.Live
	}
	return r
}

var statNames = [...]string{"/gc/heap/allocs:bytes", "/memory/classes/heap/free:bytes",
	"/memory/classes/heap/objects:bytes", "/gc/heap/live:bytes"}

// Read reads the process's Stats from runtime/metrics.
func Read() Stats {
	var s [len(statNames)]metrics.Sample
	for i, n := range statNames {
		s[i].Name = n
	}
	metrics.Read(s[:])
	var v [len(statNames)]uint64
	for i := range s {
		if s[i].Value.Kind() == metrics.KindUint64 {
			v[i] = s[i].Value.Uint64()
		}
	}
	return Stats{Allocated: v[0], Free: v[1], Objects: v[2], Live: v[3]}
}

// ShouldTrim reports whether a process that went from prev to cur in one
// interval is worth trimming.
func (t *Trimmer) ShouldTrim(prev, cur Stats) bool {
	quiet, minFree := t.Quiet, t.MinFree
	if quiet == 0 {
		quiet = DefaultQuiet
	}
	if minFree == 0 {
		minFree = DefaultMinFree
	}
	return cur.Allocated-prev.Allocated <= quiet && cur.Reclaimable() >= minFree
}

// FreeAll collects twice and returns every free page: the first collection
// moves what sync.Pools hold (a proxy's 32 KiB copy buffers, its HBONE
// write buffers) to their victim caches, the second drops them, and
// debug.FreeOSMemory releases what they and the garbage occupied.
func FreeAll() {
	runtime.GC()
	debug.FreeOSMemory()
}

// Run looks at the heap every Interval until ctx is done.
func (t *Trimmer) Run(ctx context.Context) {
	iv := t.Interval
	if iv <= 0 {
		iv = DefaultInterval
	}
	trim := t.Trim
	if trim == nil {
		trim = FreeAll
	}
	tick := time.NewTicker(iv)
	defer tick.Stop()
	prev := Read()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		cur := Read()
		if t.ShouldTrim(prev, cur) {
			start := time.Now()
			trim()
			after := Read()
			if t.Log != nil {
				t.Log.Debug("returned free heap to the OS", "reclaimable", cur.Reclaimable(), "heap.live", after.Live,
					"took", time.Since(start).Round(time.Microsecond))
			}
			cur = after // the trim's own allocations do not count against the next interval
		}
		prev = cur
	}
}
