package workload

import (
	"context"
	"sync"
)

// A Source is where a mesh's config comes from: a watched ztunnel-format file
// (config.Watcher), a control plane's delta xDS (xds.Client), the Kubernetes
// API server next. The node proxy and the control plane start the same way
// from any of them: run it, wait for Synced, build on the latest view.
type Source interface {
	// Run hands each new view to apply, in order, from its own goroutine,
	// until ctx ends (then it returns nil). An error from apply rejects that
	// view: the source keeps its last good one and says so (a log line, an
	// xDS NACK). An error returned before Synced means no config at all.
	Run(ctx context.Context, apply func(*Index) error) error
	// Synced is closed once a first complete view went to apply.
	Synced() <-chan struct{}
}

// Handoff keeps the views a Source applies before their consumer exists (a
// proxy is built from the first complete view), then passes each later one
// on. Its Apply is the function to give the Source.
type Handoff struct {
	mu     sync.Mutex
	latest *Index
	to     func(*Index) error
}

// Apply takes a view: it is kept until Attach, then passed on.
func (h *Handoff) Apply(ix *Index) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.to != nil {
		return h.to(ix)
	}
	h.latest = ix
	return nil
}

// Latest is the last view applied before Attach.
func (h *Handoff) Latest() *Index {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.latest
}

// Attach passes every later view to to. A view that arrived since built
// (the one the consumer was made from) goes to it now.
func (h *Handoff) Attach(built *Index, to func(*Index) error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.to = to
	latest := h.latest
	h.latest = nil // the consumer holds it now
	if latest != built && latest != nil {
		return to(latest)
	}
	return nil
}
