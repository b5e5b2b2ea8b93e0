package config

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"time"

	"github.com/ambitmesh/ambit/internal/workload"
)

// Watcher keeps a config file applied: each change that parses becomes the
// new index; one that does not is logged and the last good index stays.
// It polls, so it follows edits in place, atomic renames and the symlink
// swaps of a Kubernetes ConfigMap alike.
type Watcher struct {
	Path     string
	Interval time.Duration // default 1 s
	Log      *slog.Logger  // nil: discard
	// Apply receives each new good index, in order, from Run's goroutine.
	Apply func(*workload.Index)
	// OnError, if set, receives each rejected change (after it is logged).
	OnError func(error)

	last [sha256.Size]byte
}

// Load reads the file once and applies it; the proxy does not start on error.
func (w *Watcher) Load() error {
	data, err := os.ReadFile(w.Path)
	if err != nil {
		return err
	}
	ix, err := Parse(w.Path, data)
	if err != nil {
		return err
	}
	w.last = sha256.Sum256(data)
	w.Apply(ix)
	return nil
}

// Run polls until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	log := w.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	every := w.Interval
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var lastErr []byte
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		data, err := os.ReadFile(w.Path)
		if err != nil {
			if msg := []byte(err.Error()); !bytes.Equal(msg, lastErr) {
				log.Error("config unreadable; keeping the last good one", "path", w.Path, "err", err)
				lastErr = msg
			}
			continue
		}
		sum := sha256.Sum256(data)
		if sum == w.last {
			continue
		}
		w.last = sum
		ix, err := Parse(w.Path, data)
		if err != nil {
			log.Error("config change rejected; keeping the last good one", "err", err)
			if w.OnError != nil {
				w.OnError(err)
			}
			continue
		}
		lastErr = nil
		log.Info("config change applied", "path", w.Path, "workloads", len(ix.Workloads()), "services", len(ix.Services()), "policies", len(ix.Policies()))
		w.Apply(ix)
	}
}
