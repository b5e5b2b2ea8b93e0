// Package telemetry records what happens to connections: one access-log
// record per finished connection at each end, and Prometheus metrics with
// Istio's names and labels, so existing dashboards read Ambit unchanged.
// It knows nothing of the data path's internals: the proxy hands it a Conn.
package telemetry

import (
	"context"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Response flags, as Istio's metrics spell them.
const (
	FlagNone        = "-"
	FlagDeny        = "DENY"        // refused by policy
	FlagConnect     = "CONNECT"     // the upstream (or the tunnel) could not be reached
	FlagTLSFailure  = "TLS_FAILURE" // the tunnel's handshake failed
	FlagNoEndpoint  = "NO_HEALTHY_UPSTREAM"
	FlagPolicyClose = "DENY_LATE" // closed by a policy change while open
	// FlagUnsupported: the destination needs what Ambit does not implement
	// yet (a waypoint, a network gateway, ...): refused, fail closed.
	FlagUnsupported = "UNSUPPORTED"
)

// Direction says which way a proxy carries a connection.
type Direction uint8

const (
	Outbound Direction = iota // from a local workload
	Inbound                   // to a local workload
)

func (d Direction) String() string {
	if d == Inbound {
		return "inbound"
	}
	return "outbound"
}

// Conn is one proxied connection as telemetry sees it. A node proxy holds
// one per live connection: it is kept to 248 bytes (the 256-byte size
// class; a string direction took it to 288).
type Conn struct {
	Direction   Direction
	MTLS        bool
	Src         netip.AddrPort
	SrcWorkload *workload.Workload
	SrcIdentity identity.ID
	Dst         netip.AddrPort // the original destination (outbound) or target (inbound)
	DstHBONE    netip.AddrPort // the HBONE address used, if any
	DstWorkload *workload.Workload
	DstService  *workload.Service
	DstIdentity identity.ID
	Start       time.Time
}

func (c *Conn) reporter() string {
	if c.Direction == Inbound {
		return "destination"
	}
	return "source"
}

// Metrics holds the istio_* collectors in their own registry.
type Metrics struct {
	reg                    *prometheus.Registry
	opened, closed, failed *prometheus.CounterVec
	sent, received         *prometheus.CounterVec

	// ztunnel's xDS and workload-manager (in-pod) metrics, which its
	// dashboard reads.
	xdsMessages, xdsBytes, xdsEnds *prometheus.CounterVec
	podsStarted, podsStopped       prometheus.Counter
	podCounts                      atomic.Pointer[func() (active, pending int)]

	// A connection's counters, by what its labels are made of. Building
	// the 23 labels took ~30 small allocations per call, twice per
	// connection: in a burst of set-ups that garbage scattered the few
	// long-lived objects made meanwhile (the HBONE connections' TLS
	// state) over spans that then could not be given back.
	mu     sync.Mutex
	series map[seriesKey]*series
}

// seriesKey is what a connection's labels are made of: equal keys, equal
// labels (workloads and services are immutable; a config change makes new
// ones, hence new keys).
type seriesKey struct {
	dir          Direction
	mtls         bool
	srcW, dstW   *workload.Workload
	dstSvc       *workload.Service
	srcID, dstID identity.ID
	dstAddr      netip.Addr // a label only when the destination has a workload and no service
	flags        string
}

// series are one label set's counters, each made on first use (a series
// that was never counted is not exported).
type series [nVecs]prometheus.Counter

const (
	vecOpened = iota
	vecClosed
	vecFailed
	vecSent
	vecReceived
	nVecs
)

// maxSeries bounds the cache: past it, it starts again empty (what an old
// config's workloads keep alive is bounded too).
const maxSeries = 4096

var labelNames = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision", "destination_workload_namespace",
	"destination_principal", "destination_app", "destination_version", "destination_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"request_protocol", "connection_security_policy", "response_flags",
}

// NewMetrics registers the collectors; version labels istio_build.
func NewMetrics(version string) *Metrics {
	reg := prometheus.NewRegistry()
	counter := func(name, help string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
		reg.MustRegister(c)
		return c
	}
	m := &Metrics{
		series:   make(map[seriesKey]*series),
		reg:      reg,
		opened:   counter("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed:   counter("istio_tcp_connections_closed_total", "TCP connections closed."),
		failed:   counter("istio_tcp_connections_failed_total", "TCP connections that failed or were refused."),
		sent:     counter("istio_tcp_sent_bytes_total", "Bytes sent to the destination during TCP connections."),
		received: counter("istio_tcp_received_bytes_total", "Bytes received from the destination during TCP connections."),
	}
	m.xdsMessages = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_xds_message_total", Help: "xDS messages received, by type URL."}, []string{"url"})
	m.xdsBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_xds_message_bytes_total", Help: "Bytes of xDS messages received, by type URL."}, []string{"url"})
	m.xdsEnds = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_xds_connection_terminations_total", Help: "xDS streams ended, by reason."}, []string{"reason"})
	m.podsStarted = prometheus.NewCounter(prometheus.CounterOpts{Name: "workload_manager_proxies_started_total", Help: "Pods enrolled (their in-pod listeners opened)."})
	m.podsStopped = prometheus.NewCounter(prometheus.CounterOpts{Name: "workload_manager_proxies_stopped_total", Help: "Pods removed."})
	podGauge := func(name, help string, pick func(active, pending int) int) prometheus.GaugeFunc {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
			f := m.podCounts.Load()
			if f == nil {
				return 0
			}
			return float64(pick((*f)()))
		})
	}
	reg.MustRegister(m.xdsMessages, m.xdsBytes, m.xdsEnds, m.podsStarted, m.podsStopped,
		podGauge("workload_manager_active_proxy_count", "Pods enrolled now.", func(a, _ int) int { return a }),
		podGauge("workload_manager_pending_proxy_count", "Pods enrolled whose workload xDS has not sent yet (their traffic waits for it).", func(_, p int) int { return p }))
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_build", Help: "Build of the proxy."}, []string{"component", "tag"})
	build.WithLabelValues("ztunnel", version).Set(1)
	reg.MustRegister(build, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// XDSMessage counts an xDS message received (xds.Observer).
func (m *Metrics) XDSMessage(typeURL string, bytes int) {
	if m != nil {
		m.xdsMessages.WithLabelValues(typeURL).Inc()
		m.xdsBytes.WithLabelValues(typeURL).Add(float64(bytes))
	}
}

// XDSTermination counts an xDS stream's end (xds.Observer).
func (m *Metrics) XDSTermination(reason string) {
	if m != nil {
		m.xdsEnds.WithLabelValues(reason).Inc()
	}
}

// PodStarted and PodStopped count pods enrolled and removed.
func (m *Metrics) PodStarted() {
	if m != nil {
		m.podsStarted.Inc()
	}
}

// PodStopped: see PodStarted.
func (m *Metrics) PodStopped() {
	if m != nil {
		m.podsStopped.Inc()
	}
}

// CountPods sets what the workload-manager gauges read when scraped.
func (m *Metrics) CountPods(f func() (active, pending int)) {
	if m != nil {
		m.podCounts.Store(&f)
	}
}

// Handler serves /metrics (and /stats/prometheus).
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Gather exposes the registry, for tests and the admin page.
func (m *Metrics) Gather() prometheus.Gatherer { return m.reg }

func (m *Metrics) labels(c *Conn, flags string) prometheus.Labels {
	l := prometheus.Labels{
		"reporter":                   c.reporter(),
		"request_protocol":           "tcp",
		"connection_security_policy": "unknown",
		"response_flags":             flags,
	}
	if c.MTLS {
		l["connection_security_policy"] = "mutual_tls"
	}
	peer(l, "source", c.SrcWorkload, c.SrcIdentity)
	peer(l, "destination", c.DstWorkload, c.DstIdentity)
	l["destination_service"], l["destination_service_namespace"], l["destination_service_name"] = "unknown", "unknown", "unknown"
	if s := c.DstService; s != nil {
		l["destination_service"], l["destination_service_namespace"], l["destination_service_name"] = s.Hostname, s.Namespace, s.Name
	} else if c.DstWorkload != nil {
		l["destination_service"] = c.Dst.Addr().String()
	}
	return l
}

func peer(l prometheus.Labels, side string, w *workload.Workload, id identity.ID) {
	v := func(s string) string {
		if s == "" {
			return "unknown"
		}
		return s
	}
	principal := "unknown"
	if !id.IsZero() {
		principal = id.String()
	}
	l[side+"_principal"] = principal
	if w == nil {
		for _, k := range []string{"workload", "canonical_service", "canonical_revision", "workload_namespace", "app", "version", "cluster"} {
			l[side+"_"+k] = "unknown"
		}
		return
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	canonical := w.CanonicalName
	if canonical == "" {
		canonical = name
	}
	rev := w.CanonicalRevision
	if rev == "" {
		rev = "latest"
	}
	l[side+"_workload"] = v(name)
	l[side+"_canonical_service"] = canonical
	l[side+"_canonical_revision"] = rev
	l[side+"_workload_namespace"] = v(w.Namespace)
	l[side+"_app"] = canonical
	l[side+"_version"] = rev
	l[side+"_cluster"] = v(w.ClusterID)
}

// counters returns c's series with the counters of vecs made (each on
// first use, then cached): one key and one lock for all of a call's vecs.
// A counter, once set, is never replaced, so the caller reads it unlocked.
func (m *Metrics) counters(c *Conn, flags string, vecs ...int) *series {
	k := seriesKey{dir: c.Direction, mtls: c.MTLS, srcW: c.SrcWorkload, dstW: c.DstWorkload, dstSvc: c.DstService,
		srcID: c.SrcIdentity, dstID: c.DstIdentity, flags: flags}
	if c.DstService == nil && c.DstWorkload != nil {
		k.dstAddr = c.Dst.Addr()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.series[k]
	if s == nil {
		if len(m.series) >= maxSeries {
			clear(m.series)
		}
		s = new(series)
		m.series[k] = s
	}
	for _, vec := range vecs {
		if s[vec] == nil {
			v := [nVecs]*prometheus.CounterVec{m.opened, m.closed, m.failed, m.sent, m.received}[vec]
			s[vec] = v.With(m.labels(c, flags))
		}
	}
	return s
}

// Opened counts a connection that was accepted and is being served.
func (m *Metrics) Opened(c *Conn) {
	if m != nil {
		m.counters(c, FlagNone, vecOpened)[vecOpened].Inc()
	}
}

// Closed counts the end of an opened connection and its bytes.
func (m *Metrics) Closed(c *Conn, sent, recv int64, flags string) {
	if m == nil {
		return
	}
	s := m.counters(c, flags, vecClosed, vecSent, vecReceived)
	s[vecClosed].Inc()
	s[vecSent].Add(float64(sent))
	s[vecReceived].Add(float64(recv))
}

// Failed counts a connection refused or failed before it was opened.
func (m *Metrics) Failed(c *Conn, flags string) {
	if m != nil {
		m.counters(c, flags, vecFailed)[vecFailed].Inc()
	}
}

// LogConn writes the access-log record of a finished (or refused)
// connection: "connection complete" with the peers, bytes and duration.
func LogConn(log *slog.Logger, c *Conn, sent, recv int64, flags string, err error) {
	if log == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("src.addr", addr(c.Src)),
		slog.String("dst.addr", addr(c.Dst)),
	}
	if c.DstHBONE.IsValid() {
		attrs = append(attrs, slog.String("dst.hbone_addr", c.DstHBONE.String()))
	}
	if w := c.SrcWorkload; w != nil {
		attrs = append(attrs, slog.String("src.workload", w.Name), slog.String("src.namespace", w.Namespace), slog.String("src.cluster", w.ClusterID))
	}
	if !c.SrcIdentity.IsZero() {
		attrs = append(attrs, slog.String("src.identity", c.SrcIdentity.String()))
	}
	if s := c.DstService; s != nil {
		attrs = append(attrs, slog.String("dst.service", s.Hostname))
	}
	if w := c.DstWorkload; w != nil {
		attrs = append(attrs, slog.String("dst.workload", w.Name), slog.String("dst.namespace", w.Namespace), slog.String("dst.cluster", w.ClusterID))
	}
	if !c.DstIdentity.IsZero() {
		attrs = append(attrs, slog.String("dst.identity", c.DstIdentity.String()))
	}
	attrs = append(attrs,
		slog.String("direction", c.Direction.String()),
		slog.Int64("bytes_sent", sent),
		slog.Int64("bytes_recv", recv),
		slog.String("duration", time.Since(c.Start).Round(time.Microsecond).String()),
	)
	level := slog.LevelInfo
	if flags != FlagNone && flags != "" {
		attrs = append(attrs, slog.String("flags", flags))
	}
	if err != nil {
		attrs = append(attrs, slog.String("error", err.Error()))
		level = slog.LevelWarn
	}
	log.LogAttrs(context.Background(), level, "connection complete", attrs...)
}

func addr(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
