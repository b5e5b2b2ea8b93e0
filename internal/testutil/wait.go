package testutil

import (
	"runtime"
	"testing"
	"time"
)

// WaitFor polls cond every 5 ms until it holds, failing the test after 20 s
// (generous: CI shares two cores with everything) with every goroutine's
// stack in the log.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
