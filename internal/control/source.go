package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"golang.org/x/sync/errgroup"
)

// SyncTimeout bounds the wait for a Source's first complete view.
const SyncTimeout = 30 * time.Second

// Run serves the control plane on listen until ctx ends: the first complete
// view from src (a watched file, the Kubernetes API server), then every change it
// reports. A change the server cannot publish is the source's to report.
func Run(ctx context.Context, src workload.Source, ca *identity.CA, auth Authenticator, listen netip.AddrPort, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g, gctx := errgroup.WithContext(ctx)
	var views workload.Handoff
	g.Go(func() error { return src.Run(gctx, views.Apply) })
	serve := func() error {
		select {
		case <-src.Synced():
		case <-gctx.Done():
			return nil // the source's error, or ctx's end, is g's
		case <-time.After(SyncTimeout):
			return fmt.Errorf("control: no complete view of the mesh from its source within %v", SyncTimeout)
		}
		ix := views.Latest()
		srv, err := NewServer(gctx, ca, auth, listen.Addr(), ix, log)
		if err != nil {
			return err
		}
		if err := views.Attach(ix, srv.SetIndex); err != nil {
			log.Error("change not published", "err", err)
		}
		l, err := net.Listen("tcp", listen.String())
		if err != nil {
			return fmt.Errorf("control: %w", err)
		}
		stopped := make(chan struct{})
		defer close(stopped)
		go func() { // ends with serve: Stop on ctx's end, or nothing once Serve returned
			select {
			case <-gctx.Done():
				srv.Stop()
			case <-stopped:
			}
		}()
		log.Info("control plane serving", "addr", l.Addr().String(), "auth", fmt.Sprint(auth))
		if err := srv.Serve(l); err != nil && gctx.Err() == nil {
			return err
		}
		return nil
	}
	g.Go(func() error {
		err := serve()
		if err != nil {
			return err
		}
		return errStopped // ends the source too
	})
	if err := g.Wait(); err != nil && !errors.Is(err, errStopped) {
		return err
	}
	return nil
}

// errStopped is how the server's end reaches the source's goroutine.
var errStopped = errors.New("control plane stopped")
