// Package kubesource is the control plane's view of a Kubernetes cluster:
// informers on the API server's Namespaces, Nodes, Pods, Services,
// EndpointSlices and Istio's AuthorizationPolicies, translated into the
// mesh index as istiod translates them for ztunnel (Translate), and node
// proxies authenticated by TokenReview (Auth).
package kubesource

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
)

// DefaultDebounce gathers the changes of one burst (a Deployment's pods,
// a slice after its pod) into one view; well inside the 1 s a change may
// take to reach the proxies.
const DefaultDebounce = 100 * time.Millisecond

// Source is a workload.Source over the API server.
type Source struct {
	Options
	// Debounce is how long a change waits for others; 0: DefaultDebounce.
	Debounce time.Duration
	Log      *slog.Logger

	namespaces kube.Informer[kube.Namespace, *kube.Namespace]
	nodes      kube.Informer[kube.Node, *kube.Node]
	pods       kube.Informer[kube.Pod, *kube.Pod]
	services   kube.Informer[kube.Service, *kube.Service]
	slices     kube.Informer[kube.EndpointSlice, *kube.EndpointSlice]
	policies   kube.Informer[kube.AuthorizationPolicy, *kube.AuthorizationPolicy]

	changed chan struct{}
	synced  chan struct{}
	metrics metrics
	reg     *prometheus.Registry

	ran     atomic.Bool
	mu      sync.Mutex
	skipped map[Skip]bool // reported already: each is logged once
}

type metrics struct {
	skipped *prometheus.GaugeVec
	views   prometheus.Counter
	build   prometheus.Gauge
	// undecodable counts objects (versions) that did not decode.
	undecodable *prometheus.CounterVec
}

// New makes a source reading through c. Its metrics (Handler serves them
// with the process's):
// ambit_kube_skipped_objects{kind} counts what the last view left out
// (or kept in part), ambit_kube_views_total the views built,
// ambit_kube_view_build_seconds the last one's build time,
// ambit_kube_undecodable_objects_total what did not decode.
func New(c *kube.Client, o Options, log *slog.Logger) *Source {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o.fill()
	s := &Source{Options: o, Log: log, changed: make(chan struct{}, 1), synced: make(chan struct{}), skipped: map[Skip]bool{}}
	s.metrics = metrics{
		skipped: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ambit_kube_skipped_objects",
			Help: "API objects the last view left out or translated only in part, by kind."}, []string{"kind"}),
		views: prometheus.NewCounter(prometheus.CounterOpts{Name: "ambit_kube_views_total", Help: "Views of the mesh built from the API server."}),
		build: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ambit_kube_view_build_seconds", Help: "Time the last view took to build."}),
		undecodable: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_kube_undecodable_objects_total",
			Help: "API object versions that did not decode (the last that did is kept), by kind."}, []string{"kind"}),
	}
	s.reg = prometheus.NewRegistry()
	s.reg.MustRegister(s.metrics.skipped, s.metrics.views, s.metrics.build, s.metrics.undecodable,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	changed := func() {
		select {
		case s.changed <- struct{}{}:
		default:
		}
	}
	undecodable := func(kind, _ string, _ error) { // the informer logs it
		s.metrics.undecodable.WithLabelValues(kind).Inc()
	}
	s.namespaces = kube.Informer[kube.Namespace, *kube.Namespace]{Client: c, Resource: kube.Namespaces, Changed: changed, Skipped: undecodable, Log: log}
	s.nodes = kube.Informer[kube.Node, *kube.Node]{Client: c, Resource: kube.Nodes, Changed: changed, Skipped: undecodable, Log: log}
	s.pods = kube.Informer[kube.Pod, *kube.Pod]{Client: c, Resource: kube.Pods, Changed: changed, Skipped: undecodable, Log: log}
	s.services = kube.Informer[kube.Service, *kube.Service]{Client: c, Resource: kube.Services, Changed: changed, Skipped: undecodable, Log: log}
	s.slices = kube.Informer[kube.EndpointSlice, *kube.EndpointSlice]{Client: c, Resource: kube.EndpointSlices, Changed: changed, Skipped: undecodable, Log: log}
	s.policies = kube.Informer[kube.AuthorizationPolicy, *kube.AuthorizationPolicy]{Client: c, Resource: kube.AuthorizationPolicies, Changed: changed, Skipped: undecodable, Optional: true, Log: log}
	return s
}

// Handler serves the source's metrics, and the process's, for /metrics.
func (s *Source) Handler() http.Handler { return promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}) }

// Gather exposes the metrics, for tests.
func (s *Source) Gather() prometheus.Gatherer { return s.reg }

// Pod returns the pod "ns/name" as the source last saw it, or nil.
func (s *Source) Pod(key string) *kube.Pod { return s.pods.Get(key) }

// Synced is closed once the first complete view (every informer listed)
// went to apply.
func (s *Source) Synced() <-chan struct{} { return s.synced }

// Run implements workload.Source: the informers, and a view built after
// each burst of changes.
func (s *Source) Run(ctx context.Context, apply func(*workload.Index) error) error {
	if !s.ran.CompareAndSwap(false, true) {
		return errors.New("kubesource: a Source runs once")
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.namespaces.Run(gctx) })
	g.Go(func() error { return s.nodes.Run(gctx) })
	g.Go(func() error { return s.pods.Run(gctx) })
	g.Go(func() error { return s.services.Run(gctx) })
	g.Go(func() error { return s.slices.Run(gctx) })
	g.Go(func() error { return s.policies.Run(gctx) })
	g.Go(func() error { return s.push(gctx, apply) })
	err := g.Wait()
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	}
	return err
}

func (s *Source) push(ctx context.Context, apply func(*workload.Index) error) error {
	for _, c := range []<-chan struct{}{s.namespaces.Synced(), s.nodes.Synced(), s.pods.Synced(), s.services.Synced(), s.slices.Synced(), s.policies.Synced()} {
		select {
		case <-c:
		case <-ctx.Done():
			return nil
		}
	}
	debounce := s.Debounce
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	first := true
	for {
		// Drain the signal the lists raised: this view holds them.
		select {
		case <-s.changed:
		default:
		}
		ix := s.View()
		if err := apply(ix); err != nil {
			s.Log.Error("view not applied", "err", err)
		}
		if first {
			first = false
			close(s.synced)
			s.Log.Info("API server synced", "workloads", len(ix.Workloads()), "services", len(ix.Services()), "policies", len(ix.Policies()))
		}
		select {
		case <-s.changed:
		case <-ctx.Done():
			return nil
		}
		t := time.NewTimer(debounce)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
}

// View builds the mesh from what the informers hold now, and reports what
// it skipped: each skip logged once, the metric the last view's count.
func (s *Source) View() *workload.Index {
	start := time.Now()
	st := State{
		Namespaces: s.namespaces.List(), Nodes: s.nodes.List(), Pods: s.pods.List(),
		Services: s.services.List(), EndpointSlices: s.slices.List(), Policies: s.policies.List(),
	}
	ix, skips := Translate(st, s.Options)
	s.metrics.build.Set(time.Since(start).Seconds())
	s.metrics.views.Inc()
	s.mu.Lock()
	defer s.mu.Unlock()
	now := map[Skip]bool{}
	count := map[string]float64{}
	for _, k := range skips {
		now[k] = true
		count[k.Kind]++
		if !s.skipped[k] {
			if k.Kept {
				s.Log.Warn("object translated in part", "kind", k.Kind, "key", k.Key, "reason", k.Reason)
			} else {
				s.Log.Warn("object skipped", "kind", k.Kind, "key", k.Key, "reason", k.Reason)
			}
		}
	}
	s.skipped = now
	s.metrics.skipped.Reset()
	for kind, n := range count {
		s.metrics.skipped.WithLabelValues(kind).Set(n)
	}
	return ix
}
