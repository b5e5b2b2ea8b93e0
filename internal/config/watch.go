package config

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/workload"
)

// Watcher keeps a config file applied: each change that parses becomes the
// new index; one that does not is logged and the last good index stays.
// It polls, so it follows edits in place, atomic renames and the symlink
// swaps of a Kubernetes ConfigMap alike. It is a workload.Source.
type Watcher struct {
	Path     string
	Interval time.Duration // default 1 s
	Log      *slog.Logger  // nil: discard
	// OnError, if set, receives each rejected change (after it is logged).
	OnError func(error)

	last       [sha256.Size]byte
	syncedOnce sync.Once
	synced     chan struct{}
}

var _ workload.Source = (*Watcher)(nil)

// Load reads and parses the file once; Run applies it first.
func (w *Watcher) Load() (*workload.Index, error) {
	data, err := os.ReadFile(w.Path)
	if err != nil {
		return nil, err
	}
	ix, err := Parse(w.Path, data)
	if err != nil {
		return nil, err
	}
	w.last = sha256.Sum256(data)
	return ix, nil
}

// Synced is closed once the file's first good view went to apply.
func (w *Watcher) Synced() <-chan struct{} {
	w.syncedOnce.Do(func() { w.synced = make(chan struct{}) })
	return w.synced
}

// Run applies the file, then polls it until ctx ends. The proxy does not
// start on a first file that does not read, parse or apply: Run returns
// that error; later bad changes are logged and skipped.
func (w *Watcher) Run(ctx context.Context, apply func(*workload.Index) error) error {
	log := w.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	first, err := w.Load()
	if err != nil {
		return err
	}
	if err := apply(first); err != nil {
		return fmt.Errorf("%s: %w", w.Path, err)
	}
	w.Synced()
	close(w.synced)
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
			return nil
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
		if err == nil {
			lastErr = nil
			if err = apply(ix); err != nil {
				log.Error("config change not applied", "err", err)
			} else {
				log.Info("config change applied", "path", w.Path, "workloads", len(ix.Workloads()), "services", len(ix.Services()), "policies", len(ix.Policies()))
			}
		} else {
			log.Error("config change rejected; keeping the last good one", "err", err)
		}
		if err != nil && w.OnError != nil {
			w.OnError(err)
		}
	}
}
