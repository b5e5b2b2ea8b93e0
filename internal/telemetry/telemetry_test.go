package telemetry

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/workload"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func sample() *Conn {
	client := &workload.Workload{Name: "client", Namespace: "default", CanonicalName: "client", CanonicalRevision: "v1", ClusterID: "Kubernetes"}
	return &Conn{
		Direction: Outbound, Src: netip.MustParseAddrPort("10.244.0.2:35888"), SrcWorkload: client,
		SrcIdentity: identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "default"},
		Dst:         netip.MustParseAddrPort("10.244.1.3:80"), DstHBONE: netip.MustParseAddrPort("10.244.1.3:15008"),
		DstIdentity: identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "default"},
		MTLS:        true, Start: time.Now().Add(-85 * time.Millisecond),
	}
}

func TestAccessLogJSON(t *testing.T) {
	var b bytes.Buffer
	LogConn(slog.New(slog.NewJSONHandler(&b, nil)), sample(), 74, 130, FlagNone, nil)
	var rec map[string]any
	if err := json.Unmarshal(b.Bytes(), &rec); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"msg": "connection complete", "src.addr": "10.244.0.2:35888", "dst.addr": "10.244.1.3:80",
		"dst.hbone_addr": "10.244.1.3:15008", "src.workload": "client", "src.namespace": "default", "src.cluster": "Kubernetes",
		"src.identity": "spiffe://cluster.local/ns/default/sa/default", "dst.identity": "spiffe://cluster.local/ns/default/sa/default",
		"direction": "outbound", "bytes_sent": float64(74), "bytes_recv": float64(130),
	}
	for k, v := range want {
		if rec[k] != v {
			t.Errorf("%s = %v, want %v", k, rec[k], v)
		}
	}
	if d, _ := rec["duration"].(string); !strings.HasSuffix(d, "ms") {
		t.Errorf("duration %v, want a readable string", rec["duration"])
	}
	b.Reset()
	LogConn(slog.New(slog.NewTextHandler(&b, nil)), sample(), 0, 0, FlagDeny, errors.New("denied: x"))
	if s := b.String(); !strings.Contains(s, "level=WARN") || !strings.Contains(s, "flags=DENY") || !strings.Contains(s, `error="denied: x"`) {
		t.Errorf("refusal record: %s", s)
	}
}

func TestMetricsLabels(t *testing.T) {
	m := NewMetrics("1.2.3")
	c := sample()
	m.Opened(c)
	m.Closed(c, 74, 130, FlagNone)
	m.Failed(c, FlagDeny)
	l := m.labels(c, FlagNone)
	if l["reporter"] != "source" || l["source_workload"] != "client" || l["source_canonical_revision"] != "v1" ||
		l["destination_workload"] != "unknown" || l["connection_security_policy"] != "mutual_tls" ||
		l["destination_principal"] != "spiffe://cluster.local/ns/default/sa/default" {
		t.Errorf("labels %v", l)
	}
	if v := testutil.ToFloat64(m.sent.With(l)); v != 74 {
		t.Errorf("sent %v", v)
	}
	if v := testutil.ToFloat64(m.received.With(l)); v != 130 {
		t.Errorf("received %v", v)
	}
	if v := testutil.ToFloat64(m.failed.With(m.labels(c, FlagDeny))); v != 1 {
		t.Errorf("failed %v", v)
	}
	var nilM *Metrics
	nilM.Opened(c) // a proxy without metrics
}

// A proxy holds one record per live connection: it stays in the 256-byte
// size class.
func TestConnFitsItsSizeClass(t *testing.T) {
	if n := unsafe.Sizeof(Conn{}); n > 256 {
		t.Errorf("telemetry.Conn is %d bytes, above the 256-byte size class", n)
	}
}

// A connection's counters are found by what its labels are made of: a
// warm one allocates nothing, a change of any of those makes its own
// series with the right labels, an uncounted vec exports nothing, and the
// cache stays bounded.
func TestMetricsSeriesCache(t *testing.T) {
	m := NewMetrics("1.2.3")
	c := sample()
	m.Opened(c)
	if n := testing.AllocsPerRun(100, func() { m.Opened(c) }); n != 0 {
		t.Errorf("Opened on a known series allocates %.1f times", n)
	}
	if v := testutil.ToFloat64(m.opened.With(m.labels(c, FlagNone))); v != 102 { // AllocsPerRun runs it once more to warm up
		t.Errorf("opened %v, want 102", v)
	}
	if n := testutil.CollectAndCount(m.failed); n != 0 {
		t.Errorf("%d failed series exported before any failure", n)
	}
	// Another destination workload, same everything else: its own series.
	d := *c
	d.DstWorkload = &workload.Workload{Name: "server", Namespace: "prod", ClusterID: "Kubernetes"}
	d.Dst = netip.MustParseAddrPort("10.244.1.9:80")
	m.Opened(&d)
	if v := testutil.ToFloat64(m.opened.With(m.labels(&d, FlagNone))); v != 1 {
		t.Errorf("opened for the other workload %v, want 1", v)
	}
	if l := m.labels(&d, FlagNone); l["destination_workload"] != "server" || l["destination_service"] != "10.244.1.9" {
		t.Errorf("labels of the other workload: %v", l)
	}
	// The address is a label only without a service: two addresses of one
	// workload with no service are two series.
	e := d
	e.Dst = netip.MustParseAddrPort("10.244.1.10:80")
	m.Opened(&e)
	if v := testutil.ToFloat64(m.opened.With(m.labels(&d, FlagNone))); v != 1 {
		t.Errorf("opened for 10.244.1.9 %v after one to 10.244.1.10, want 1", v)
	}
	for i := 0; i < maxSeries+10; i++ {
		f := *c
		f.SrcIdentity.ServiceAccount = "sa" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676))
		m.Opened(&f)
	}
	m.mu.Lock()
	n := len(m.series)
	m.mu.Unlock()
	if n > maxSeries {
		t.Errorf("the series cache holds %d entries, above its bound %d", n, maxSeries)
	}
}

// ztunnel's xDS and workload-manager metrics, under the names its
// dashboard queries.
func TestXDSAndWorkloadManagerMetrics(t *testing.T) {
	m := NewMetrics("1.2.3")
	const addr = "type.googleapis.com/istio.workload.Address"
	m.XDSMessage(addr, 120)
	m.XDSMessage(addr, 80)
	m.XDSTermination("Reconnect")
	m.PodStarted()
	m.PodStarted()
	m.PodStopped()
	m.CountPods(func() (int, int) { return 3, 1 })
	for _, c := range []struct {
		name, text string
	}{
		{"istio_xds_message_total", `istio_xds_message_total{url="` + addr + `"} 2`},
		{"istio_xds_message_bytes_total", `istio_xds_message_bytes_total{url="` + addr + `"} 200`},
		{"istio_xds_connection_terminations_total", `istio_xds_connection_terminations_total{reason="Reconnect"} 1`},
		{"workload_manager_proxies_started_total", `workload_manager_proxies_started_total 2`},
		{"workload_manager_proxies_stopped_total", `workload_manager_proxies_stopped_total 1`},
		{"workload_manager_active_proxy_count", `workload_manager_active_proxy_count 3`},
		{"workload_manager_pending_proxy_count", `workload_manager_pending_proxy_count 1`},
	} {
		if !strings.Contains(scrape(t, m), c.text+"\n") {
			t.Errorf("%s: want %q in the scrape", c.name, c.text)
		}
	}
}

// scrape is what Prometheus reads of /metrics.
func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("/metrics: %d", rec.Code)
	}
	return rec.Body.String()
}
