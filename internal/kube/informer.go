package kube

import (
	"context"
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/backoff"
)

// Object is what an informer keeps: an API object with its metadata.
type Object[T any] interface {
	*T
	Meta() *ObjectMeta
}

// Meta returns the object's metadata.
func (o *Namespace) Meta() *ObjectMeta           { return &o.Metadata }
func (o *Node) Meta() *ObjectMeta                { return &o.Metadata }
func (o *Pod) Meta() *ObjectMeta                 { return &o.Metadata }
func (o *Service) Meta() *ObjectMeta             { return &o.Metadata }
func (o *EndpointSlice) Meta() *ObjectMeta       { return &o.Metadata }
func (o *AuthorizationPolicy) Meta() *ObjectMeta { return &o.Metadata }
func (o *DaemonSet) Meta() *ObjectMeta           { return &o.Metadata }

// Informer keeps a copy of one collection current, client-go's pattern: a
// list, then a watch from the list's resourceVersion (bookmarks keep it
// fresh), a new watch when the server ends one, a relist when the version
// is gone (410). Objects are replaced whole, never changed in place, so a
// pointer from List stays valid and unchanging.
type Informer[T any, P Object[T]] struct {
	Client   *Client
	Resource Resource
	Selector Selector
	// Changed is called from Run's goroutine after the copy changed: after
	// each list, and each watch event that changed an object.
	Changed func()
	// Skipped is called for an object that does not decode; the last
	// version that did stays.
	Skipped func(kind, key string, err error)
	// Optional: a collection the API server does not serve (404: its CRD
	// is not installed) counts as empty and synced, and is listed again
	// later, so a cluster without Istio's CRDs still gets a mesh.
	Optional bool
	Log      *slog.Logger // nil: discard

	mu         sync.RWMutex
	items      map[string]P
	syncedOnce sync.Once
	synced     chan struct{}
}

// Synced is closed once the first list is in.
func (in *Informer[T, P]) Synced() <-chan struct{} {
	in.syncedOnce.Do(func() { in.synced = make(chan struct{}) })
	return in.synced
}

// markSynced closes Synced once; only Run's goroutine calls it.
func (in *Informer[T, P]) markSynced() {
	select {
	case <-in.synced:
	default:
		close(in.synced)
	}
}

// List returns the objects now known, in no order.
func (in *Informer[T, P]) List() []P {
	in.mu.RLock()
	defer in.mu.RUnlock()
	out := make([]P, 0, len(in.items))
	for _, o := range in.items {
		out = append(out, o)
	}
	return out
}

// Get returns the object "namespace/name" ("name" if cluster-scoped), or nil.
func (in *Informer[T, P]) Get(key string) P {
	in.mu.RLock()
	defer in.mu.RUnlock()
	return in.items[key]
}

// Run keeps the copy current until ctx ends, then returns nil. Failures
// are logged and retried with back-off (200 ms doubling to 30 s).
func (in *Informer[T, P]) Run(ctx context.Context) error {
	log := in.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("kind", in.Resource.Kind)
	in.Synced()
	retry := backoff.Backoff{Min: 200 * time.Millisecond, Max: 30 * time.Second}
	wait := func() bool {
		t := time.NewTimer(retry.Next())
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	missing := false
	for ctx.Err() == nil {
		rv, err := in.list(ctx)
		if err != nil && in.Optional && IsNotFound(err) {
			if !missing {
				log.Warn("not served by the API server (is its CRD installed?); taken as empty, listed again every 30 s", "resource", in.Resource.Path(""))
				missing = true
			}
			in.mu.Lock()
			had := len(in.items) > 0
			in.items = map[string]P{}
			in.mu.Unlock()
			if had && in.Changed != nil {
				in.Changed() // the CRD was removed: its objects are gone
			}
			in.markSynced()
			t := time.NewTimer(30 * time.Second)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("list failed; retrying", "err", err)
			}
			if !wait() {
				break
			}
			continue
		}
		in.markSynced()
		retry.Reset()
		for ctx.Err() == nil {
			// client-go's spread of watch lengths, so a cluster's
			// watchers do not all come back at once.
			timeout := 5*time.Minute + rand.N(5*time.Minute)
			err := in.Client.Watch(ctx, in.Resource, in.Selector, rv, timeout, func(ev Event) error {
				if next := in.apply(log, ev); next != "" {
					rv = next
				}
				retry.Reset()
				return nil
			})
			if IsGone(err) {
				log.Info("watch expired; relisting", "resourceVersion", rv)
				break
			}
			if err != nil && ctx.Err() == nil {
				log.Warn("watch failed; watching again", "err", err)
				if !wait() {
					return nil
				}
			}
		}
	}
	return nil
}

// list replaces the copy with the collection as the API server has it.
func (in *Informer[T, P]) list(ctx context.Context) (string, error) {
	raw, rv, err := in.Client.List(ctx, in.Resource, in.Selector)
	if err != nil {
		return "", err
	}
	items := make(map[string]P, len(raw))
	for _, r := range raw {
		o, key, err := decode[T, P](r)
		if err != nil {
			if old := in.Get(key); old != nil {
				items[key] = old
			}
			in.skip(key, err)
			continue
		}
		items[key] = o
	}
	in.mu.Lock()
	in.items = items
	in.mu.Unlock()
	if in.Changed != nil {
		in.Changed()
	}
	return rv, nil
}

// apply takes one event into the copy and returns its resourceVersion.
func (in *Informer[T, P]) apply(log *slog.Logger, ev Event) string {
	var m struct {
		Metadata ObjectMeta `json:"metadata"`
	}
	if err := json.Unmarshal(ev.Object, &m); err != nil {
		in.skip("?", err)
		return ""
	}
	if ev.Type == "BOOKMARK" {
		return m.Metadata.ResourceVersion
	}
	key := m.Metadata.Key()
	switch ev.Type {
	case "ADDED", "MODIFIED":
		o, _, err := decode[T, P](ev.Object)
		if err != nil {
			in.skip(key, err)
			return m.Metadata.ResourceVersion
		}
		in.mu.Lock()
		in.items[key] = o
		in.mu.Unlock()
	case "DELETED":
		in.mu.Lock()
		delete(in.items, key)
		in.mu.Unlock()
	default:
		log.Warn("watch event of unknown type skipped", "type", ev.Type, "key", key)
		return m.Metadata.ResourceVersion
	}
	if in.Changed != nil {
		in.Changed()
	}
	return m.Metadata.ResourceVersion
}

func (in *Informer[T, P]) skip(key string, err error) {
	if in.Log != nil {
		in.Log.Warn("object skipped: it does not decode (the last version that did stays)", "kind", in.Resource.Kind, "key", key, "err", err)
	}
	if in.Skipped != nil {
		in.Skipped(in.Resource.Kind, key, err)
	}
}

func decode[T any, P Object[T]](raw json.RawMessage) (P, string, error) {
	o := P(new(T))
	err := json.Unmarshal(raw, o)
	return o, o.Meta().Key(), err
}
