package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// HoldResult says how many connections a Hold opened and kept.
type HoldResult struct {
	Held   int
	Failed int
	Errors map[string]int // failure reasons, counted
}

func (r HoldResult) String() string {
	s := fmt.Sprintf("held %d failed %d", r.Held, r.Failed)
	for e, n := range r.Errors {
		s += fmt.Sprintf("; %dx %s", n, e)
	}
	return s
}

// Hold opens n connections to an echo server at addr, proves each one works
// end to end with a one-byte round trip, and keeps them open, idle, until
// ctx ends. ready is called once all n have been tried. Connections are
// opened parallel at a time.
func Hold(ctx context.Context, addr string, n, parallel int, ready func(HoldResult)) (HoldResult, error) {
	if n < 0 || parallel < 1 {
		return HoldResult{}, fmt.Errorf("hold: bad counts n=%d parallel=%d", n, parallel)
	}
	conns := make([]net.Conn, 0, n)
	var mu sync.Mutex
	res := HoldResult{Errors: map[string]int{}}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				c, err := openEcho(ctx, addr)
				mu.Lock()
				if err != nil {
					res.Failed++
					res.Errors[reason(err)]++
				} else {
					res.Held++
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if ready != nil {
		ready(res)
	}
	<-ctx.Done()
	return res, nil
}

// reason names a failure without its addresses and ports, so failures of
// one kind count together: "dial: connection refused".
func reason(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Op + ": " + op.Err.Error()
	}
	return err.Error()
}

// openEcho connects and does one round trip, so a connection counts as
// held only when the whole path (both proxies and the app) carried it.
func openEcho(ctx context.Context, addr string) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		c.Close()
		return nil, fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("echo: %w", err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
