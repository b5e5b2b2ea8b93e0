// Package listener keeps accept loops alive. A Guarded listener's Accept
// returns only a connection or, once the listener is closed, an error:
// out of descriptors (EMFILE, ENFILE), buffers (ENOBUFS, ENOMEM) or any
// other failure of accept(2), it backs off and tries again, logging with a
// count, and sheds the connection it cannot serve with a descriptor kept
// in reserve (as nginx and libev do), so the peer is told at once instead
// of waiting in the backlog. Health says which listeners cannot accept,
// for readiness.
//
// Before it, the proxy's accept loops returned on the first error that
// was not a timeout: one burst of 1,200 connections against a descriptor
// limit of 1,024 ended 15008 and 15080 for good, while readiness said 200.
package listener

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/backoff"
)

// Back-off between failed accepts, doubling from min to max as
// net/http's server does; while failing, the listener also checks every
// recheck whether descriptors are free again, so that readiness recovers
// even when no connection arrives.
const (
	minBackoff = 5 * time.Millisecond
	maxBackoff = time.Second
	recheck    = 250 * time.Millisecond
	// logEvery bounds the log lines of one failing listener.
	logEvery = 5 * time.Second
)

// Options configure a Guarded listener.
type Options struct {
	Name   string       // for logs and readiness, e.g. "hbone"
	Log    *slog.Logger // nil: discard
	Health *Health      // may be nil
	// Shed handles a connection accepted with the reserve descriptor while
	// the process is out of them; it must be quick and close c. nil: reset
	// it (SO_LINGER 0). Readiness uses it to answer 503 instead.
	Shed func(c net.Conn)
}

// Guarded is a net.Listener that survives accept failures.
type Guarded struct {
	net.Listener
	opts Options
	log  *slog.Logger

	closed  chan struct{}
	closeMu sync.Once
	own     sync.Mutex // the reserve lock when there is no Health to share one

	mu       sync.Mutex // held by Accept: one accepter at a time
	reserve  *os.File   // a spare descriptor, given up to shed a connection
	failing  bool
	failures uint64 // in the current run of failures
	shed     uint64 // connections shed in it
	since    time.Time
	lastLog  time.Time

	total atomic.Uint64 // failures over the listener's life
}

// Guard wraps l. A listener already guarded is returned as it is.
func Guard(l net.Listener, opts Options) *Guarded {
	if g, ok := l.(*Guarded); ok {
		return g
	}
	g := &Guarded{Listener: l, opts: opts, log: opts.Log, closed: make(chan struct{})}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	if g.opts.Name == "" {
		g.opts.Name = l.Addr().String()
	}
	g.reserve, _ = openReserve()
	if opts.Health != nil {
		opts.Health.add(g)
	}
	return g
}

// Close closes the listener; a pending Accept returns net.ErrClosed.
func (g *Guarded) Close() error {
	var err error
	g.closeMu.Do(func() {
		close(g.closed)
		err = g.Listener.Close()
		if g.opts.Health != nil {
			g.opts.Health.remove(g)
		}
		// The reserve goes once no shed holds it (setReserve closes any
		// taken back later).
		go func() {
			lock := g.reserveLock()
			lock.Lock()
			defer lock.Unlock()
			g.setReserve(nil)
		}()
	})
	return err
}

// Failures counts the accept failures over the listener's life.
func (g *Guarded) Failures() uint64 { return g.total.Load() }

// state says whether the listener cannot accept now, and why.
func (g *Guarded) state() (bool, string) {
	g.mu.Lock() // not held while Accept waits: see Accept
	defer g.mu.Unlock()
	return g.failing, fmt.Sprintf("listener %s (%s) cannot accept: %d failures since %s, %d connections shed",
		g.opts.Name, g.Addr(), g.failures, g.since.Format(time.RFC3339), g.shed)
}

type deadliner interface{ SetDeadline(time.Time) error }

// Accept waits for a connection. It returns an error only once the
// listener is closed.
//
// While failing, each attempt is one non-blocking accept made under the
// process's reserve lock (Health's): out of descriptors, every one freed
// is taken by whichever accept runs first, and a listener whose attempt
// fell between another's giving up its reserve and taking it back would
// take it; the other, readiness say, would have none left to answer with.
func (g *Guarded) Accept() (net.Conn, error) {
	retry := backoff.Backoff{Min: minBackoff, Max: maxBackoff}
	dl, canTime := g.Listener.(deadliner)
	for {
		g.mu.Lock()
		failing := g.failing
		g.mu.Unlock()
		var c net.Conn
		var err error
		if failing && canTime {
			lock := g.reserveLock()
			lock.Lock()
			_ = dl.SetDeadline(time.Now().Add(time.Millisecond))
			c, err = g.Listener.Accept()
			var ne net.Error
			if err != nil && errors.As(err, &ne) && ne.Timeout() {
				free := g.descriptorsFree()
				lock.Unlock()
				if free {
					g.recovered()
					continue
				}
				if g.sleep(recheck) {
					return nil, net.ErrClosed
				}
				continue
			}
			lock.Unlock()
		} else {
			if canTime {
				_ = dl.SetDeadline(time.Time{})
			}
			c, err = g.Listener.Accept()
		}
		if err == nil {
			g.recovered()
			return c, nil
		}
		select {
		case <-g.closed:
			return nil, net.ErrClosed
		default:
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err // closed under us, not through Close
		}
		g.failed(err)
		if exhausted(err) && g.shedOne() {
			// A connection was taken off the backlog: progress, not a
			// spin. The next one (a readiness probe, say) is answered
			// within the shortest back-off, not after a second.
			retry.Reset()
		}
		if g.sleep(retry.Next()) {
			return nil, net.ErrClosed
		}
	}
}

// sleep waits d; true if the listener was closed meanwhile.
func (g *Guarded) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-g.closed:
		return true
	case <-t.C:
		return false
	}
}

// reserveLock is the lock every use of a reserve descriptor holds: the
// Health's, shared by the process's listeners, or the listener's own.
func (g *Guarded) reserveLock() *sync.Mutex {
	if g.opts.Health != nil {
		return &g.opts.Health.reserveMu
	}
	return &g.own
}

// failed records and, at most every logEvery, logs a failure.
func (g *Guarded) failed(err error) {
	g.total.Add(1)
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	if !g.failing {
		g.failing, g.failures, g.shed, g.since = true, 0, 0, now
		g.lastLog = time.Time{}
	}
	g.failures++
	if now.Sub(g.lastLog) >= logEvery {
		g.lastLog = now
		msg := "accept failed; retrying with back-off"
		if g.opts.Health != nil {
			msg += ", readiness is false meanwhile"
		}
		g.log.Error(msg,
			"listener", g.opts.Name, "addr", g.Addr().String(), "err", err,
			"failures", g.failures, "shed", g.shed, "since", g.since.Format(time.RFC3339Nano), "failures_total", g.total.Load())
	}
}

// recovered ends a run of failures.
func (g *Guarded) recovered() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.failing {
		return
	}
	g.failing = false
	if g.reserve == nil {
		r, _ := openReserve()
		g.setReserveLocked(r)
	}
	g.log.Warn("accepting again", "listener", g.opts.Name, "addr", g.Addr().String(),
		"failures", g.failures, "shed", g.shed, "after", time.Since(g.since).Round(time.Millisecond).String())
}

// shedOne gives up the reserve descriptor, takes the connection waiting
// in the backlog with it and closes it, then takes the reserve back. The
// wait for it is short: the accept that failed means one is there. It
// reports whether a connection was shed.
func (g *Guarded) shedOne() bool {
	lock := g.reserveLock()
	lock.Lock()
	defer lock.Unlock()
	g.mu.Lock()
	r := g.reserve
	g.reserve = nil
	g.mu.Unlock()
	if r == nil {
		if r, _ = openReserve(); r == nil {
			return false // none free, and none kept: nothing to shed with
		}
	}
	r.Close()
	if dl, ok := g.Listener.(deadliner); ok {
		_ = dl.SetDeadline(time.Now().Add(50 * time.Millisecond))
	}
	c, err := g.Listener.Accept()
	if err == nil {
		g.mu.Lock()
		g.shed++
		g.mu.Unlock()
		if g.opts.Shed != nil {
			g.opts.Shed(c)
		} else {
			reset(c)
		}
	}
	nr, _ := openReserve()
	g.mu.Lock()
	g.setReserveLocked(nr)
	g.mu.Unlock()
	return err == nil
}

// setReserve replaces the reserve descriptor; once the listener is
// closed, any new one is closed at once.
func (g *Guarded) setReserve(r *os.File) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.setReserveLocked(r)
}

func (g *Guarded) setReserveLocked(r *os.File) {
	if g.reserve != nil && g.reserve != r {
		g.reserve.Close()
	}
	g.reserve = r
	select {
	case <-g.closed:
		if g.reserve != nil {
			g.reserve.Close()
			g.reserve = nil
		}
	default:
	}
}

// descriptorsFree reports whether a descriptor beyond the reserve can be
// had, taking the reserve back first if it was given up. The reserve lock
// must be held.
func (g *Guarded) descriptorsFree() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.reserve == nil {
		r, _ := openReserve()
		g.setReserveLocked(r)
		if g.reserve == nil {
			return false
		}
	}
	probe, err := openReserve()
	if err != nil {
		return false
	}
	probe.Close()
	return true
}

func openReserve() (*os.File, error) { return os.Open(os.DevNull) }

// exhausted reports an accept that failed for want of descriptors.
func exhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// reset closes c with a TCP reset: the peer learns at once.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}

// Health collects the guarded listeners of a process, for readiness.
type Health struct {
	mu        sync.Mutex
	ls        map[*Guarded]struct{}
	reserveMu sync.Mutex // see Guarded.Accept
}

func (h *Health) add(g *Guarded) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ls == nil {
		h.ls = map[*Guarded]struct{}{}
	}
	h.ls[g] = struct{}{}
}

func (h *Health) remove(g *Guarded) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.ls, g)
}

// Failing says whether any listener cannot accept now, and which.
func (h *Health) Failing() (bool, string) {
	h.mu.Lock()
	ls := make([]*Guarded, 0, len(h.ls))
	for g := range h.ls {
		ls = append(ls, g)
	}
	h.mu.Unlock()
	var why []string
	for _, g := range ls {
		if failing, reason := g.state(); failing {
			why = append(why, reason)
		}
	}
	sort.Strings(why)
	return len(why) > 0, strings.Join(why, "; ")
}
