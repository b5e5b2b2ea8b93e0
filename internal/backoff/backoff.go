// Package backoff is the retry delay Ambit's reconnect and retry loops
// share: Min, doubling on each failure up to Max, back to Min on Reset. No
// jitter: none of the loops had it.
package backoff

import "time"

// Backoff is one loop's delay. Use it by value (no allocation); the zero
// value waits 0 forever.
type Backoff struct {
	Min, Max time.Duration
	next     time.Duration // 0: not started, or reset
}

// Next returns the delay to wait now and doubles the one after, up to Max.
// The first delay is Min even when Min is over Max, as the loops had it.
func (b *Backoff) Next() time.Duration {
	if b.next == 0 {
		b.next = b.Min
	}
	d := b.next
	b.next = min(2*d, b.Max)
	return d
}

// Reset makes the next delay Min again (after a success, or progress).
func (b *Backoff) Reset() { b.next = 0 }
