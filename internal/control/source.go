package control

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/ambitmesh/ambit/internal/config"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
)

// Source feeds the control plane its view of the mesh: the local file now,
// Kubernetes next.
type Source interface {
	// Load returns the first view; the control plane does not start without it.
	Load() (*workload.Index, error)
	// Run hands each later view to publish until ctx ends.
	Run(ctx context.Context, publish func(*workload.Index))
}

// FileSource is a watched ztunnel-format config file.
type FileSource struct {
	Path string
	Log  *slog.Logger

	w *config.Watcher
}

// Load reads the file once.
func (f *FileSource) Load() (*workload.Index, error) {
	var first *workload.Index
	f.w = &config.Watcher{Path: f.Path, Log: f.Log, Apply: func(ix *workload.Index) { first = ix }}
	if err := f.w.Load(); err != nil {
		return nil, err
	}
	return first, nil
}

// Run watches the file; a bad change is logged and skipped.
func (f *FileSource) Run(ctx context.Context, publish func(*workload.Index)) {
	f.w.Apply = publish
	f.w.Run(ctx)
}

// Run serves the control plane on listen until ctx ends: the first view
// from src, then every change it reports.
func Run(ctx context.Context, src Source, ca *identity.CA, tokens Tokens, listen netip.AddrPort, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ix, err := src.Load()
	if err != nil {
		return err
	}
	srv, err := NewServer(ctx, ca, tokens, listen.Addr(), ix, log)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", listen.String())
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		src.Run(ctx, func(ix *workload.Index) {
			if err := srv.SetIndex(ix); err != nil {
				log.Error("change not published", "err", err)
			}
		})
	}()
	go func() { <-ctx.Done(); srv.Stop() }()
	log.Info("control plane serving", "addr", l.Addr().String(), "nodes", len(tokens))
	err = srv.Serve(l)
	<-done
	if ctx.Err() != nil {
		return nil
	}
	return err
}
