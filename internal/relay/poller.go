package relay

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Poller lets sockets wait for data with no goroutine at all: each
// adopted Socket sits in one epoll set of the Poller's, which one
// goroutine watches through the runtime's own poller (an epoll descriptor
// is itself pollable). A relay direction that reads from a Socket starts a
// goroutine when the socket turns readable and copies; once it finds the
// socket empty it waits for more for up to linger, then parks on the socket
// (no goroutine) and ends.
//
// A goroutine parked on a socket costs its stack (2–8 KB); a parked
// direction costs a few words. For a node proxy holding 10,000 idle
// connections that is most of its memory.
//
// The price is a goroutine start each time a direction comes back from
// parking (after a quiet spell of a linger or more, never on a busy
// connection; see docs/idle-connections.md), and, for any wait, one hop
// through the poller's goroutine.
//
// Every socket is in the set under an id, never by its descriptor number
// alone (a closed number is reused by the next socket), and every
// epoll_ctl holds a reference to the socket's descriptor.
type Poller struct {
	ep   *os.File
	epfd int // ep's descriptor (ep.Fd would make it blocking); used under mu while !closed
	rc   syscall.RawConn
	done chan struct{}

	mu      sync.Mutex
	closed  bool
	next    uint64
	sockets map[uint64]*Socket

	waiting atomic.Int64 // relay directions parked now
	parks   atomic.Int64 // relay directions parked so far (tests)
}

// NewPoller starts a poller; Close ends it.
func NewPoller() (*Poller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("relay: epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("relay: epoll set non-blocking: %w", err)
	}
	// Non-blocking, so os.NewFile registers it with the runtime's poller.
	ep := os.NewFile(uintptr(fd), "relay-epoll")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("relay: epoll: %w", err)
	}
	p := &Poller{ep: ep, epfd: fd, rc: rc, done: make(chan struct{}), sockets: map[uint64]*Socket{}}
	go p.loop()
	return p, nil
}

// Close stops the poller and closes every socket it adopted: directions
// parked on them end with net.ErrClosed (their relays' done functions run
// before Close returns), and those copying or waiting end at once with
// the same error.
func (p *Poller) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	sockets := p.sockets
	p.sockets = nil
	p.mu.Unlock()
	err := p.ep.Close() // wakes the loop
	<-p.done
	for _, s := range sockets {
		s.Close()
	}
	return err
}

// Waiting reports how many relay directions are parked, holding no
// goroutine (for tests and metrics).
func (p *Poller) Waiting() int { return int(p.waiting.Load()) }

// Sockets reports how many adopted sockets are open.
func (p *Poller) Sockets() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sockets)
}

func (p *Poller) loop() {
	defer close(p.done)
	events := make([]unix.EpollEvent, 128)
	var n int
	var werr error
	wait := func(fd uintptr) bool {
		for {
			n, werr = unix.EpollWait(int(fd), events, 0)
			if werr != unix.EINTR {
				break
			}
		}
		return werr != nil || n > 0 // nothing: park until the set has news
	}
	type news struct {
		s      *Socket
		events uint32
	}
	var ready []news
	for {
		if err := p.rc.Read(wait); err != nil || werr != nil {
			return // Close (epoll_wait on a live set fails only if it is gone)
		}
		ready = ready[:0]
		p.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if s, ok := p.sockets[id]; ok {
				ready = append(ready, news{s, ev.Events})
			}
		}
		p.mu.Unlock()
		for _, nw := range ready {
			if r := nw.s.event(nw.events); r != nil {
				go r.run()
			}
		}
		clear(ready)
	}
}

// idleRead is one relay direction from a Socket: a goroutine while there
// is data, parked on the socket while there is none.
type idleRead struct {
	rl  *state
	dst Conn
	src *Socket
	dir int // which of rl's results is this direction's (Result.of)
}

// start parks the direction, or runs it if the socket has news already.
func (r *idleRead) start() {
	parked, err := r.src.park(r)
	switch {
	case err != nil:
		r.finish(err)
	case !parked:
		go r.run()
	}
}

// linger is how long a direction that has found its socket empty waits
// for more (holding its goroutine, not a buffer) before it parks. The
// timer is set once per linger, not per read; when it fires, a direction
// that read anything meanwhile lingers again, so only a socket quiet for a
// whole linger parks, and a busy connection pays one timer per linger
// instead of a new goroutine per message.
const linger = 100 * time.Millisecond

// run copies; from the first time it finds the socket empty it waits for
// up to linger, then parks. It is the only goroutine of the direction, and
// ends either way.
func (r *idleRead) run() {
	s := r.src
	var t *time.Timer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	lingering := false
	busy := false // bytes came during this linger
	for {
		bp, m, err := s.readPooled()
		switch {
		case err == unix.EAGAIN:
			if !lingering {
				if t == nil {
					t = time.NewTimer(linger)
				} else {
					t.Reset(linger)
				}
				lingering, busy = true, false
			}
			switch werr := s.wait(false, t); {
			case werr == nil:
				continue
			case werr != errTimeout:
				r.finish(werr)
				return
			case busy:
				// Traffic during the linger: another one, rather than
				// a goroutine per message on a busy socket.
				t.Reset(linger)
				busy = false
				continue
			}
			lingering = false
			parked, perr := s.park(r)
			switch {
			case perr != nil:
				r.finish(perr)
				return
			case parked:
				return
			}
			continue // news came as it parked
		case err != nil:
			r.finish(err)
			return
		case m == 0:
			r.finish(nil) // EOF
			return
		}
		busy = true
		w, werr := writePooled(r.dst, bp, m)
		n, _ := r.rl.r.of(r.dir)
		*n += int64(w)
		if werr != nil {
			r.finish(werr)
			return
		}
	}
}

// finish half-closes the destination and reports the direction's end, once:
// whoever took the direction off its socket (or never parked it) calls it.
func (r *idleRead) finish(err error) {
	if errors.Is(err, io.EOF) {
		err = nil
	}
	_, e := r.rl.r.of(r.dir)
	*e = closeWrite(r.dst, err)
	r.rl.finish()
}
