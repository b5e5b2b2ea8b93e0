// Package nsutil runs code inside Linux network namespaces. A namespace is
// a property of an OS thread, not of a goroutine: code that must run in one
// locks its thread, enters, and comes back. Sockets opened inside stay in
// that namespace for good and may then be used from any goroutine.
package nsutil

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs f with the calling goroutine's thread inside ns. Sockets f
// creates belong to ns for good, and may be used from any goroutine after.
// Do not start goroutines in f expecting them to be in ns: they are not.
func Do(ns netns.NsHandle, f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("nsutil: current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		return fmt.Errorf("nsutil: enter netns: %w", err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in ns; it must not serve other goroutines.
		// Leaving it locked makes the runtime end it with this goroutine.
		runtime.LockOSThread()
		return errors.Join(ferr, fmt.Errorf("nsutil: leave netns: %w", err))
	}
	return ferr
}

// NewNamed creates a named network namespace (as `ip netns add` does)
// without leaving the calling thread inside it.
func NewNamed(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return netns.None(), fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	h, err := netns.NewNamed(name) // moves this thread into the new namespace
	if serr := netns.Set(orig); serr != nil {
		runtime.LockOSThread() // a thread stuck in the new namespace must end with this goroutine
		return netns.None(), errors.Join(err, serr)
	}
	if err != nil {
		return netns.None(), fmt.Errorf("create netns %s: %w", name, err)
	}
	return h, nil
}
