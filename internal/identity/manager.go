package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/backoff"
)

// Backoff defaults for a failed issuance: 500 ms doubling up to 150 s.
const (
	DefaultInitialBackoff = 500 * time.Millisecond
	DefaultMaxBackoff     = 150 * time.Second
)

// Manager keeps one live certificate per identity: it fetches it through an
// Issuer, renews it at half-life, and on failure backs off while the still
// valid certificate stays in use. The zero value is not usable; call
// NewManager. Close stops every renewal goroutine.
type Manager struct {
	issuer Issuer
	log    *slog.Logger

	// InitialBackoff and MaxBackoff bound the retry delay after a failure;
	// zero means the defaults. Set them before the first Get.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// OnRenew, if set, is called after each certificate is installed.
	OnRenew func(*Certificate)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	entries map[ID]*entry
}

type entry struct {
	ready  chan struct{} // closed when the first certificate (or a permanent stop) arrives
	cancel context.CancelFunc

	mu      sync.Mutex
	cert    *Certificate
	lastErr error
}

// NewManager returns a manager that obtains certificates from issuer.
// log may be nil.
func NewManager(issuer Issuer, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{issuer: issuer, log: log, ctx: ctx, cancel: cancel, entries: map[ID]*entry{}}
}

// ErrClosed is returned by Get after Close.
var ErrClosed = errors.New("certificate manager closed")

// Track starts keeping a certificate for id, if not already, without waiting.
func (m *Manager) Track(id ID) {
	m.track(id)
}

func (m *Manager) track(id ID) *entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.entries[id]; ok {
		return e
	}
	ctx, cancel := context.WithCancel(m.ctx)
	e := &entry{ready: make(chan struct{}), cancel: cancel}
	m.entries[id] = e
	if m.ctx.Err() != nil {
		close(e.ready)
		return e
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.run(ctx, id, e)
	}()
	return e
}

// Get returns the current certificate for id, starting to track it if needed
// and waiting for the first one until ctx ends.
func (m *Manager) Get(ctx context.Context, id ID) (*Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	e := m.track(id)
	select {
	case <-e.ready:
	case <-ctx.Done():
		e.mu.Lock()
		last := e.lastErr
		e.mu.Unlock()
		if last != nil {
			return nil, fmt.Errorf("certificate for %s: %w (last attempt: %v)", id, ctx.Err(), last)
		}
		return nil, fmt.Errorf("certificate for %s: %w", id, ctx.Err())
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cert == nil {
		return nil, ErrClosed
	}
	return e.cert, nil
}

// Current returns the certificate held for id without waiting, or nil.
func (m *Manager) Current(id ID) *Certificate {
	m.mu.Lock()
	e := m.entries[id]
	m.mu.Unlock()
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cert
}

// Forget stops renewing id and drops its certificate.
func (m *Manager) Forget(id ID) {
	m.mu.Lock()
	e := m.entries[id]
	delete(m.entries, id)
	m.mu.Unlock()
	if e != nil {
		e.cancel()
	}
}

// CertState is one tracked identity as ztunnel's admin page shows it:
// with a certificate (Available, even while a renewal fails), with only an
// error (Unavailable), or with neither yet (Initializing).
type CertState struct {
	ID   ID
	Cert *Certificate
	Err  error // the last failure, if no certificate is held
}

// States lists every tracked identity, for the admin endpoint.
func (m *Manager) States() []CertState {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]CertState, 0, len(m.entries))
	for id, e := range m.entries {
		e.mu.Lock()
		st := CertState{ID: id, Cert: e.cert}
		if e.cert == nil {
			st.Err = e.lastErr
		}
		e.mu.Unlock()
		out = append(out, st)
	}
	return out
}

// Close stops all renewals and waits for them to end.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
}

// run owns one identity: fetch, sleep until half-life, fetch again; on error
// back off, keeping the previous certificate while it is valid.
func (m *Manager) run(ctx context.Context, id ID, e *entry) {
	first := true
	defer func() {
		if first {
			close(e.ready)
		}
	}()
	initial, maxB := m.InitialBackoff, m.MaxBackoff
	if initial <= 0 {
		initial = DefaultInitialBackoff
	}
	if maxB <= 0 {
		maxB = DefaultMaxBackoff
	}
	retry := backoff.Backoff{Min: initial, Max: maxB}
	for {
		cert, err := m.issuer.Issue(ctx, id)
		var wait time.Duration
		now := time.Now()
		if err == nil && cert.ID != id {
			err = fmt.Errorf("issuer returned a certificate for %s", cert.ID)
		} else if err == nil && !now.Before(cert.NotAfter()) {
			err = fmt.Errorf("issuer returned a certificate that expired at %s", cert.NotAfter().Format(time.RFC3339))
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			e.mu.Lock()
			e.lastErr = err
			held := e.cert
			e.mu.Unlock()
			wait = retry.Next()
			if held != nil && time.Now().After(held.NotAfter()) {
				m.log.Error("certificate expired and renewal failing", "identity", id, "expired", held.NotAfter(), "err", err)
			} else {
				m.log.Warn("certificate request failed; retrying", "identity", id, "retry_in", wait, "err", err)
			}
		} else {
			retry.Reset()
			e.mu.Lock()
			e.cert, e.lastErr = cert, nil
			e.mu.Unlock()
			if first {
				first = false
				close(e.ready)
			}
			if m.OnRenew != nil {
				m.OnRenew(cert)
			}
			// Half of the remaining life, counted from receipt: NotBefore is
			// back-dated for clock skew and would make short TTLs renew at once.
			wait = cert.NotAfter().Sub(now) / 2
			m.log.Info("certificate issued", "identity", id, "expires", cert.NotAfter().Format(time.RFC3339), "renew_in", wait.Round(time.Millisecond))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
