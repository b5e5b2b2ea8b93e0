// Package relay copies bytes both ways between two connections, passing
// each half-close on: when one side stops sending, the other side's write
// half is closed and the opposite direction goes on. It is what a proxy
// does between an application socket and a tunnel.
package relay

import (
	"errors"
	"io"
	"sync"
)

// Conn is a connection whose write half can be closed on its own:
// *net.TCPConn, *tls.Conn and *hbone.Stream are.
type Conn interface {
	io.ReadWriter
	CloseWrite() error
}

// Result counts the bytes moved each way and keeps the first error of each
// direction (io.EOF is the normal end, not an error).
type Result struct {
	AToB, BToA int64
	ErrAToB    error
	ErrBToA    error
}

// Err returns the first error of either direction, or nil.
func (r Result) Err() error { return errors.Join(r.ErrAToB, r.ErrBToA) }

// Bidirectional copies a→b and b→a until both directions have ended. It
// does not close a or b; the caller does, after it returns.
func Bidirectional(a, b Conn) Result {
	var r Result
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r.AToB, r.ErrAToB = oneWay(b, a)
	}()
	r.BToA, r.ErrBToA = oneWay(a, b)
	wg.Wait()
	return r
}

func oneWay(dst, src Conn) (int64, error) {
	n, err := io.Copy(dst, src)
	if cerr := dst.CloseWrite(); err == nil && cerr != nil && !errors.Is(cerr, io.ErrClosedPipe) {
		err = cerr
	}
	return n, err
}
