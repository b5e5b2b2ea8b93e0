package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Poller lets a direction that reads from a socket wait for data with no
// goroutine at all: the socket sits in one epoll set of the Poller's,
// which one goroutine watches through the runtime's own poller (an epoll
// descriptor is itself pollable). When a socket turns readable, a
// goroutine starts and copies; once it finds the socket empty it waits for
// more in the runtime's poller for up to linger, then puts the socket back
// in the set and ends.
//
// A goroutine parked on a socket costs its stack (2–8 KB); a socket in the
// set costs a few words. For a node proxy holding 10,000 idle connections
// that is most of its memory.
//
// The price is two syscalls (the re-arm, and the epoll_wait that sees it)
// and a goroutine start each time a direction goes back to the set: after
// each quiet spell of a linger or more, never on a busy connection; see
// docs/idle-connections.md.
//
// Every socket in the set is there under an id, never by its descriptor
// number alone, and every change to the set goes through the socket's
// RawConn.Control: a closed descriptor number reused by a new socket is
// never touched. A relay whose socket is closed while it waits would never
// hear of it (closing a descriptor drops it from the set silently), so
// the closer calls the Abort of the Relay that Go returns first.
type Poller struct {
	ep   *os.File
	epfd int // ep's descriptor (ep.Fd would make it blocking); used under mu while !closed
	rc   syscall.RawConn
	done chan struct{}

	mu       sync.Mutex
	closed   bool
	next     uint64
	watching map[uint64]*idleRead
	arms     int // directions put in the set so far (tests)
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
	p := &Poller{ep: ep, epfd: fd, rc: rc, done: make(chan struct{}), watching: map[uint64]*idleRead{}}
	go p.loop()
	return p, nil
}

// Close stops the poller. Directions waiting in it end with net.ErrClosed
// (their relays' done functions run before Close returns); those copying
// end when they next would wait.
func (p *Poller) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	waiting := p.watching
	p.watching = nil
	p.mu.Unlock()
	err := p.ep.Close() // wakes the loop
	<-p.done
	for _, r := range waiting {
		r.finish(net.ErrClosed)
	}
	return err
}

// Waiting reports how many directions wait in the set (for tests and
// metrics).
func (p *Poller) Waiting() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.watching)
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
	var ready []*idleRead
	for {
		if err := p.rc.Read(wait); err != nil || werr != nil {
			return // Close (epoll_wait on a live set fails only if it is gone)
		}
		ready = ready[:0]
		p.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if r, ok := p.watching[id]; ok {
				delete(p.watching, id) // one-shot: the set holds it disarmed
				ready = append(ready, r)
			}
		}
		p.mu.Unlock()
		for _, r := range ready {
			go r.run()
		}
		clear(ready)
	}
}

// Go is the package's Go with every direction that reads a *net.TCPConn
// waiting in the poller rather than in a goroutine. Before closing a or b
// while the relay may still run, call the returned Relay's Abort: it ends
// the directions that wait in the poller (with net.ErrClosed), and the
// close ends the others. A nil Poller is the package's Go.
func (p *Poller) Go(a, b Conn, done func(Result)) *Relay {
	return start(p, a, b, done)
}

// Abort ends the relay's directions that wait in the poller; see Go. It
// does nothing on a nil Relay.
func (rl *Relay) Abort() {
	if rl == nil {
		return
	}
	if rl.read.p != nil {
		rl.read.abort()
	}
	if rl.read2 != nil {
		rl.read2.abort()
	}
}

// idleRead is one direction from a socket: a goroutine while there is
// data, an entry in the poller's set while there is none.
type idleRead struct {
	p       *Poller // nil: not in use
	rl      *Relay
	id      uint64
	dst     Conn
	src     *net.TCPConn
	rc      syscall.RawConn
	dir     int  // which of rl's results is this direction's (Result.of)
	added   bool // in the epoll set (armed or not)
	aborted bool // guarded by p.mu
}

// initIdleRead sets r up for the direction src → dst, or reports false
// where the poller cannot serve: no poller, or a source that is not a
// socket.
func (p *Poller) initIdleRead(r *idleRead, rl *Relay, dir int, dst, src Conn) bool {
	sc, ok := src.(*net.TCPConn)
	if p == nil || !ok {
		return false
	}
	rc, rerr := sc.SyscallConn()
	if rerr != nil {
		return false
	}
	p.mu.Lock()
	p.next++
	id := p.next
	p.mu.Unlock()
	*r = idleRead{p: p, rl: rl, id: id, dst: dst, src: sc, rc: rc, dir: dir}
	return true
}

// linger is how long a direction that has found its socket empty waits
// for more in the runtime's poller (holding its goroutine, not a buffer)
// before it moves to the set. The deadline is set once per linger, not per
// read; when it passes, a direction that read anything meanwhile lingers
// again, so only a socket quiet for a whole linger goes to the set, and a
// busy connection pays one deadline per linger instead of the set's
// syscalls and a new goroutine.
const linger = 100 * time.Millisecond

// run copies; from the first time it finds the socket empty it waits in
// the runtime's poller for up to linger, then in the set. It is the only
// goroutine of the direction, and ends either way.
func (r *idleRead) run() {
	lingering := false
	busy := false // bytes came during this linger
	sr := newSocketReader(r.rc)
	for {
		bp, m, err := sr.read(lingering)
		switch {
		case err == unix.EAGAIN: // nothing now: linger, if the deadline takes
			if r.src.SetReadDeadline(time.Now().Add(linger)) != nil {
				r.arm()
				return
			}
			lingering = true
			continue
		case lingering && errors.Is(err, os.ErrDeadlineExceeded):
			if busy && r.src.SetReadDeadline(time.Now().Add(linger)) == nil {
				// Traffic during the linger: another one, rather than a
				// trip through the set (epoll_ctl, a wake-up of the
				// poller, a new goroutine) every linger on a busy socket.
				busy = false
				continue
			}
			_ = r.src.SetReadDeadline(time.Time{})
			r.arm()
			return
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

// arm puts the socket in the poller's set, one-shot and level-triggered:
// a socket that turned readable since the last read is reported at once.
// An aborted relay or a closed poller ends the direction instead.
func (r *idleRead) arm() {
	p := r.p
	p.mu.Lock()
	if p.closed || r.aborted {
		p.mu.Unlock()
		r.finish(net.ErrClosed)
		return
	}
	p.arms++
	op := unix.EPOLL_CTL_MOD
	if !r.added {
		op = unix.EPOLL_CTL_ADD
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(r.id)), Pad: int32(uint32(r.id >> 32))}
	var cerr error
	err := r.rc.Control(func(fd uintptr) {
		cerr = unix.EpollCtl(p.epfd, op, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		p.mu.Unlock()
		r.finish(fmt.Errorf("relay: watch socket: %w", err))
		return
	}
	r.added = true
	p.watching[r.id] = r
	p.mu.Unlock()
}

// abort ends the direction if it waits in the set; if it is copying, the
// caller's close ends it.
func (r *idleRead) abort() {
	p := r.p
	p.mu.Lock()
	r.aborted = true
	_, waiting := p.watching[r.id]
	if waiting {
		delete(p.watching, r.id)
		_ = r.rc.Control(func(fd uintptr) {
			_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
		})
	}
	p.mu.Unlock()
	if waiting {
		r.finish(net.ErrClosed)
	}
}

// finish half-closes the destination and reports the direction's end, once:
// whoever took the direction out of the set (or never put it there) calls it.
func (r *idleRead) finish(err error) {
	if errors.Is(err, io.EOF) {
		err = nil
	}
	_, e := r.rl.r.of(r.dir)
	*e = closeWrite(r.dst, err)
	r.rl.finish()
}
