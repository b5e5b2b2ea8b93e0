package startup

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// ztunnelChartEnv is the environment Istio's ztunnel chart gives its
// container (manifests/charts/ztunnel of the istio.io/istio module, helm
// template with its defaults), the downward API's values filled in.
var ztunnelChartEnv = []string{
	"CA_ADDRESS=istiod.istio-system.svc:15012",
	"XDS_ADDRESS=istiod.istio-system.svc:15012",
	"RUST_LOG=info",
	"RUST_BACKTRACE=1",
	"ISTIO_META_CLUSTER_ID=Kubernetes",
	"INPOD_ENABLED=true",
	"TERMINATION_GRACE_PERIOD_SECONDS=30",
	"POD_NAME=ztunnel-x7k2p",
	"POD_NAMESPACE=istio-system",
	"NODE_NAME=worker1",
	"INSTANCE_IP=10.244.1.5",
	"SERVICE_ACCOUNT=ztunnel",
	"ZTUNNEL_CPU_LIMIT=2",
	"ZTUNNEL_RESOURCE_CPU_REQUEST=1",
	"KUBERNETES_SERVICE_HOST=10.96.0.1",
	"PATH=/usr/bin",
}

func TestFromEnvTheZtunnelChart(t *testing.T) {
	exists := func(p string) bool { return p == DefaultTokenFile }
	env, err := FromEnv(ztunnelChartEnv, exists)
	if err != nil {
		t.Fatal(err)
	}
	o := env.Options
	if o.Node != "worker1" || o.Workload != "" || o.ZDSSocket != DefaultInpodUDS || !o.PortReuse {
		t.Errorf("mode: node %q workload %q zds %q reuse %v; want shared on worker1 over %s with SO_REUSEPORT", o.Node, o.Workload, o.ZDSSocket, o.PortReuse, DefaultInpodUDS)
	}
	cp := o.ControlPlane
	if cp == nil || cp.XDSAddress != "istiod.istio-system.svc:15012" || cp.CAAddress != "istiod.istio-system.svc:15012" ||
		cp.TokenFile != DefaultTokenFile || cp.RootCert != DefaultRootCertFile || cp.CARootCert != DefaultRootCertFile {
		t.Errorf("control plane %+v", cp)
	}
	if o.Local != nil {
		t.Errorf("a local config from the chart's environment: %+v", o.Local)
	}
	// ztunnel drains for 5 s less than Kubernetes waits above 10 s.
	if o.DrainTimeout != 25*time.Second {
		t.Errorf("drain %v, want 25s from TERMINATION_GRACE_PERIOD_SECONDS=30", o.DrainTimeout)
	}
	if env.LogLevel != "info" {
		t.Errorf("log level %q from RUST_LOG=info", env.LogLevel)
	}
	for _, name := range []string{"RUST_BACKTRACE", "ZTUNNEL_CPU_LIMIT", "ZTUNNEL_RESOURCE_CPU_REQUEST"} {
		if !slices.ContainsFunc(env.Ignored, func(s string) bool { return strings.HasPrefix(s, name+": ") }) {
			t.Errorf("%s is set and ignored, but not reported: %q", name, env.Ignored)
		}
	}
	if len(env.Ignored) != 3 {
		t.Errorf("ignored %q, want just the three", env.Ignored)
	}
	if err := o.Validate(); err != nil {
		t.Errorf("the chart's options do not validate: %v", err)
	}

	// Who it is to istiod.
	s := o.Self.withDefaults(&o)
	n := s.XDSNode()
	if n.ID != "ztunnel~10.244.1.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local" {
		t.Errorf("node id %q", n.ID)
	}
	for k, v := range map[string]any{"NAME": "ztunnel-x7k2p", "NAMESPACE": "istio-system", "INSTANCE_IPS": "10.244.1.5", "NODE_NAME": "worker1", "CLUSTER_ID": "Kubernetes"} {
		if n.Metadata[k] != v {
			t.Errorf("metadata %s = %v, want %v", k, n.Metadata[k], v)
		}
	}
	if s.ClusterID != "Kubernetes" || s.Identity().String() != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" {
		t.Errorf("cluster %q identity %s", s.ClusterID, s.Identity())
	}

	// Without a token file ztunnel sends no token; with no Kubernetes
	// around its default address is localhost.
	env, err = FromEnv([]string{"NODE_NAME=n"}, func(string) bool { return false })
	if err != nil {
		t.Fatal(err)
	}
	if cp := env.Options.ControlPlane; cp.TokenFile != "" || cp.XDSAddress != "localhost:15012" || cp.CAAddress != "localhost:15012" {
		t.Errorf("defaults off Kubernetes: %+v", cp)
	}
}

func TestFromEnvModesAndOverrides(t *testing.T) {
	env, err := FromEnv([]string{
		"PROXY_MODE=dedicated", "PROXY_WORKLOAD_INFO=demo/client/client-sa", "XDS_ADDRESS=https://10.0.0.7:15012/",
		"CA_ADDRESS=https://ca.example:443", "ALT_XDS_HOSTNAME=istiod.mesh", "XDS_ROOT_CA=SYSTEM", "CA_ROOT_CA=/etc/ca.pem",
		"AUTH_TOKEN=/tok", "SECRET_TTL=12h", "CONNECTION_TERMINATION_DEADLINE=7s", "TERMINATION_GRACE_PERIOD_SECONDS=8",
		"POOL_MAX_STREAMS_PER_CONNECTION=50", "POOL_UNUSED_RELEASE_TIMEOUT=90s", "INPOD_PORT_REUSE=false", "NETWORK=net-a",
		"XDS_HEADER_X_Tenant=blue", "ISTIO_METAJSON_LABELS={\"app\":\"client\"}", "ISTIO_META_FOO=bar", "INSTANCE_IP=10.1.2.3",
		"RUST_LOG=warn,ztunnel::proxy=debug", "PACKET_MARK=1337", "XDS_ON_DEMAND=false",
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	o := env.Options
	if o.Workload != "demo/client" || o.Node != "" || o.ZDSSocket != "" || o.Self.ServiceAccount != "client-sa" {
		t.Errorf("dedicated: workload %q node %q zds %q sa %q", o.Workload, o.Node, o.ZDSSocket, o.Self.ServiceAccount)
	}
	cp := o.ControlPlane
	if cp.XDSAddress != "10.0.0.7:15012" || cp.CAAddress != "ca.example:443" || cp.XDSServerName != "istiod.mesh" ||
		cp.RootCert != SystemRoots || cp.CARootCert != "/etc/ca.pem" || cp.TokenFile != "/tok" || cp.XDSHeaders["x_tenant"] != "blue" {
		t.Errorf("control plane %+v", cp)
	}
	// CONNECTION_TERMINATION_DEADLINE wins over the grace period.
	if o.CertTTL != 12*time.Hour || o.DrainTimeout != 7*time.Second || o.PoolMaxStreams != 50 || o.HBONE.IdleTimeout != 90*time.Second || o.PortReuse || o.Network != "net-a" {
		t.Errorf("ttl %v drain %v streams %d idle %v reuse %v network %q", o.CertTTL, o.DrainTimeout, o.PoolMaxStreams, o.HBONE.IdleTimeout, o.PortReuse, o.Network)
	}
	if env.LogLevel != "warn" {
		t.Errorf("log level %q from RUST_LOG's default", env.LogLevel)
	}
	n := o.Self.withDefaults(&o).XDSNode()
	if n.ID != "ztunnel~10.1.2.3~client.demo~demo.svc.cluster.local" {
		t.Errorf("dedicated node id %q: the workload's own pod", n.ID)
	}
	if labels, _ := n.Metadata["LABELS"].(map[string]any); labels["app"] != "client" || n.Metadata["FOO"] != "bar" {
		t.Errorf("metadata %v", n.Metadata)
	}
	if id := o.Self.withDefaults(&o).Identity().String(); id != "spiffe://cluster.local/ns/demo/sa/client-sa" {
		t.Errorf("dedicated identity %s", id)
	}
}

// What cannot be done safely is refused, each naming its variable and value.
func TestFromEnvRefuses(t *testing.T) {
	for _, c := range []struct {
		env  []string
		want string
	}{
		{[]string{}, "NODE_NAME is not set"},
		{[]string{"NODE_NAME=n", "PROXY_MODE=sidecar"}, `PROXY_MODE="sidecar": want shared or dedicated`},
		{[]string{"PROXY_MODE=dedicated", "PROXY_WORKLOAD_INFO=demo/client"}, `PROXY_WORKLOAD_INFO="demo/client"`},
		{[]string{"NODE_NAME=n", "XDS_ADDRESS=http://istiod:15010"}, `XDS_ADDRESS="http://istiod:15010": want https://`},
		{[]string{"NODE_NAME=n", "CA_ADDRESS=istiod"}, `CA_ADDRESS="istiod": want host:port`},
		{[]string{"NODE_NAME=n", "CRL_PATH=/crl"}, `CRL_PATH="/crl": certificate revocation lists are not checked`},
		{[]string{"NODE_NAME=n", "LOCAL_XDS=workloads: []"}, `LOCAL_XDS="workloads: []": inline local config`},
		{[]string{"NODE_NAME=n", "PACKET_MARK=7"}, `PACKET_MARK="7"`},
		{[]string{"NODE_NAME=n", "INPOD_ENABLED=false"}, `INPOD_ENABLED="false"`},
		{[]string{"NODE_NAME=n", "XDS_ON_DEMAND=true"}, `XDS_ON_DEMAND="true"`},
		{[]string{"NODE_NAME=n", "FAKE_CA=true"}, `FAKE_CA="true"`},
		{[]string{"NODE_NAME=n", "SECRET_TTL=a day"}, `SECRET_TTL="a day": want a positive duration`},
		{[]string{"NODE_NAME=n", "TERMINATION_GRACE_PERIOD_SECONDS=-1"}, `TERMINATION_GRACE_PERIOD_SECONDS="-1"`},
		{[]string{"NODE_NAME=n", "POOL_MAX_STREAMS_PER_CONNECTION=0"}, `POOL_MAX_STREAMS_PER_CONNECTION="0"`},
		{[]string{"NODE_NAME=n", "INPOD_PORT_REUSE=maybe"}, `INPOD_PORT_REUSE="maybe"`},
		{[]string{"NODE_NAME=n", "ISTIO_METAJSON_LABELS={app"}, "ISTIO_METAJSON_LABELS: not JSON"},
		{[]string{"NODE_NAME=n", "XDS_HEADER_AUTHORIZATION=Bearer x"}, "XDS_HEADER_AUTHORIZATION: not a header name"},
		{[]string{"NODE_NAME=n", "CA_HEADER_X=a\nb"}, "CA_HEADER_X: the value holds characters"},
	} {
		_, err := FromEnv(c.env, func(string) bool { return false })
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.env, err, c.want)
		}
	}
	// Several wrong at once: all named, not only the first.
	_, err := FromEnv([]string{"NODE_NAME=n", "CRL_PATH=/c", "PACKET_MARK=1"}, nil)
	if err == nil || !strings.Contains(err.Error(), "CRL_PATH") || !strings.Contains(err.Error(), "PACKET_MARK") {
		t.Errorf("two refusals: %v", err)
	}
}

// docs/drop-in.md lists every variable the code knows, and no other.
func TestDropInDocListsEveryVariable(t *testing.T) {
	b, err := os.ReadFile("../../docs/drop-in.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z0-9_]+\\*?)`").FindAllStringSubmatch(string(b), -1) {
		doc[m[1]] = true
	}
	code := map[string]bool{}
	for _, v := range envSupported {
		code[v] = true
	}
	for v := range envIgnored {
		code[v] = true
	}
	for _, v := range envRefused {
		code[v] = true
	}
	for v := range code {
		if !doc[v] {
			t.Errorf("%s is handled by the code but not in docs/drop-in.md's table", v)
		}
	}
	for v := range doc {
		if !code[v] {
			t.Errorf("docs/drop-in.md lists %s, which the code does not know", v)
		}
	}
}
