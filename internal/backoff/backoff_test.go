package backoff

import (
	"testing"
	"time"
)

func TestDoublesToMaxAndResets(t *testing.T) {
	b := Backoff{Min: 500 * time.Millisecond, Max: 150 * time.Second}
	want := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		16 * time.Second, 32 * time.Second, 64 * time.Second, 128 * time.Second, 150 * time.Second, 150 * time.Second}
	for i, w := range want {
		if got := b.Next(); got != w {
			t.Fatalf("delay %d: %v, want %v", i, got, w)
		}
	}
	b.Reset()
	if got := b.Next(); got != 500*time.Millisecond {
		t.Fatalf("after Reset: %v, want Min", got)
	}
	if got := b.Next(); got != time.Second {
		t.Fatalf("second after Reset: %v, want 2*Min", got)
	}
}

// Min over Max: Min once, then Max (what min(2*d, max) after a first Min gave).
func TestMinOverMax(t *testing.T) {
	b := Backoff{Min: 10 * time.Second, Max: time.Second}
	for i, w := range []time.Duration{10 * time.Second, time.Second, time.Second} {
		if got := b.Next(); got != w {
			t.Fatalf("delay %d: %v, want %v", i, got, w)
		}
	}
}

func TestZero(t *testing.T) {
	var b Backoff
	for range 3 {
		if got := b.Next(); got != 0 {
			t.Fatalf("zero Backoff: %v", got)
		}
	}
}

func TestNoAllocations(t *testing.T) {
	b := Backoff{Min: 5 * time.Millisecond, Max: time.Second}
	if n := testing.AllocsPerRun(100, func() { b.Next(); b.Reset() }); n != 0 {
		t.Fatalf("%v allocations per Next and Reset", n)
	}
}
